"""Online RL: rewards (GSM8K's real answers), rollouts, dynamic sampling.

The losses by hand are in tests/losses/test_rl.py; the runs through the loop in tests/stages/test_online_grpo.py
and tests/stages/test_online_ppo.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from alignkit.errors import UserError
from alignkit.generation.rewards import exact_match, math_accuracy
from tests.conftest import run_stage, write_jsonl


# ------------------------------------------------------------------------------------------ rewards
def test_math_accuracy_on_real_gsm8k_answers(shared_data: Path) -> None:
    rows = [json.loads(line) for line in open(shared_data / "gsm8k" / "test.jsonl")][:40]
    finals = [r["answer"].split("####")[-1].strip().replace(",", "") for r in rows]
    right = [f"The answer is {f}." for f in finals]
    wrong = [f"The answer is {int(float(f)) + 1}." for f in finals]
    prompts = [r["question"] for r in rows]
    answers = [r["answer"] for r in rows]
    assert math_accuracy(prompts, right, answers) == [1.0] * 40
    assert math_accuracy(prompts, wrong, answers) == [0.0] * 40
    # equivalent forms agree
    assert math_accuracy(["q"] * 3, ["0.5", "\\frac{1}{2}", "1/2"], ["1/2"] * 3) == [1.0, 1.0, 1.0]


def test_exact_match() -> None:
    assert exact_match(
        ["q"] * 5, ["85", " 85.", "85.0", "1,234", "58"], ["85", "85", "85", "1234", "85"]
    ) == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_user_reward_function_and_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from alignkit.generation.rewards import build_reward_funcs, check_columns, score

    mod = tmp_path / "my_rewards.py"
    mod.write_text(
        "def brevity(prompts, completions, **kw):\n    return [-len(c) / 10 for c in completions]\n\n"
        "def needs_topic(prompts, completions, topic, **kw):\n    return [1.0 if topic[0] in c else 0.0 "
        "for c in completions]\n\n"
        "def broken(prompts, completions, **kw):\n    return [1 / (len(c) - 3) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    funcs = build_reward_funcs(["my_rewards:brevity", "length"], "", 2)
    out = score(funcs, ["p", "p"], ["abcd", "a"], {}, ["row 1", "row 2"])
    assert out["my_rewards:brevity"].tolist() == pytest.approx([-0.4, -0.1])
    assert out["length"].tolist() == pytest.approx([-1.0, 0.0])
    with pytest.raises(UserError, match=r"reward function `my_rewards:needs_topic` needs the column `topic`"):
        check_columns(build_reward_funcs(["my_rewards:needs_topic"], "", 1), {"answer"}, "data.jsonl")
    with pytest.raises(
        UserError, match=r"`my_rewards:broken` raised ZeroDivisionError.*first failing row: row 2"
    ):
        score(
            build_reward_funcs(["my_rewards:broken"], "", 1),
            ["p", "p"],
            ["abcde", "abc"],
            {},
            ["row 1", "row 2"],
        )
    with pytest.raises(UserError, match=r"`exact_mtch` is not built in \(did you mean `exact_match`\?\)"):
        build_reward_funcs(["exact_mtch"], "", 1)


# ------------------------------------------------------------------------------------------ rollouts
def test_rollout_groups_truncation_and_eos(tiny_model: str) -> None:
    from transformers import AutoModelForCausalLM

    from alignkit.generation.rollout import sample_hf
    from alignkit.modeling.load import load_tokenizer

    tok = load_tokenizer(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    from alignkit.data.batches import tokenize_chat

    prompts = [
        tokenize_chat(tok, [{"role": "user", "content": q}], add_generation_prompt=True)
        for q in ("hi", "2+2?")
    ]
    torch.manual_seed(0)
    s = sample_hf(model, tok, prompts, num_generations=3, max_new_tokens=4, temperature=1.0)
    assert len(s.completion_ids) == 6 and s.prompt_ids[0] == s.prompt_ids[2] != s.prompt_ids[3]
    for ids, trunc in zip(s.completion_ids, s.truncated):
        assert len(ids) <= 4
        assert trunc == (tok.eos_token_id not in ids)  # a random model rarely stops: truncation is flagged
    assert any(s.truncated)


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 0), (0.7, 5)])
def test_rollout_returns_the_sampling_log_probs(tiny_model: str, temperature: float, top_k: int) -> None:
    """Each sampled token's log-prob under the distribution it was drawn from: the forward pass's log-softmax of
    logits / temperature, renormalised over the top-k when top_k is set."""
    from transformers import AutoModelForCausalLM

    from alignkit.data.batches import tokenize_chat
    from alignkit.generation.rollout import sample_hf, sequences
    from alignkit.modeling.load import load_tokenizer

    tok = load_tokenizer(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.generation_config.repetition_penalty = 3.0  # a model's own sampling settings must not leak in
    prompts = [
        tokenize_chat(tok, [{"role": "user", "content": q}], add_generation_prompt=True)
        for q in ("hi", "2+2?")
    ]
    torch.manual_seed(0)
    s = sample_hf(model, tok, prompts, 3, max_new_tokens=5, temperature=temperature, top_k=top_k)
    assert [len(lp) for lp in s.logprobs] == [len(c) for c in s.completion_ids]
    batch = sequences(s.prompt_ids, s.completion_ids, tok.pad_token_id)
    with torch.no_grad():
        logits = (
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits / temperature
        )
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)
    for i, (p, c) in enumerate(zip(s.prompt_ids, s.completion_ids)):
        expected = [logp[i, len(p) - 1 + t, tok_id].item() for t, tok_id in enumerate(c)]
        assert s.logprobs[i] == pytest.approx(expected, abs=1e-4)


def test_dapo_dynamic_sampling_replaces_groups_with_one_reward(
    tiny_model: str, tmp_path: Path, monkeypatch
) -> None:  # noqa: ANN001
    """A prompt whose completions all get the same reward teaches nothing: dynamic sampling drops its group and
    refills the batch with informative groups of other prompts."""
    from alignkit.config import build_config
    from alignkit.stages import get_stage

    (tmp_path / "flat_rewards.py").write_text(
        "def flat_for_12(prompts, completions, **kw):\n"
        "    return [1.0 if '12 + 7' in p else float(len(c)) for p, c in zip(prompts, completions)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = build_config(
        {
            "stage": "grpo",
            "model_name_or_path": tiny_model,
            "dataset": write_jsonl(tmp_path / "p.jsonl", PROMPTS),
            "output_dir": str(tmp_path / "out"),
            "loss_type": "dapo",
            "reward_funcs": ["flat_rewards:flat_for_12"],
            "num_generations": 4,
            "max_new_tokens": 6,
            "temperature": 1.5,
            "torch_dtype": "float32",
        }
    )
    stage = get_stage("grpo")(cfg)
    stage.build()
    assert stage.dynamic_sampling  # on by default for dapo
    torch.manual_seed(0)
    rows = stage.train_rows[:3]  # the first is "What is 12 + 7?"
    buffer = stage.rollout(stage.model, rows, torch.device("cpu"))
    assert stage.frac_zero_std >= 1 / 3  # the 12 + 7 group, at least, was flat
    assert len(buffer) == 3 * 4
    twelve = rows[0]["prompt_ids"]
    assert all(s["prompt_ids"] != twelve for s in buffer)
    for g in range(3):
        group = buffer[g * 4 : (g + 1) * 4]
        assert len({s["reward"] for s in group}) > 1
    # frac_reward_zero_std reports the batch as sampled, before the refill (as TRL)
    batch = stage.collate(buffer)
    logged = stage.step(stage.model, batch).metrics["frac_reward_zero_std"]
    assert float(logged[0] / logged[1]) == pytest.approx(stage.frac_zero_std) and stage.frac_zero_std > 0


def test_vllm_backend_absent_is_a_clear_error(tiny_model: str, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    if "vllm" in sys.modules or __import__("importlib").util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "answer": "1"}] * 4)
    with pytest.raises(UserError, match="rollout_backend: vllm needs vLLM"):
        run_stage(
            tmp_path,
            {
                "stage": "grpo",
                "model_name_or_path": tiny_model,
                "dataset": data,
                "reward_funcs": ["exact_match"],
                "rollout_backend": "vllm",
                "max_steps": 1,
            },
        )


# ------------------------------------------------------------------- prompts (the run tests use them too)
PROMPTS = [
    {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)}
    for a, b in [(12, 7), (30, 41), (5, 5), (66, 21), (13, 13), (40, 2), (9, 90), (11, 22)]
]


def test_sampling_temperature_divides_the_soft_capped_logits() -> None:
    """Gemma-2 caps its logits (tanh(l / cap) * cap) before sampling divides them by the temperature."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from alignkit.modeling.logprobs import completion_token_stats

    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        final_logit_softcapping=3.0,
        initializer_range=0.5,
    )
    model = Gemma2ForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 10))
    mask, completion = torch.ones_like(ids), torch.zeros_like(ids)
    completion[:, 5:] = 1
    with torch.no_grad():
        got = completion_token_stats(model, ids, mask, completion, temperature=0.5).logps
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float() / 0.5, -1)
    assert got.tolist() == pytest.approx(
        logp[0, 4:9].gather(-1, ids[0, 5:10, None]).squeeze(-1).tolist(), abs=1e-5
    )


