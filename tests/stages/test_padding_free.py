"""Padding-free batches (SFT, reward model), the reward model's length groups, and SFT's chunked output layer equal the padded, full-logits path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignkit.config import build_config
from alignkit.data.batches import IGNORE
from alignkit.data.packed import length_groups, segment_index
from alignkit.losses.tokens import per_row_sum, token_nll
from alignkit.modeling.load import load_reward_model, load_tokenizer
from tests.conftest import run_stage, write_jsonl

Q = ["What is 12 + 7?", "Name a colour of the sky, please.", "Hi.", "Count to three, then stop counting."]
A = ["19", "Blue, on a clear day; grey when it rains.", "Hello there, how are you today?", "One, two, three."]
BAD = ["21", "Green.", "Go away.", "One, three, two, four, five."]
SFT_ROWS = [
    {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
    for q, a in zip(Q, A)
]
PAIRS = [{"prompt": q, "chosen": " " + a, "rejected": " " + b} for q, a, b in zip(Q, A, BAD)]


def _stage(tmp_path: Path, stage: str, model: str, rows: list[dict], **keys):  # noqa: ANN202
    from alignkit.stages import get_stage

    data = write_jsonl(tmp_path / f"{stage}.jsonl", rows)
    cfg = build_config(
        {
            "stage": stage,
            "model_name_or_path": model,
            "dataset": data,
            "output_dir": str(tmp_path / "o"),
            **keys,
        }
    )
    st = get_stage(cfg.stage)(cfg)
    st.tokenizer = load_tokenizer(model)
    return st, st.rows(data)


def _grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    # an element near 0 keeps float32 summation-order noise: the floor is relative to the tensor's scale
    for name in a:
        floor = 2e-6 * float(b[name].abs().max())
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=floor, msg=name)


def _fit_a_little(model: torch.nn.Module, batch: dict, steps: int = 1) -> None:
    """A few Adam steps on the batch, so that the model predicts some of its tokens (accuracy off 0)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        _full_logits(model, batch)[2].backward()
        opt.step()
    model.zero_grad()


