"""Continuous batching (`generation.continuous`): rows that join a running batch, leave it, sample with their own
settings and run their own LoRA adapter get, token for token, what each would get run alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from alignkit.generation.continuous import ContinuousBatch, Sampling, supports
from alignkit.modeling.load import load_causal_lm
from tests.ship.serve_helpers import make_adapter

PROMPTS = [[5, 17, 33, 2, 9], [40], [7, 7, 7, 120, 3, 88, 61, 12, 4], [300, 22]]
GREEDY = Sampling(temperature=0.0)


@pytest.fixture(scope="module")
def model(tiny_model: str) -> tuple[torch.nn.Module, object]:
    return load_causal_lm(tiny_model, "float32", device="cpu")


def _alone(model: torch.nn.Module, tok: object, prompt: list[int], n: int) -> list[int]:
    """The greedy answer of transformers' generate on this prompt alone, EOS ignored (n tokens)."""
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=tok.pad_token_id,
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("room", [64, 1])  # 1: the cache's buffers run out of room at every step
def test_rows_joining_and_leaving_a_running_batch_get_their_answers_alone(
    model: tuple, room: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("alignkit.generation.kv_cache.ROOM", room)
    lm, tok = model
    batch = ContinuousBatch(lm, tok.pad_token_id)
    got: dict[int, list[int]] = {}
    first, _ = batch.add(PROMPTS[:2], [GREEDY, GREEDY])  # rows 0, 1
    ids = [0, 1]
    for i, t in zip(ids, first):
        got[i] = [t]
    for step in range(12):
        if step == 3:  # two more rows join after three tokens, one of them longer than the batch
            new, _ = batch.add(PROMPTS[2:], [GREEDY, GREEDY])
            ids += [2, 3]
            for i, t in zip(ids[-2:], new):
                got[i] = [t]
        if step == 6:  # row 2 (the longest) leaves: the cache columns only it used are cut
            width = batch.mask.shape[1]
            batch.keep([i != 2 for i in ids])
            ids.remove(2)
            assert batch.mask.shape[1] < width and bool(batch.mask[:, 0].any())
        tokens, logits = batch.step()
        assert logits.shape == (len(ids), lm.config.vocab_size)
        for i, t in zip(ids, tokens):
            got[i].append(t)
    for i, answer in got.items():
        assert answer == _alone(lm, tok, PROMPTS[i], len(answer)), i
    assert [len(got[i]) for i in range(4)] == [13, 13, 4, 10]


def test_a_seeded_row_draws_the_same_tokens_whatever_runs_beside_it(model: tuple) -> None:
    lm, tok = model
    seeded = Sampling(temperature=1.0, top_p=0.9, seed=1234)

    def run(company: list[list[int]]) -> list[int]:
        batch = ContinuousBatch(lm, tok.pad_token_id)
        first, _ = batch.add([PROMPTS[0], *company], [seeded] + [Sampling(1.0)] * len(company))
        answer = [first[0]]
        for _ in range(15):
            answer.append(batch.step()[0][0])
        return answer

    alone = run([])
    assert run([PROMPTS[1], PROMPTS[2]]) == alone
    assert run([PROMPTS[3]]) == alone
    other = Sampling(temperature=1.0, top_p=0.9, seed=99)
    batch = ContinuousBatch(lm, tok.pad_token_id)
    first, _ = batch.add([PROMPTS[0]], [other])
    assert [first[0]] + [batch.step()[0][0] for _ in range(15)] != alone  # the seed decides


def test_a_sampled_row_follows_its_temperature(model: tuple) -> None:
    """Greedy and tempered rows share a step: the greedy one still gets the argmax; a tempered row draws the
    argmax as often as its tempered softmax says (within 3 standard deviations over 60 steps)."""
    lm, tok = model
    torch.manual_seed(0)
    batch = ContinuousBatch(lm, tok.pad_token_id)
    temperatures = [0.3, 3.0]
    batch.add([PROMPTS[2]] * 3, [GREEDY] + [Sampling(t) for t in temperatures])
    agree, expected, variance = [0, 0], [0.0, 0.0], [0.0, 0.0]
    for _ in range(60):
        tokens, logits = batch.step()
        assert tokens[0] == int(logits[0].argmax())
        for k, t in enumerate(temperatures):
            p = float(torch.softmax(logits[k + 1] / t, -1).max())
            agree[k] += tokens[k + 1] == int(logits[k + 1].argmax())
            expected[k] += p
            variance[k] += p * (1 - p)
    for k in range(2):
        assert abs(agree[k] - expected[k]) <= 3 * variance[k] ** 0.5 + 1, (agree, expected)
    assert expected[0] > expected[1] + 10  # the two temperatures draw differently


def test_lora_adapters_of_one_base_share_a_step(tiny_model: str, tmp_path: Path) -> None:
    from peft import PeftModel

    lm, tok = load_causal_lm(tiny_model, "float32", device="cpu")
    lm = PeftModel.from_pretrained(lm, make_adapter(tiny_model, tmp_path / "a", seed=1), adapter_name="a")
    lm.load_adapter(make_adapter(tiny_model, tmp_path / "b", seed=2), adapter_name="b")
    lm.eval()
    batch = ContinuousBatch(lm, tok.pad_token_id)
    adapters = ["a", None, "b", "a"]
    first, _ = batch.add(PROMPTS, [Sampling(0.0, adapter=a) for a in adapters])
    got = [[t] for t in first]
    for _ in range(8):
        for row, t in zip(got, batch.step()[0]):
            row.append(t)
    for prompt, adapter, answer in zip(PROMPTS, adapters, got):
        if adapter is None:
            with lm.disable_adapter():
                alone = _alone(lm, tok, prompt, len(answer))
        else:
            lm.set_adapter(adapter)
            alone = _alone(lm, tok, prompt, len(answer))
        assert answer == alone, adapter
    assert got[0] != got[2]  # the two adapters answer differently


def test_models_whose_cache_cannot_be_stacked_are_named() -> None:
    config = AutoConfig.for_model("mistral", sliding_window=64, num_hidden_layers=2)
    lm = torch.nn.Linear(1, 1)
    lm.config = config
    assert supports(lm) == "its attention has a sliding window"
    lm.config = AutoConfig.for_model("llama")
    assert supports(lm) is None
