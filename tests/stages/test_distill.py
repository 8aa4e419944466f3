"""On-policy distillation (GKD): the generalized JSD against TRL 1.16's `GKDTrainer.generalized_jsd_loss` and a
hand value, the stage's first step on the data set's completions against TRL's loss on the same tokens, on-policy
training that moves the student towards the teacher, resume of the lmbda draws, and the errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from alignkit.errors import UserError
from alignkit.losses.distill import generalized_jsd
from tests.conftest import run_stage, write_jsonl
from tests.generation.test_online import PROMPTS

SFT_ROWS = [
    {"prompt": r["prompt"], "completion": [{"role": "assistant", "content": r["answer"]}]} for r in PROMPTS
]


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_generalized_jsd_matches_trl(beta: float) -> None:
    from tests.trl_oracle_online import trl_gkd_loss

    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 50, generator=gen), torch.randn(2, 5, 50, generator=gen)
    labels = torch.tensor([[-100, 3, 4, 5, -100], [-100, -100, 1, 2, 3]])
    keep = labels != -100
    ours = generalized_jsd(s[keep], t[keep], beta)  # (6,)
    assert ours.mean().item() == pytest.approx(trl_gkd_loss(s, t, labels, beta).item(), rel=1e-6)


def test_generalized_jsd_by_hand() -> None:
    """Two tokens over a vocabulary of 2: p_s = (1/2, 1/2), p_t = (1/4, 3/4) for the first; equal for the second.
    In float64: the formula is checked, not float32's rounding (which differs by CPU: 1.1e-6 relative on an
    AVX-512 Xeon)."""
    s = torch.log(torch.tensor([[0.5, 0.5], [0.2, 0.8]], dtype=torch.float64))
    t = torch.log(torch.tensor([[0.25, 0.75], [0.2, 0.8]], dtype=torch.float64))
    forward = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # KL(p_t || p_s)
    reverse = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # KL(p_s || p_t)
    m = (0.375, 0.625)  # beta = 1/2
    jsd = 0.5 * (0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])) + 0.5 * (
        0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    )
    for beta, want in ((0.0, forward), (1.0, reverse), (0.5, jsd)):
        got = generalized_jsd(s, t, beta)
        assert got[0].item() == pytest.approx(want, rel=1e-12) and abs(got[1].item()) < 1e-15, beta


def _keys(tiny_model: str, teacher: str, data: str, **kw: object) -> dict:
    return {
        "stage": "distill",
        "model_name_or_path": tiny_model,
        "teacher_model_name_or_path": teacher,
        "dataset": data,
        "per_device_train_batch_size": 4,
        "max_new_tokens": 6,
        "max_steps": 1,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "torch_dtype": "float32",
        **kw,
    }


def test_first_step_on_the_data_completions_matches_trl(
    tiny_model: str, tiny_ref: str, tmp_path: Path
) -> None:
    """`lmbda: 0` distils on the data set's completions: the first step's loss is TRL's GKD loss on the same
    prompt + completion tokens, with the two models' logits from plain forward passes."""
    from transformers import AutoModelForCausalLM

    from alignkit.data.batches import encode_unpaired
    from alignkit.data.formats import load_examples
    from alignkit.generation.rollout import sequences
    from alignkit.modeling.load import load_tokenizer
    from tests.trl_oracle_online import trl_gkd_loss

    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS[:4])
    record, _ = run_stage(tmp_path, _keys(tiny_model, tiny_ref, data, lmbda=0.0, beta=0.3))

    tok = load_tokenizer(tiny_model)
    rows = [encode_unpaired(ex, tok) for ex in load_examples(data)]
    batch = sequences([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows], tok.pad_token_id)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        logits = [
            AutoModelForCausalLM.from_pretrained(m)(
                batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            for m in (tiny_model, tiny_ref)
        ]
    theirs = trl_gkd_loss(logits[0][:, :-1], logits[1][:, :-1], labels[:, 1:], beta=0.3)
    assert record["loss"] == pytest.approx(theirs.item(), rel=1e-5)
    assert record["on_policy"] == 0.0 and record["jsd"] == pytest.approx(record["loss"], rel=1e-6)


def test_a_conversation_is_distilled_on_its_last_answer(
    tiny_model: str, tiny_ref: str, tmp_path: Path
) -> None:
    """A `messages` file (an SFT data set) reads as the turns before the last answer and that answer, as TRL's
    GKD: the first step equals the prompt / completion file's; a conversation of one answer has no prompt."""
    rows = [{"messages": r["prompt"] + r["completion"]} for r in SFT_ROWS[:4]]
    assert isinstance(SFT_ROWS[0]["prompt"], list)
    paired = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS[:4])
    whole = write_jsonl(tmp_path / "messages.jsonl", rows)
    expected, _ = run_stage(tmp_path / "a", _keys(tiny_model, tiny_ref, paired, lmbda=0.0))
    record, _ = run_stage(tmp_path / "b", _keys(tiny_model, tiny_ref, whole, lmbda=0.0))
    assert (
        record["loss"] == pytest.approx(expected["loss"], rel=1e-6)
        and record["num_tokens"] == expected["num_tokens"]
    )
    lone = write_jsonl(tmp_path / "lone.jsonl", [{"messages": SFT_ROWS[0]["completion"]}])
    with pytest.raises(UserError, match=r"lone.jsonl line 1: the prompt is empty"):
        run_stage(tmp_path / "c", _keys(tiny_model, tiny_ref, lone, lmbda=0.0))


