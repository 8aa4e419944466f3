"""Same model, rows, batch and hyperparameters as TRL 1.16 -> the same token ids and first-step numbers.

TRL is the oracle here only; alignkit never imports it. Both sides run fp32 on CPU, batch in file order.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import first_step
from tests.trl_oracle import trl_first_step

trl = pytest.importorskip("trl")

REL = 1e-4


def assert_close(ours: float, theirs: float, name: str) -> None:
    assert ours == pytest.approx(theirs, rel=REL, abs=1e-6), f"{name}: alignkit {ours} vs TRL {theirs}"


Q = ["What is 12 + 7?", "Name a colour of the sky.", "Say hello in French.", "Count to three."]
A = ["19", "Blue, on a clear day.", "Bonjour!", "One, two, three."]
BAD = ["21", "Green.", "Hola!", "One, three, two."]

SFT_CASES = {
    "standard_prompt_completion": [{"prompt": q, "completion": " " + a} for q, a in zip(Q, A)],
    "conversational_prompt_completion": [
        {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
        for q, a in zip(Q, A)
    ],
    "text": [{"text": f"{q} {a}"} for q, a in zip(Q, A)],
}


@pytest.mark.parametrize("case", list(SFT_CASES))
def test_sft_first_step_matches_trl(case: str, tiny_model: str, tmp_path: Path) -> None:
    rows = SFT_CASES[case]
    log, prepared = trl_first_step("sft", tiny_model, rows)
    ours = first_step(tmp_path, "sft", tiny_model, rows)
    data = str(tmp_path / "d.jsonl")
    assert_close(ours["loss"], log["loss"], "loss")
    assert_close(ours["grad_norm"], log["grad_norm"], "grad_norm")
    assert_close(ours["mean_token_accuracy"], log["mean_token_accuracy"], "mean_token_accuracy")
    # and the token ids themselves
    from alignkit.data.batches import encode_sft
    from alignkit.data.formats import load_examples
    from alignkit.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    mine = [encode_sft(ex, tok) for ex in load_examples(data)]
    assert [m["input_ids"] for m in mine] == [p["input_ids"] for p in prepared]


RM_CASES = {
    "standard": [{"prompt": q, "chosen": " " + a, "rejected": " " + b} for q, a, b in zip(Q, A, BAD)],
    "conversational": [
        {
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": a}],
            "rejected": [{"role": "assistant", "content": b}],
        }
        for q, a, b in zip(Q, A, BAD)
    ],
    "implicit_prompt_conversational": [
        {
            "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": b}],
        }
        for q, a, b in zip(Q, A, BAD)
    ],
    "standard_with_margin": [
        {"prompt": q, "chosen": " " + a, "rejected": " " + b, "margin": m}
        for q, a, b, m in zip(Q, A, BAD, [0.5, 1.0, 0.0, 2.0])
    ],
}


@pytest.mark.parametrize("case", list(RM_CASES))
def test_reward_first_step_matches_trl(case: str, tiny_rm: str, tmp_path: Path) -> None:
    rows = RM_CASES[case]
    log, prepared = trl_first_step("rm", tiny_rm, rows, center_rewards_coefficient=0.01)
    ours = first_step(tmp_path, "rm", tiny_rm, rows, center_rewards_coefficient=0.01)
    data = str(tmp_path / "d.jsonl")
    assert_close(ours["loss"], log["loss"], "loss")
    assert_close(ours["grad_norm"], log["grad_norm"], "grad_norm")
    assert_close(ours["accuracy"], log["accuracy"], "accuracy")
    assert_close(ours["margin"], log["margin"], "margin")
    assert_close(ours["mean_reward"], log["mean_reward"], "mean_reward")
    assert 0.0 < ours["loss"] and abs(ours["margin"]) > 1e-3  # a real, non-degenerate comparison

    from alignkit.data.batches import encode_rm_pair
    from alignkit.data.formats import load_examples
    from alignkit.models import load_tokenizer

    tok = load_tokenizer(tiny_rm)
    mine = [encode_rm_pair(ex, tok) for ex in load_examples(data)]
    assert [m["chosen_ids"] for m in mine] == [p["chosen_ids"] for p in prepared]
    assert [m["rejected_ids"] for m in mine] == [p["rejected_ids"] for p in prepared]


def _sharegpt_to_trl(row: dict) -> dict:
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    prompt = [{"role": roles[t["from"]], "content": t["value"]} for t in row["conversations"]]
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": row["chosen"]["value"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]["value"]}],
    }


def test_reward_token_ids_on_real_sharegpt_file_match_trl(tiny_rm: str, shared_data: Path) -> None:
    """LLaMA-Factory's ShareGPT preference file, read unchanged, tokenises as TRL tokenises its converted rows."""
    from alignkit.data.batches import encode_rm_pair
    from alignkit.data.formats import load_examples
    from alignkit.models import load_tokenizer

    path = shared_data / "llamafactory" / "dpo_en_demo.json"
    raw = json.loads(path.read_text())[:12]
    tok = load_tokenizer(tiny_rm)
    ours = [encode_rm_pair(ex, tok) for ex in load_examples(str(path))[:12]]

    _, theirs = trl_first_step(
        "rm", tiny_rm, [_sharegpt_to_trl(r) for r in raw], train=False, max_length=None
    )
    assert [o["chosen_ids"] for o in ours] == [t["chosen_ids"] for t in theirs]
    assert [o["rejected_ids"] for o in ours] == [t["rejected_ids"] for t in theirs]
