"""PPO runs through the loop: training, logging, the critic, resume, LoRA, whitening, fillers; and the online
stages' refusals (no reward, eval rows)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from alignkit.errors import UserError
from tests.conftest import first_step, run_stage, write_jsonl
from tests.generation.test_online import PROMPTS


def test_ppo_trains_logs_saves_critic_and_resumes(tiny_model: str, tiny_rm: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    keys = {
        "stage": "ppo",
        "model_name_or_path": tiny_model,
        "dataset": data,
        "reward_model": tiny_rm,
        "per_device_train_batch_size": 4,
        "max_new_tokens": 4,
        "ppo_epochs": 2,
        "num_mini_batches": 2,
        "max_steps": 8,
        "save_steps": 4,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "target_kl": 0.1,
        "torch_dtype": "float32",
        "missing_eos_penalty": 1.0,
    }
    record, out = run_stage(tmp_path, keys)
    for key in (
        "reward/mean",
        "reward/std",
        "kl",
        "entropy",
        "policy/clipfrac",
        "policy/approxkl",
        "value/loss",
        "value/explained_variance",
        "response_length",
        "truncated_fraction",
        "kl_coef",
    ):
        assert key in record, key
    records = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    assert records[-1]["kl_coef"] != records[0]["kl_coef"]  # the adaptive controller moved
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
    critic = AutoModelForTokenClassification.from_pretrained(Path(out) / "value_model")
    assert critic.config.num_labels == 1
    assert (Path(out) / "checkpoint-4" / "value_model" / "model.safetensors").is_file()
    # resume from the step-4 checkpoint (a rollout boundary): runs to the end with the critic restored
    import shutil

    shutil.rmtree(Path(out) / "model.safetensors", ignore_errors=True)
    record2, _ = run_stage(tmp_path, {**keys, "resume_from_checkpoint": "auto"})
    again = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    assert [r["step"] for r in again] == list(range(1, 9))
    assert math.isfinite(record2["loss"])
    # the resumed run is the run it continues: the adaptive KL coefficient (saved with the checkpoint), the
    # mini-batch shuffle and the sampling pick up where they stopped
    state = json.loads((Path(out) / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["stage"]["kl_coef"] != keys.get("init_kl_coef", 0.05)
    for before, after in zip(records[4:], again[4:]):
        assert after["kl_coef"] == pytest.approx(before["kl_coef"], rel=1e-9)
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-4, abs=1e-6)


def test_ppo_evaluates_its_actor_on_held_out_prompts(tiny_model: str, tiny_rm: str, tmp_path: Path) -> None:
    """PPO with `eval_dataset`: its actor (not the critic) answers the held-out prompts greedily at step 0 and
    every `eval_steps`, scored by the reward model and `eval_reward_funcs`, with its log-ratio to the reference
    (0 at the start). Distillation refuses held-out data for now, before anything is written."""
    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    keys = {
        "stage": "ppo",
        "model_name_or_path": tiny_model,
        "dataset": data,
        "reward_model": tiny_rm,
        "eval_dataset": data,
        "eval_steps": 2,
        "eval_reward_funcs": "exact_match",
        "per_device_train_batch_size": 4,
        "max_new_tokens": 3,
        "max_steps": 2,
        "ppo_epochs": 1,
        "torch_dtype": "float32",
    }
    record, out = run_stage(tmp_path, keys)
    evals = [r for r in map(json.loads, open(Path(out) / "metrics.jsonl")) if "eval_reward" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert evals[0]["eval_kl"] == pytest.approx(0.0, abs=1e-5)
    for key in ("eval_reward/reward_model", "eval_exact_match", "eval_length"):
        assert key in record, key


def test_ppo_needs_a_reward(tiny_model: str, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    with pytest.raises(UserError, match="give `reward_funcs`.*and/or a `reward_model`"):
        run_stage(tmp_path, {"stage": "ppo", "model_name_or_path": tiny_model, "dataset": data})


def test_reward_model_scores_with_its_own_tokenizer(tiny_model: str, tiny_rm: str, tmp_path: Path) -> None:
    """A reward model whose tokenizer differs from the policy's reads text re-tokenised with its own."""
    from alignkit.generation.rewards import RewardModelScorer
    from alignkit.modeling.tiny import build_tokenizer

    other = tmp_path / "rm_other_tok"
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm)
    tok = build_tokenizer(vocab_size=300, seed=3)  # another vocabulary: ids differ from the policy's
    model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(other)
    tok.save_pretrained(other)
    scorer = RewardModelScorer(str(other))
    prompt = [{"role": "user", "content": "What is 2 + 2?"}]
    got = scorer([prompt], ["4"], torch.device("cpu"))
    ids = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "4"}], return_dict=True)[
        "input_ids"
    ]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0, 0]
    assert got[0].item() == pytest.approx(expected.item(), rel=1e-5)
    # PPO with it: the critic, which reads the policy's ids, starts from the policy instead
    from transformers import AutoModelForTokenClassification

    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    keys = {
        "stage": "ppo",
        "model_name_or_path": tiny_model,
        "dataset": data,
        "reward_model": str(other),
        "per_device_train_batch_size": 4,
        "max_new_tokens": 3,
        "max_steps": 1,
        "torch_dtype": "float32",
    }
    _, out = run_stage(tmp_path / "ppo", keys)
    critic = AutoModelForTokenClassification.from_pretrained(Path(out) / "value_model")
    assert critic.config.vocab_size == load_tokenizer_vocab(tiny_model)
    with pytest.raises(UserError, match="value_model_name_or_path: .* has another tokenizer than the policy"):
        run_stage(tmp_path / "ppo2", {**keys, "value_model_name_or_path": str(other)})