def test_online_stages_switch_dropout_off(tiny_model: str, tiny_rm: str, tmp_path: Path) -> None:
    """Rollout log-probs and the first update's must be the same function: no dropout (LoRA's included)."""
    from alignkit.config import build_config
    from alignkit.stages import get_stage

    cfg = build_config(
        {
            "stage": "ppo",
            "model_name_or_path": tiny_model,
            "dataset": write_jsonl(tmp_path / "p.jsonl", PROMPTS),
            "output_dir": str(tmp_path / "out"),
            "reward_model": tiny_rm,
            "finetuning_type": "lora",
            "lora_dropout": 0.1,
        }
    )
    stage = get_stage("ppo")(cfg)
    stage.build()
    dropouts = [m for m in stage.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)


def test_completions_are_cut_where_sampling_stopped(tiny_model: str) -> None:
    from alignkit.generation.rollout import cut_completion
    from alignkit.modeling.load import load_tokenizer

    tok = load_tokenizer(tiny_model)
    eos = tok.eos_token_id
    words = [
        i for i in range(len(tok)) if len(tok.decode([i]).strip()) >= 3 and tok.decode([i]).strip().isalpha()
    ]
    b = words[0]
    stop = tok.decode([b]).strip()[:2]  # a stop string inside token b: b overhangs it
    a = next(w for w in words if stop not in tok.decode([w]) and stop not in tok.decode([w, w]))
    assert cut_completion([a, b, eos, eos], tok, None) == ([a, b, eos], False)  # EOS kept, padding dropped
    assert cut_completion([a, b, a, b], tok, None) == ([a, b, a, b], True)  # ran out of tokens
    # cut after b, not truncated, and no pad/EOS appended
    assert cut_completion([a, b, eos, eos], tok, [stop]) == ([a, b], False)
    assert cut_completion([a, b, a, a], tok, [stop]) == ([a, b], False)


