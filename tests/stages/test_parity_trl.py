"""Same model, rows, batch and hyperparameters as TRL 1.16 -> the same token ids and first-step numbers.

TRL is the oracle here only; alignkit never imports it. Both sides run fp32 on CPU, batch in file order;
the float64 tests run both sides in float64, where rounding vanishes and a real difference would remain.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import first_step, write_jsonl
from tests.trl_oracle import trl_first_step, trl_grpo_loss

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
    from alignkit.modeling.load import load_tokenizer

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
    from alignkit.modeling.load import load_tokenizer

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
    from alignkit.modeling.load import load_tokenizer

    path = shared_data / "llamafactory" / "dpo_en_demo.json"
    raw = json.loads(path.read_text())[:12]
    tok = load_tokenizer(tiny_rm)
    ours = [encode_rm_pair(ex, tok) for ex in load_examples(str(path))[:12]]

    _, theirs = trl_first_step(
        "rm", tiny_rm, [_sharegpt_to_trl(r) for r in raw], train=False, max_length=None
    )
    assert [o["chosen_ids"] for o in ours] == [t["chosen_ids"] for t in theirs]
    assert [o["rejected_ids"] for o in ours] == [t["rejected_ids"] for t in theirs]


@pytest.mark.parametrize(
    "loss_type,trl_config",
    [
        ("grpo", {"loss_type": "grpo"}),
        ("grpo", {"loss_type": "grpo", "use_bias_correction_kl": False}),
        ("dr_grpo", {"loss_type": "dr_grpo"}),
        ("dapo", {"loss_type": "dapo", "epsilon_high": 0.28}),
        ("gspo", {"loss_type": "grpo", "importance_sampling_level": "sequence"}),
        ("rloo", {}),
    ],
)
def test_grpo_family_loss_matches_trl(
    loss_type: str, trl_config: dict, tiny_model: str, tmp_path: Path
) -> None:
    """The same completions, advantages and sampling / reference log-probs through alignkit's GRPO stage
    (`collate` -> `step`, divided by `count`) and TRL's `GRPOTrainer._compute_loss`, with beta 0.04 (KL with
    and without the importance-ratio bias correction). The
    sampling log-probs are the model's own, perturbed, so ratios straddle the clip range."""
    import torch

    from alignkit.config import build_config
    from alignkit.generation.rollout import sequences
    from alignkit.modeling.logprobs import completion_token_stats
    from alignkit.stages import get_stage

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 500, (6,), generator=g).tolist() for _ in range(4)]
    completions = [torch.randint(5, 500, (n,), generator=g).tolist() for n in (3, 5, 2, 4)]
    advantages = [0.7, -1.3, 1.1, -0.4]
    epsilon_high = trl_config.get("epsilon_high", 0.2)
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 1 + 1?"}])
    cfg = build_config(
        {
            "stage": "grpo",
            "model_name_or_path": tiny_model,
            "dataset": data,
            "output_dir": str(tmp_path / "out"),
            "loss_type": loss_type,
            "reward_funcs": ["length"],
            "beta": 0.04,
            "epsilon_high": epsilon_high,
            "use_bias_correction_kl": trl_config.get("use_bias_correction_kl", True),
            "max_new_tokens": 5,
            "torch_dtype": "float32",
        }
    )
    stage = get_stage("grpo")(cfg)
    stage.build()
    model = stage.model
    seq = sequences(prompts, completions, stage.tokenizer.pad_token_id)
    with torch.no_grad():
        true = completion_token_stats(
            model, seq["input_ids"], seq["attention_mask"], seq["completion_mask"]
        ).logps
    old = (true + 0.3 * torch.randn(true.shape, generator=g)).tolist()
    ref = (true + 0.5 * torch.randn(true.shape, generator=g)).tolist()
    old_rows, ref_rows, pos = [], [], 0
    for c in completions:
        old_rows.append(old[pos : pos + len(c)])
        ref_rows.append(ref[pos : pos + len(c)])
        pos += len(c)
    samples = [
        {
            "prompt_ids": p,
            "completion_ids": c,
            "advantage": a,
            "reward": 0.0,
            "truncated": False,
            "zero_std": False,
            "old_logps": o,
            **({} if loss_type == "rloo" else {"ref_logps": r}),  # RLOO's KL is in its reward, not its loss
        }
        for p, c, a, o, r in zip(prompts, completions, advantages, old_rows, ref_rows)
    ]
    batch = stage.collate(samples)
    model.train()
    with torch.no_grad():
        out = stage.step(model, batch)
    ours = float(out.loss_sum) / stage.count(batch)
    assert float(out.metrics["clip_ratio"][0]) > 0  # the clip range is exercised
    theirs = trl_grpo_loss(
        "rloo" if loss_type == "rloo" else "grpo",
        tiny_model,
        prompts,
        completions,
        advantages,
        old_rows,
        ref_rows,
        stage.tokenizer.pad_token_id,
        beta=0.04,
        epsilon=0.2,
        max_completion_length=5,
        **trl_config,
    )
    assert_close(ours, theirs, f"{loss_type} loss")