def load_tokenizer_vocab(path: str) -> int:
    from alignkit.modeling.load import load_tokenizer

    return len(load_tokenizer(path))


def test_ppo_with_lora_trains_the_adapters_and_the_critic_head(
    tiny_model: str, tiny_rm: str, tmp_path: Path
) -> None:
    """LoRA on actor and critic (the scalar head trained in full, never adapted); the reference is the base with
    the adapter off."""
    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    record, out = run_stage(
        tmp_path,
        {
            "stage": "ppo",
            "model_name_or_path": tiny_model,
            "dataset": data,
            "reward_model": tiny_rm,
            "finetuning_type": "lora",
            "per_device_train_batch_size": 4,
            "max_new_tokens": 3,
            "ppo_epochs": 1,  # a fresh rollout every step: the third sees the adapter's updates
            "max_steps": 3,
            "logging_steps": 1,
            "learning_rate": 1e-2,
            "torch_dtype": "float32",
        },
    )
    assert math.isfinite(record["loss"]) and record["kl"] != 0.0  # the adapter moved the policy off the base
    assert (Path(out) / "adapter_config.json").is_file() or (
        Path(out) / "adapter_model.safetensors"
    ).is_file()


def test_ppo_whitening_keeps_the_logged_reward_raw_and_the_entropy_bonus_enters_the_loss(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`whiten_rewards` changes what the policy is trained on, not what `reward/mean` reports; an entropy bonus
    moves the first step's loss by exactly -entropy_coef * entropy (same seed, same rollout)."""
    (tmp_path / "offset_rewards.py").write_text(
        "def five(prompts, completions, **kw):\n    return [5.0 + len(c) % 2 for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    keys = {
        "reward_funcs": ["offset_rewards:five"],
        "whiten_rewards": True,
        "max_new_tokens": 4,
        "ppo_epochs": 1,
        "num_mini_batches": 1,
    }
    base = first_step(tmp_path / "plain", "ppo", tiny_model, PROMPTS[:4], **keys)
    assert 5.0 <= base["reward/mean"] <= 6.0  # whitened, it would be 0
    bonus = first_step(tmp_path / "bonus", "ppo", tiny_model, PROMPTS[:4], entropy_coef=0.5, **keys)
    assert bonus["entropy"] == pytest.approx(base["entropy"], abs=1e-6) and base["entropy"] > 0.1
    assert bonus["loss"] == pytest.approx(base["loss"] - 0.5 * base["entropy"], abs=1e-5)


def test_empty_micro_batches_are_zero_weight_fillers(tiny_model: str, tiny_rm: str, tmp_path: Path) -> None:
    """PPO with 4 prompts, 2 mini-batches and 4 accumulation steps leaves 2 of the 4 micro-batches empty. They
    run at weight 0: the step equals the same rollout split into 2 micro-batches (loss, metrics, weights)."""
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    common = {
        "stage": "ppo",
        "model_name_or_path": tiny_model,
        "dataset": data,
        "reward_model": tiny_rm,
        "max_new_tokens": 4,
        "ppo_epochs": 1,
        "num_mini_batches": 2,
        "max_steps": 1,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "torch_dtype": "float32",
        "shuffle": False,
    }
    fillers, out_a = run_stage(
        tmp_path / "a", {**common, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4}
    )
    plain, out_b = run_stage(
        tmp_path / "b", {**common, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}
    )
    for key in ("loss", "reward/mean", "value/loss", "policy/clipfrac", "response_length"):
        assert fillers[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-7), key
    a, b = (
        load_file(str(Path(out_a) / "model.safetensors")),
        load_file(str(Path(out_b) / "model.safetensors")),
    )
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