def test_a_stopped_rows_padding_is_cut_and_a_sampled_pad_token_kept(tiny_model: str) -> None:
    """transformers pads a row once a criterion stops it; the engine cuts exactly that padding, at the step the
    row stopped, and keeps a pad token the model sampled in a row that ran to max_new_tokens (it used to drop
    every pad token of such a row: the answer kept was not the one drawn)."""
    from alignkit.generation.rollout import RowsDone, sample_hf
    from alignkit.modeling.load import load_causal_lm

    model, tok = load_causal_lm(tiny_model)
    prompt = tok("What is 2 + 2?")["input_ids"]
    with torch.no_grad():  # the pad token made the likeliest next token, and EOS one that is never drawn
        logits = model(torch.tensor([prompt])).logits[0, -1]
    tok.pad_token = tok.convert_ids_to_tokens(int(logits.argmax()))
    tok.eos_token = tok.convert_ids_to_tokens(int(logits.argmin()))
    steps = {"n": 0}

    def stop_even_rows_after_two(tokens: list[int]) -> list[bool]:
        steps["n"] += 1
        return [i % 2 == 0 and steps["n"] >= 2 for i in range(len(tokens))]

    torch.manual_seed(0)
    done = RowsDone(stop_even_rows_after_two)
    out = sample_hf(model, tok, [prompt], 8, max_new_tokens=6, temperature=0.05, stopping_criteria=[done])
    assert all(tok.eos_token_id not in ids for ids in out.completion_ids)
    assert [len(ids) for ids in out.completion_ids] == [2, 6] * 4  # stopped rows cut, the others whole
    assert all(ids[0] == tok.pad_token_id for ids in out.completion_ids)  # the drawn pad token stays
    assert out.truncated == [True] * 8 and [len(lp) for lp in out.logprobs] == [2, 6] * 4
