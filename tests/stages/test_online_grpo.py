"""GRPO family runs through the loop: each loss type trains and logs, its loss on a fixed rollout, a variant
registered from outside trains with the stage untouched, RLOO's KL in the reward, bad inputs and config errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from alignkit.errors import UserError
from alignkit.losses.rl import (
    GRPO_LOSSES,
    GRPOLossSpec,
    grpo_policy_loss,
    k3_kl,
    register_policy_loss,
    sequence_mean_ratio,
    token_mean,
)
from tests.conftest import run_stage, write_jsonl
from tests.generation.test_online import PROMPTS
from tests.losses.test_rl import WRITTEN_OUT


@pytest.mark.parametrize(
    "loss_type,extra",
    [
        ("grpo", {}),
        ("dr_grpo", {}),
        ("dapo", {"epsilon_high": 0.28, "overlong_buffer_len": 2}),
        ("gspo", {"num_iterations": 2}),
        ("rloo", {"beta": 0.05}),
    ],
)
def test_grpo_family_trains_and_logs(loss_type: str, extra: dict, tiny_model: str, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    keys = {
        "stage": "grpo",
        "model_name_or_path": tiny_model,
        "dataset": data,
        "loss_type": loss_type,
        "reward_funcs": ["exact_match", "length"],
        "reward_weights": [1.0, 0.1],
        "length_target": 2,
        "num_generations": 4,
        "per_device_train_batch_size": 2,
        "max_new_tokens": 4,
        "max_steps": 2,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "torch_dtype": "float32",
        **extra,
    }
    record, out = run_stage(tmp_path, keys)
    records = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    assert len(records) == 2
    for key in (
        "reward/mean",
        "reward/std",
        "rewards/exact_match/mean",
        "rewards/length/mean",
        "frac_reward_zero_std",
        "clip_ratio",
        "entropy",
        "completion_length",
        "truncated_fraction",
    ):
        assert key in record, key
    assert record["rewards/length/mean"] <= 0.0 and 0 < record["completion_length"] <= 4
    assert ("kl" in record) == ("beta" in extra)
    if loss_type == "dapo":
        assert "rewards/overlong/mean" in record
    if loss_type == "gspo":  # the second update of a rollout reuses it with importance ratios
        assert records[1]["step"] == 2


def _fixed_completions(tiny_model: str) -> tuple[list[list[int]], list[list[int]], torch.Tensor]:
    """2 prompts x 2 completions of 1-4 tokens, and the policy's log-prob of each completion token at
    temperature 0.7, row by row, (10,), by a plain forward pass."""
    from transformers import AutoModelForCausalLM

    from alignkit.data.batches import tokenize_chat
    from alignkit.modeling.load import load_tokenizer

    tok, model = load_tokenizer(tiny_model), AutoModelForCausalLM.from_pretrained(tiny_model)
    prompts = [tokenize_chat(tok, r["prompt"], add_generation_prompt=True) for r in PROMPTS[:2]]
    prompt_ids = [prompts[0], prompts[0], prompts[1], prompts[1]]
    completions = [[11, 12], [13, 14, 15], [16], [17, 18, 19, 20]]
    logps = []
    with torch.no_grad():
        for p, c in zip(prompt_ids, completions):
            logits = model(input_ids=torch.tensor([p + c])).logits[0] / 0.7
            logps += [torch.log_softmax(logits[len(p) - 1 + t], -1)[c_t] for t, c_t in enumerate(c)]
    return prompt_ids, completions, torch.stack(logps)


@pytest.mark.parametrize("loss_type", list(WRITTEN_OUT))
def test_grpo_family_loss_on_a_fixed_rollout_is_the_pure_functions(
    loss_type: str, tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fixed rollout (2 prompts x 2 completions of 1-4 tokens, advantages, sampling-time and reference
    log-probs): the loss the loop logs is `grpo_policy_loss` (checked by hand in tests/losses/test_rl.py) of this
    type's pieces (written out there, not read from the registry) on the policy's log-probs, computed here by a
    plain forward pass at the sampling temperature, divided by the completions (tokens, for DAPO); and it is no
    other type's value."""
    from alignkit.stages.grpo import GRPOStage

    prompt_ids, completions, logps = _fixed_completions(tiny_model)
    rows = torch.tensor([i for i, c in enumerate(completions) for _ in c])
    old = logps - torch.log(torch.tensor([1.5, 0.9, 1.0, 1.3, 0.7, 1.1, 0.85, 1.25, 0.95, 1.05]))  # ratios
    ref = logps + torch.tensor([0.3, -0.2, 0.1, 0.0, -0.4, 0.25, 0.05, -0.1, 0.2, -0.3])
    adv = torch.tensor([1.0, -2.0, 0.5, -0.5])
    # a KL in the reward (RLOO) comes before the advantages, which are fixed here: none
    beta = 0.0 if WRITTEN_OUT[loss_type].kl_in_reward else 0.1
    buffer = [
        {
            "prompt_ids": p,
            "completion_ids": c,
            "advantage": float(adv[i]),
            "old_logps": old[rows == i].tolist(),
            **({"ref_logps": ref[rows == i].tolist()} if beta else {}),
            "reward": 0.0,
            "truncated": False,
            "zero_std": 0.0,
        }
        for i, (p, c) in enumerate(zip(prompt_ids, completions))
    ]
    monkeypatch.setattr(GRPOStage, "rollout", lambda self, model, rows, device: [dict(s) for s in buffer])
    record, _ = run_stage(
        tmp_path,
        {
            "stage": "grpo",
            "model_name_or_path": tiny_model,
            "dataset": write_jsonl(tmp_path / "p.jsonl", PROMPTS),
            "loss_type": loss_type,
            "reward_funcs": ["exact_match"],
            "num_generations": 2,
            "per_device_train_batch_size": 2,
            "max_new_tokens": 4,
            "temperature": 0.7,
            "beta": beta,
            "epsilon_high": 0.28,  # clip-higher, as DAPO (the 1.25 ratio is inside it, 1.3 outside)
            "max_steps": 1,
            "logging_steps": 1,
            "torch_dtype": "float32",
        },
    )

    def expected(spec: GRPOLossSpec) -> float:
        kl_ref = ref if beta and not spec.kl_in_reward else None
        loss, _, _ = grpo_policy_loss(logps, old, adv, rows, spec, 0.2, 0.28, 4, kl_ref, beta)
        return loss.item() / (10 if spec.average_over == "tokens" else 4)

    assert record["loss"] == pytest.approx(expected(WRITTEN_OUT[loss_type]), rel=1e-5, abs=1e-6)
    for other, spec in WRITTEN_OUT.items():
        if other != loss_type:
            assert abs(record["loss"] - expected(spec)) > 1e-3, other
    if beta:
        assert record["kl"] == pytest.approx(k3_kl(logps, ref).mean().item(), rel=1e-5)