def _long_chinese_pairs(shared_data: Path, tok: object, n: int = 8) -> list[dict]:
    """n conversational pairs from the Chinese rows of LLaMA-Factory's identity set, read in place: a prompt
    of question-answer rows up to ~580 tokens, chosen and rejected of answers up to ~420 each (~1,000 tokens
    per sequence with the tiny byte-level tokenizer; each CJK character is ~3 tokens)."""
    data = json.loads((shared_data / "llamafactory" / "identity.json").read_text(encoding="utf-8"))
    zh = [r for r in data if re.search("[\u4e00-\u9fff]", r["output"])]
    pos = 0

    def take(budget: int, text_of: Callable[[dict], str]) -> str:
        nonlocal pos
        parts: list[str] = []
        while len(tok("\n".join(parts + [text_of(zh[pos % len(zh)])]))["input_ids"]) <= budget:
            parts.append(text_of(zh[pos % len(zh)]))
            pos += 1
        return "\n".join(parts)

    pairs = []
    for _ in range(n):
        prompt = take(580, lambda r: f"{r['instruction']}\n{r['output']}")
        chosen, rejected = take(420, lambda r: r["output"]), take(420, lambda r: r["output"])
        pairs.append(
            {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return pairs


# Computed in float64 on both sides but logged through one float32 rounding (<= 6e-8 relative): alignkit's
# loop sums the logged loss as float32 (alignkit/training/loop.py), TRL divides token counts in float32.
FLOAT32_LOGGED = {"loss": 1e-7, "mean_token_accuracy": 1e-7}


@pytest.mark.parametrize("case", ["conversational", "long_chinese"])
def test_dpo_float64_first_step_matches_trl(
    case: str, tiny_model: str, tiny_ref: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Both sides in float64, where rounding vanishes: loss, grad norm and every metric (`rewards/margins`,
    a small difference of large sums, included) agree to 1e-8 (two logged through float32: 1e-7). The long
    case is batch 8 of ~1,000-token Chinese rows; in float32 its margins differ by up to ~1e-3 relative."""
    import torch

    from alignkit.modeling.load import load_tokenizer
    from tests.stages.test_dpo import CONV, METRICS

    if case == "long_chinese":
        rows = _long_chinese_pairs(request.getfixturevalue("shared_data"), load_tokenizer(tiny_model))
    else:
        rows = CONV
    keys = {"beta": 0.1, "loss_type": ["sigmoid"], "per_device_train_batch_size": len(rows)}
    log, prepared = trl_first_step(
        "dpo", tiny_model, rows, ref_dir=tiny_ref, dtype=torch.float64, max_length=None, **keys
    )
    # the short case also through the precomputed-reference cache, which must keep float64 digits too
    variants = [{}] if case == "long_chinese" else [{}, {"precompute_ref_log_probs": True}]
    for i, variant in enumerate(variants):
        ours = first_step(
            tmp_path / str(i),
            "dpo",
            tiny_model,
            rows,
            ref_model_name_or_path=tiny_ref,
            torch_dtype="float64",
            max_length=4096,
            **keys,
            **variant,
        )
        for name in ("loss", "grad_norm", *METRICS):
            rel = FLOAT32_LOGGED.get(name, 1e-8)
            assert ours[name] == pytest.approx(log[name], rel=rel, abs=1e-12), (
                f"{variant} {name}: alignkit {ours[name]!r} vs TRL {log[name]!r}"
            )
    assert abs(log["rewards/margins"]) > 1e-3  # a reference that differs, so the comparison has teeth
    longest = max(len(p["prompt_ids"]) + len(p["chosen_ids"]) for p in prepared)
    if case == "long_chinese":
        assert len(rows) == 8 and 900 <= longest <= 1024, longest


def test_auto_dtype_keeps_a_float64_checkpoint_in_float64(tiny_model: str, tmp_path: Path) -> None:
    """`torch_dtype: auto` follows a float64 checkpoint (it ran it in float32); float32 stays float32, and
    `bf16: true` still asks for bfloat16. float64 with bf16 / fp16 autocast is refused."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.config import BaseConfig, build_config
    from alignkit.errors import UserError
    from alignkit.modeling.load import load_policy, torch_dtype

    f64 = str(tmp_path / "f64")
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64).save_pretrained(f64)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(f64)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q", "chosen": " a", "rejected": " b"}])

    def cfg(model: str, **keys: object) -> BaseConfig:
        base = {"stage": "dpo", "model_name_or_path": model, "dataset": data, "output_dir": str(tmp_path)}
        return build_config({**base, **keys})

    assert torch_dtype(cfg(f64)) == torch.float64
    assert next(load_policy(cfg(f64)).parameters()).dtype == torch.float64
    assert torch_dtype(cfg(tiny_model)) == torch.float32
    assert torch_dtype(cfg(f64, bf16=True)) == torch.bfloat16
    assert torch_dtype(cfg(tiny_model, torch_dtype="float64")) == torch.float64
    with pytest.raises(UserError, match=r"`torch_dtype: float64` with `bf16: true`"):
        cfg(tiny_model, torch_dtype="float64", bf16=True)


@pytest.mark.slow
def test_dpo_first_step_on_the_real_model_matches_trl(smollm2: str, tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct with its real chat template and tokenizer, in float32, against a reference that
    differs from it (a random LoRA merged in, so the margins are not zero): loss, grad norm and every metric
    within 1e-4 relative of TRL 1.16's first step."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.stages.test_dpo import CONV, METRICS

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ref = get_peft_model(AutoModelForCausalLM.from_pretrained(smollm2), lora)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.mul_(0.2)
    ref_dir = tmp_path / "ref"
    ref.merge_and_unload().save_pretrained(ref_dir)
    keys = {"beta": 0.1, "loss_type": ["sigmoid"], "per_device_train_batch_size": len(CONV)}
    log, _ = trl_first_step("dpo", smollm2, CONV, ref_dir=str(ref_dir), max_length=None, **keys)
    ours = first_step(tmp_path / "ours", "dpo", smollm2, CONV, ref_model_name_or_path=str(ref_dir), **keys)
    for name in ("loss", "grad_norm", *METRICS):
        assert ours[name] == pytest.approx(log[name], rel=1e-4, abs=1e-6), (
            f"{name}: {ours[name]!r} vs {log[name]!r}"
        )
    assert abs(log["rewards/margins"]) > 1e-3  # the reference differs: the comparison has teeth