def _divergence(student: str, teacher: str, data: str, beta: float) -> float:
    """Mean per-token generalized JSD of two saved models on a data set's prompt + completion tokens."""
    from transformers import AutoModelForCausalLM

    from alignkit.data.batches import encode_unpaired
    from alignkit.data.formats import load_examples
    from alignkit.generation.rollout import sequences
    from alignkit.modeling.load import load_tokenizer

    tok = load_tokenizer(student)
    rows = [encode_unpaired(ex, tok) for ex in load_examples(data)]
    batch = sequences([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows], tok.pad_token_id)
    keep = batch["completion_mask"][:, 1:].bool()
    with torch.no_grad():
        s, t = (
            AutoModelForCausalLM.from_pretrained(m)(
                batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits[:, :-1][keep]
            for m in (student, teacher)
        )
        return generalized_jsd(s, t, beta).mean().item()


def test_on_policy_distillation_moves_the_student_to_the_teacher(
    tiny_model: str, tiny_ref: str, tmp_path: Path
) -> None:
    """`lmbda: 1`: every step on the student's own samples (prompts only in the data); afterwards the student
    is nearer the teacher on held-out answers it never trained on."""
    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:6])
    held_out = write_jsonl(tmp_path / "held_out.jsonl", SFT_ROWS[6:])
    held_out_prompts = write_jsonl(tmp_path / "held_out_prompts.jsonl", PROMPTS[6:])
    evaluating = {"eval_dataset": held_out_prompts, "eval_steps": 10, "eval_reward_funcs": ["exact_match"]}
    keys = _keys(tiny_model, tiny_ref, data, lmbda=1.0, beta=0.5, max_steps=20, **evaluating)
    _, out = run_stage(tmp_path, keys)
    records = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    trained = [r for r in records if "on_policy" in r]  # the step-0 record is the baseline evaluation
    assert all(r["on_policy"] == 1.0 for r in trained) and len(trained) == 20
    # evaluated while it trained: the student's KL to the teacher on its greedy held-out answers falls, and the
    # held-out score (exact_match) the best model would be chosen by is there; there is no training reward
    evaluations = json.loads((Path(out) / "hacking.json").read_text())["evaluations"]
    assert [e["step"] for e in evaluations] == [0, 10, 20]
    assert evaluations[-1]["eval_kl"] < evaluations[0]["eval_kl"], evaluations
    assert all("eval_exact_match" in e and "eval_reward" not in e for e in evaluations)
    before, after = (
        _divergence(tiny_model, tiny_ref, held_out, 0.5),
        _divergence(out, tiny_ref, held_out, 0.5),
    )
    assert after < 0.8 * before, (before, after)  # 0.113 -> 0.074 here


def test_lmbda_draws_resume_where_they_stopped(tiny_model: str, tiny_ref: str, tmp_path: Path) -> None:
    """The on-policy / data decisions of a run resumed from its step-3 checkpoint are the uninterrupted run's
    (the generator's state is checkpointed; a fresh one would repeat steps 1-3's draws, which differ here)."""
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    keys = _keys(
        tiny_model, tiny_ref, data, lmbda=0.5, max_steps=6, save_steps=3, per_device_train_batch_size=2
    )
    _, out = run_stage(tmp_path, keys)
    whole = [r["on_policy"] for r in map(json.loads, open(Path(out) / "metrics.jsonl"))]
    assert whole[:3] != whole[3:] and 0 < sum(whole) < 6, whole
    (Path(out) / "model.safetensors").unlink()  # as if stopped after the step-3 checkpoint
    run_stage(tmp_path, {**keys, "resume_from_checkpoint": "auto"})
    resumed = [r["on_policy"] for r in map(json.loads, open(Path(out) / "metrics.jsonl"))]
    assert resumed == whole


def test_distill_errors(tiny_model: str, tmp_path: Path) -> None:
    from alignkit.config import build_config
    from alignkit.modeling.tiny import build_tiny

    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    with pytest.raises(UserError, match="stage distill needs `teacher_model_name_or_path`"):
        build_config({**_keys(tiny_model, "", prompts), "output_dir": str(tmp_path / "o")})
    with pytest.raises(UserError, match=r"`lmbda` must be in \[0, 1\]"):
        build_config({**_keys(tiny_model, tiny_model, prompts, lmbda=1.5), "output_dir": str(tmp_path / "o")})
    with pytest.raises(UserError, match=r"p.jsonl line 1: this row has no completion, but `lmbda: 0.5`"):
        run_stage(tmp_path / "a", _keys(tiny_model, tiny_model, prompts, lmbda=0.5))
    with pytest.raises(
        UserError, match="stage distill has no training reward to evaluate by; give `eval_reward_funcs`"
    ):
        run_stage(tmp_path / "c", _keys(tiny_model, tiny_model, prompts, lmbda=1.0, val_size=2, eval_steps=1))
    assert not (tmp_path / "c" / "out").exists()  # refused before anything is loaded or written
    other = build_tiny(str(tmp_path / "other"), vocab_size=300)
    with pytest.raises(UserError, match="has another tokenizer than the student"):
        run_stage(tmp_path / "b", _keys(tiny_model, other, prompts, lmbda=1.0))