def test_a_registered_variant_trains_with_the_stage_untouched(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A toy GRPO-family objective, one new piece (the sign of the centred reward as advantage) and registered
    ones (GSPO's sequence-mean ratio, DAPO's token mean), registered through `register_policy_loss`:
    `loss_type: toy` validates and trains a step. At the first update every ratio is 1, so each completion's
    surrogate is -A, in {-1, 0, 1}: the toy advantages reached the loss; and the logged loss is the
    aggregation's sums over the global batch's tokens, as `average_over` says."""
    seen: list[tuple[float, int]] = []  # (loss sum, tokens) per micro-batch
    surrogates: list[float] = []

    def sign_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
        r = rewards.view(-1, num_generations)  # (groups, G)
        return torch.sign(r - r.mean(dim=1, keepdim=True)).reshape(-1)

    def spied_token_mean(
        token_loss: torch.Tensor, seq_loss: torch.Tensor, rows: torch.Tensor, max_new_tokens: int
    ) -> torch.Tensor:
        out = token_mean(token_loss, seq_loss, rows, max_new_tokens)
        seen.append((out.item(), token_loss.numel()))
        surrogates.extend(seq_loss.tolist())
        return out

    (tmp_path / "varied_rewards.py").write_text(
        "def char_sum(prompts, completions, **kw):\n    return [float(sum(map(ord, c)) % 7) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    toy = GRPOLossSpec(sign_advantages, sequence_mean_ratio, spied_token_mean, average_over="tokens")
    try:
        register_policy_loss("toy", toy)
        record, _ = run_stage(
            tmp_path,
            {
                "stage": "grpo",
                "model_name_or_path": tiny_model,
                "dataset": write_jsonl(tmp_path / "p.jsonl", PROMPTS),
                "loss_type": "toy",
                "reward_funcs": ["varied_rewards:char_sum"],
                "num_generations": 4,
                "per_device_train_batch_size": 2,
                "max_new_tokens": 4,
                "max_steps": 1,
                "logging_steps": 1,
                "torch_dtype": "float32",
            },
        )
    finally:
        GRPO_LOSSES.pop("toy", None)
    assert surrogates and set(surrogates) <= {-1.0, 0.0, 1.0} and any(surrogates)
    assert record["loss"] == pytest.approx(sum(s for s, _ in seen) / sum(n for _, n in seen), rel=1e-5)
    assert record["loss"] != 0.0


def test_grpo_learns_a_verifiable_reward(tiny_model: str, tmp_path: Path) -> None:
    """A reward for completions that stop at once: GRPO raises it within a few steps."""
    mod = tmp_path / "stop_reward.py"
    mod.write_text(
        "def short(prompts, completions, **kw):\n    return [1.0 if len(c) <= 1 else 0.0 for c in completions]\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        data = write_jsonl(tmp_path / "p.jsonl", PROMPTS * 4)
        keys = {
            "stage": "grpo",
            "model_name_or_path": tiny_model,
            "dataset": data,
            "reward_funcs": ["stop_reward:short"],
            "num_generations": 8,
            "per_device_train_batch_size": 4,
            "max_new_tokens": 3,
            "max_steps": 12,
            "logging_steps": 1,
            "learning_rate": 3e-3,
            "torch_dtype": "float32",
            "temperature": 1.0,
        }
        _, out = run_stage(tmp_path, keys)
    finally:
        sys.path.remove(str(tmp_path))
    records = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    first = sum(r["reward/mean"] for r in records[:3]) / 3
    last = sum(r["reward/mean"] for r in records[-3:]) / 3
    assert last > first + 0.2, (first, last)


def test_grpo_bad_inputs(tiny_model: str, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q"}])
    base = {"stage": "grpo", "model_name_or_path": tiny_model, "dataset": data, "max_steps": 1}
    with pytest.raises(UserError, match="`num_generations` must be >= 2"):
        run_stage(tmp_path / "a", {**base, "reward_funcs": ["exact_match"], "num_generations": 1})
    with pytest.raises(UserError, match="reward function `exact_match` needs the column `answer`"):
        run_stage(tmp_path / "b", {**base, "reward_funcs": ["exact_match"]})
    with pytest.raises(UserError, match="give `reward_funcs`"):
        run_stage(tmp_path / "c", base)
    empty = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "Q"}, {"prompt": ""}])
    with pytest.raises(UserError, match=r"e.jsonl line 2: the prompt is empty"):
        run_stage(tmp_path / "d", {**base, "dataset": empty, "reward_funcs": ["length"]})


@pytest.mark.parametrize(
    "stage,keys,message",
    [
        ("ppo", {"reward_weights": [1.0, 2.0, 3.0]}, r"`reward_weights` has 3 values for 1 rewards"),
        ("ppo", {"rollout_backend": "vlm"}, r"`rollout_backend: vlm` is not valid \(did you mean `vllm`\?\)"),
        ("grpo", {"temperature": 0.0}, r"`temperature` must be > 0"),
        ("grpo", {"top_p": 0.0}, r"`top_p` must be in \(0, 1\]"),
        ("grpo", {"max_new_tokens": 0}, r"`max_new_tokens` >= 1"),
        ("grpo", {"epsilon": -0.1}, r"`epsilon` and `epsilon_high` must be >= 0"),
        ("grpo", {"stop_strings": [""]}, r"`stop_strings` must not contain an empty string"),
        ("ppo", {"target_kl": 0.0}, r"`target_kl` must be > 0"),
        ("ppo", {"lam": 1.5}, r"`gamma` and `lam` must be in \[0, 1\]"),
        ("ppo", {"cliprange_value": -1.0}, r"`cliprange_value` must be >= 0"),
        ("ppo", {"num_mini_batches": 16}, r"`num_mini_batches` \(16\) is larger than the rollout batch"),
    ],
)
def test_online_config_errors(stage: str, keys: dict, message: str, tiny_model: str, tmp_path: Path) -> None:
    from alignkit.config import build_config

    base = {
        "stage": stage,
        "model_name_or_path": tiny_model,
        "dataset": "d.jsonl",
        "reward_funcs": ["exact_match"],
        "per_device_train_batch_size": 8,
    }
    with pytest.raises(UserError, match=message):
        build_config({**base, **keys})


def test_gsm8k_prompts_flow_into_grpo(shared_data: Path, tiny_model: str, tmp_path: Path) -> None:
    """The real GSM8K file as prompt-only data: questions become prompts, `answer` reaches math_accuracy."""
    record, _ = run_stage(
        tmp_path,
        {
            "stage": "grpo",
            "model_name_or_path": tiny_model,
            "dataset": str(shared_data / "gsm8k" / "test.jsonl"),
            "max_length": 512,
            "reward_funcs": ["math_accuracy"],
            "num_generations": 2,
            "per_device_train_batch_size": 2,
            "max_new_tokens": 3,
            "max_steps": 1,
            "torch_dtype": "float32",
        },
    )
    assert record["rewards/math_accuracy/mean"] == 0.0  # a random tiny model does not solve GSM8K
    assert record["truncated_fraction"] > 0.5 and record["frac_reward_zero_std"] == 1.0


def test_rloo_penalises_the_sequence_kl_in_the_reward_before_the_baseline(
    tiny_model: str, tiny_ref: str, tmp_path: Path
) -> None:
    """RLOO (Ahmadian et al. 2024; TRL's RLOOTrainer): r_i - beta * sum_t (log pi - log ref), then the
    leave-one-out baseline; the loss gets no KL term."""
    from alignkit.config import build_config
    from alignkit.stages import get_stage

    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    cfg = build_config(
        {
            "stage": "grpo",
            "model_name_or_path": tiny_model,
            "ref_model_name_or_path": tiny_ref,
            "dataset": data,
            "output_dir": str(tmp_path / "out"),
            "loss_type": "rloo",
            "beta": 0.5,
            "reward_funcs": ["length"],
            "length_target": 2,
            "num_generations": 4,
            "max_new_tokens": 4,
            "torch_dtype": "float32",
        }
    )
    stage = get_stage("grpo")(cfg)
    stage.build()
    torch.manual_seed(0)
    buffer = stage.rollout(stage.model, stage.train_rows[:2], torch.device("cpu"))
    assert len(buffer) == 8 and all("ref_logps" not in s for s in buffer)
    assert all(
        s["kl"] == pytest.approx(sum(s["old_logps"]) - sum(_ref_logps(stage, s)), abs=1e-4) for s in buffer
    )
    assert any(abs(s["kl"]) > 0.1 for s in buffer)  # the reference differs from the policy
    for group in (buffer[:4], buffer[4:]):
        penalised = [s["reward"] - 0.5 * s["kl"] for s in group]
        for i, s in enumerate(group):
            others = [p for j, p in enumerate(penalised) if j != i]
            assert s["advantage"] == pytest.approx(penalised[i] - sum(others) / 3, abs=1e-4)
    batch = stage.collate(buffer)
    assert "ref_logps" not in batch and stage.count(batch) == 8
    assert stage.step(stage.model, batch).metrics["kl"][0].item() == pytest.approx(
        sum(s["kl"] for s in buffer), abs=1e-3
    )


def _ref_logps(stage, sample: dict) -> list[float]:  # noqa: ANN001
    """The reference's completion log-probs for one sample, computed afresh."""
    batch = stage.sequence_batch([sample])
    with torch.no_grad(), stage.reference.active(stage.model, torch.device("cpu")) as ref:
        return stage.token_stats(ref, batch).logps.tolist()