def _full_logits(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The straightforward computation: (B,) summed token NLL per row, correct top-1 count, the loss sum."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    losses = token_nll(logits, batch["labels"])
    mask = batch["labels"][:, 1:] != IGNORE
    correct = ((logits[:, :-1].argmax(-1) == batch["labels"][:, 1:]) & mask).sum()
    return losses.sum(1), correct, losses.sum()


@pytest.mark.parametrize("completion_only", [True, False])
def test_sft_padding_free_and_chunked_head_equal_padded_full_logits(
    completion_only: bool, tiny_model: str, tmp_path: Path
) -> None:
    from alignkit.stages.sft import sft_token_stats

    padded, rows = _stage(tmp_path / "a", "sft", tiny_model, SFT_ROWS, completion_only_loss=completion_only)
    free, _ = _stage(
        tmp_path / "b", "sft", tiny_model, SFT_ROWS, completion_only_loss=completion_only, padding_free=True
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    pb, fb = padded.collate(rows), free.collate(rows)
    _fit_a_little(model, pb)
    assert fb["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows)) and "attention_mask" not in fb
    starts = (fb["position_ids"][0] == 0).nonzero().squeeze(1)
    assert starts.tolist() == [0, *torch.tensor([len(r["input_ids"]) for r in rows]).cumsum(0)[:-1].tolist()]
    # a row's first token is never a label: it would be predicted from the previous row's last token
    assert (fb["labels"][0, starts] == IGNORE).all()
    assert padded.count(pb) == free.count(fb) > 0
    if not completion_only:  # every token but each row's first is trained on
        assert free.count(fb) == sum(len(r["input_ids"]) - 1 for r in rows)

    ref_rows, ref_correct, ref_sum = _full_logits(model, pb)
    ref_grads = _grads(model, ref_sum)
    outs, per_row = {}, {}
    for name, stage, batch in (("padded", padded, pb), ("free", free, fb)):
        out = stage.step(model, batch)
        outs[name] = (out, _grads(model, out.loss_sum))
        with torch.no_grad():
            stats = sft_token_stats(model, batch)
        rows_of = stats.rows
        if name == "free":  # the original row of every labelled token
            rows_of = segment_index(batch["position_ids"])[1:][batch["labels"][0, 1:] != IGNORE]
        per_row[name] = per_row_sum(-stats.logps, rows_of, len(rows))
    for name, (out, grads) in outs.items():
        torch.testing.assert_close(per_row[name], ref_rows.detach(), rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(out.loss_sum.detach(), ref_sum.detach(), rtol=1e-5, atol=1e-5, msg=name)
        hits, n = out.metrics["mean_token_accuracy"]
        assert int(hits) == int(ref_correct) and int(n) == padded.count(pb), name
        _assert_grads(grads, ref_grads)
    assert 0 < int(ref_correct) < padded.count(pb)  # a real accuracy, neither none nor all


def _rm_rows(stage, rows: list[dict]) -> list[dict]:  # noqa: ANN001
    """The pairs, plus one whose chosen side ends in the pad token (read, as transformers does, before it)."""
    pad = stage.tokenizer.pad_token_id
    extra = {
        "chosen_ids": rows[0]["chosen_ids"] + [pad],
        "rejected_ids": rows[1]["rejected_ids"],
        "margin": None,
    }
    return [*rows, extra]


@pytest.mark.parametrize("finetuning", ["full", "lora"])
@pytest.mark.parametrize("layout", ["padding_free", "length_groups"])
def test_rm_padding_free_and_length_groups_equal_one_padded_batch(
    finetuning: str, layout: str, tiny_rm: str, tmp_path: Path
) -> None:
    """The reference is one forward of the whole right-padded batch (`length_groups: false`)."""
    keys = {"finetuning_type": finetuning, "center_rewards_coefficient": 0.01, "torch_dtype": "float32"}
    padded, rows = _stage(tmp_path / "a", "rm", tiny_rm, PAIRS, length_groups=False, **keys)
    other, _ = _stage(tmp_path / "b", "rm", tiny_rm, PAIRS, **{layout: True}, **keys)
    rows = _rm_rows(padded, rows)
    model = load_reward_model(padded.cfg)
    if finetuning == "lora":
        assert hasattr(model, "peft_config")
        with torch.no_grad():  # LoRA's B starts at 0: make the adapter matter
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)
    pb, ob = padded.collate(rows), other.collate(rows)
    if layout == "padding_free":
        assert ob["input_ids"].shape[0] == 1
    else:  # several groups, which run fewer positions than the padded batch
        lengths = ob["attention_mask"].sum(1).tolist()
        groups = length_groups(lengths)
        assert (
            len(groups) == 3 and sum(len(g) * lengths[g[0]] for g in groups) < 0.8 * ob["input_ids"].numel()
        )
    assert padded.count(pb) == other.count(ob) == len(rows)
    assert padded.num_tokens(pb) == other.num_tokens(ob)
    results = {}
    for name, stage, batch in (("padded", padded, pb), ("other", other, ob)):
        out = stage.step(model, batch)
        with torch.no_grad():
            rewards = stage.scores(model, batch)
        results[name] = (rewards, out, _grads(model, out.loss_sum))
    (r_a, out_a, g_a), (r_b, out_b, g_b) = results["padded"], results["other"]
    if layout == "length_groups" and finetuning == "full":  # one lookup: one dense embedding gradient
        assert _nodes(other.step(model, ob).loss_sum.grad_fn, "EmbeddingBackward0") == 1
    torch.testing.assert_close(r_b, r_a, rtol=1e-5, atol=1e-5)
    assert r_a.std() > 0.05  # rewards differ between sequences: a real comparison
    torch.testing.assert_close(out_b.loss_sum, out_a.loss_sum, rtol=1e-5, atol=1e-5)
    for key in ("accuracy", "margin", "mean_reward"):
        torch.testing.assert_close(out_b.metrics[key][0], out_a.metrics[key][0], rtol=1e-5, atol=1e-5)
    _assert_grads(g_b, g_a)
    if finetuning == "lora":
        assert any("lora_B" in n for n in g_a) and any("score" in n for n in g_a)


def _nodes(fn, name: str) -> int:  # noqa: ANN001
    """How many autograd nodes called `name` the graph under `fn` holds."""
    seen, stack = set(), [fn]
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        stack += [g for g, _ in f.next_functions]
    return sum(type(f).__name__ == name for f in seen)


def test_length_groups_pad_at_most_an_eighth_and_keep_every_row_once() -> None:
    lengths = [5, 40, 38, 12, 39, 11, 100, 6, 13, 37]
    groups = length_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert groups == [[6], [1, 4, 2, 9], [8, 3, 5], [7, 0]]  # longest first, each sorted longest first
    for g in groups:
        assert len(g) * lengths[g[0]] <= 1.125 * sum(lengths[i] for i in g)
    assert length_groups([7, 7, 7]) == [[0, 1, 2]] and length_groups([]) == []
    assert length_groups([10, 9, 1], waste=0.0) == [[0], [1], [2]]


def _logged(tmp_path: Path, keys: dict) -> list[dict]:
    import json

    _, out = run_stage(tmp_path, keys)
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [r for r in map(json.loads, filter(str.strip, fh)) if "loss" in r]


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_training_run_padding_free_logs_the_padded_loss(
    stage: str, tiny_model: str, tiny_rm: str, tmp_path: Path
) -> None:
    """config -> stage -> loop, 2 steps of 2 rows: the logged loss and grad norm do not move."""
    rows = SFT_ROWS if stage == "sft" else PAIRS
    keys = {
        "stage": stage,
        "model_name_or_path": tiny_model if stage == "sft" else tiny_rm,
        "dataset": write_jsonl(tmp_path / "d.jsonl", rows),
        "max_steps": 2,
        "logging_steps": 1,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "shuffle": False,
        "torch_dtype": "float32",
    }
    a = _logged(tmp_path / "a", keys if stage == "sft" else {**keys, "length_groups": False})
    for other in ({"padding_free": True}, {}) if stage == "rm" else ({"padding_free": True},):
        b = _logged(tmp_path / str(other), {**keys, **other})
        assert len(a) == len(b) == 2 and a[0]["loss"] != a[1]["loss"]
        for x, y in zip(a, b):
            assert y["loss"] == pytest.approx(x["loss"], abs=1e-5)
            assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
        assert b[0]["num_tokens"] == a[0]["num_tokens"]


@pytest.mark.parametrize("target", [["q_proj", "v_proj"], ["q_proj", "lm_head"]])
def test_sft_step_under_lora_equals_full_logits(target: list[str], tiny_model: str, tmp_path: Path) -> None:
    """LoRA off or on the output layer: the step's loss and accuracy are those of the model's own logits. (The
    tiny model's 512 entries take the full-logits step; `tests/modeling/test_logprobs.py` checks a LoRA-wrapped output
    layer in the chunked head.)"""
    from alignkit.modeling.load import load_policy
    from alignkit.stages.sft import chunked_head_applies

    stage, rows = _stage(tmp_path, "sft", tiny_model, SFT_ROWS, finetuning_type="lora", lora_target=target)
    model = load_policy(stage.cfg)
    with torch.no_grad():  # LoRA's B starts at 0: make the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    assert not chunked_head_applies(model)  # below FUSED_MIN_VOCAB
    batch = stage.collate(rows)
    _, correct, ref_sum = _full_logits(model, batch)
    ref_grads = _grads(model, ref_sum)
    out = stage.step(model, batch)
    torch.testing.assert_close(out.loss_sum, ref_sum, rtol=1e-5, atol=1e-5)
    assert int(out.metrics["mean_token_accuracy"][0]) == int(correct)
    _assert_grads(_grads(model, out.loss_sum), ref_grads)
