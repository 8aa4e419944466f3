"""TRL 1.16 as the oracle: one optimizer step of its trainer, fp32 (float64 on request) on CPU, batch in
file order.

Only the tests import this (and TRL); alignkit never does.
"""

from __future__ import annotations

import tempfile

import pytest
import torch

trl = pytest.importorskip("trl")


def _trl_common() -> dict:
    return dict(
        max_steps=1,
        logging_steps=1,
        report_to="none",
        per_device_train_batch_size=4,
        bf16=False,
        use_cpu=True,
        train_sampling_strategy="sequential",
        save_strategy="no",
        seed=42,
        dataloader_num_workers=0,
        disable_tqdm=True,
        gradient_checkpointing=False,
    )


_TRAINERS = {
    "sft": ("SFTConfig", "SFTTrainer"),
    "rm": ("RewardConfig", "RewardTrainer"),
    "dpo": ("DPOConfig", "DPOTrainer"),
    "kto": ("KTOConfig", "KTOTrainer"),
}


class _Float64LmHead:
    """Stands in for TRL's fused LM head kernel (`trl.kernels.ChunkedLogProbFunction`) under float64.

    TRL 1.16's kernel folds the logits into float32 accumulators whatever the model's dtype, so its "float64"
    log-probs are float32 values. This is the textbook definition in plain autograd ops and the inputs'
    dtype, with the kernel's signature and outputs (log_probs, entropy, log_sum_sq_probs, mean_logits,
    is_top1); everything else (batching, loss, metrics, optimizer step) stays TRL's.
    """

    @staticmethod
    def apply(
        hidden: torch.Tensor,  # (N, H)
        weight: torch.Tensor,  # (V, H)
        bias: torch.Tensor | None,
        targets: torch.Tensor,  # (N,)
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = (),
    ) -> tuple[torch.Tensor | None, ...]:
        z = torch.nn.functional.linear(hidden, weight, bias) * logit_scale  # (N, V)
        if final_logit_softcapping is not None:
            z = final_logit_softcapping * torch.tanh(z / final_logit_softcapping)
        z = z / temperature
        logp = torch.log_softmax(z, dim=-1)
        return (
            logp.gather(-1, targets[:, None]).squeeze(-1),
            -(logp.exp() * logp).sum(-1) if "entropy" in outputs else None,
            torch.logsumexp(2 * logp, dim=-1).detach() if "log_sum_sq_probs" in outputs else None,
            z.mean(-1).detach() if "mean_logits" in outputs else None,
            z.argmax(-1) == targets if "is_top1" in outputs else None,  # the first maximum, as the kernel's
        )


def trl_first_step(
    kind: str,
    model_dir: str,
    rows: list[dict],
    train: bool = True,
    ref_dir: str | None = None,
    dtype: torch.dtype | None = None,
    **kw,
) -> tuple[dict, list]:
    """Run one step of TRL's trainer for `kind`; return its first log and its tokenised rows.

    `ref_dir` gives DPO/KTO an explicit reference model (by default TRL reloads the policy's checkpoint).
    `dtype` loads policy and reference in it (TRL's default is float32). Under float64 the LM head kernel is
    `_Float64LmHead`, and the logged `loss` is the one `compute_loss` returned (the HF Trainer sums the
    logged loss in a float32 tensor).
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_name, trainer_name = _TRAINERS[kind]
    config_cls, trainer_cls = getattr(trl, config_name), getattr(trl, trainer_name)
    if dtype is not None:
        kw = {**kw, "model_init_kwargs": {"dtype": dtype}}
    args = config_cls(output_dir=tempfile.mkdtemp(), **{**_trl_common(), **kw})
    tok = AutoTokenizer.from_pretrained(model_dir)
    extra = {}
    if ref_dir is not None:
        extra["ref_model"] = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=dtype or torch.float32)
    trainer = trainer_cls(
        model=model_dir, args=args, processing_class=tok, train_dataset=Dataset.from_list(rows), **extra
    )
    prepared = trainer.train_dataset.to_list()
    if not train:
        return {}, prepared
    losses: list[torch.Tensor] = []
    compute_loss = trainer.compute_loss

    def recording(*args: object, **kwargs: object) -> object:
        out = compute_loss(*args, **kwargs)
        losses.append((out[0] if isinstance(out, tuple) else out).detach())
        return out

    trainer.compute_loss = recording
    with pytest.MonkeyPatch.context() as mp:
        if dtype == torch.float64:
            mp.setattr(trl.trainer.utils, "_ChunkedLogProbFunction", _Float64LmHead)
        trainer.train()
    log = trainer.state.log_history[0]
    if dtype == torch.float64:
        assert len(losses) == 1  # one micro-batch: its loss is the step's loss
        log = {**log, "loss": float(losses[0])}
    return log, prepared


def trl_grpo_loss(
    trainer_name: str,
    model_dir: str,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    advantages: list[float],
    old_logps: list[list[float]],
    ref_logps: list[list[float]],
    pad_id: int,
    **config: object,
) -> float:
    """TRL's loss (`GRPOTrainer` or `RLOOTrainer` `._compute_loss`) on given prompts (all the same length),
    right-padded completions, advantages and sampling / reference log-probs; one process, no accumulation."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    def no_reward(completions: list, **_: object) -> list[float]:
        return [0.0] * len(completions)

    config_cls, trainer_cls = {
        "grpo": (trl.GRPOConfig, trl.GRPOTrainer),
        "rloo": (trl.RLOOConfig, trl.RLOOTrainer),
    }[trainer_name]
    args = config_cls(
        output_dir=tempfile.mkdtemp(),
        report_to="none",
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=len(prompt_ids),
        num_generations=2,
        temperature=1.0,
        disable_tqdm=True,
        **config,
    )
    trainer = trainer_cls(
        model=model_dir,
        reward_funcs=no_reward,
        args=args,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        train_dataset=Dataset.from_list([{"prompt": "unused"}] * len(prompt_ids)),
    )
    width = max(len(c) for c in completion_ids)

    def right_pad(rows: list[list], value: float) -> torch.Tensor:
        return torch.tensor([r + [value] * (width - len(r)) for r in rows])

    mask = right_pad([[1] * len(c) for c in completion_ids], 0)
    inputs = {
        "prompt_ids": torch.tensor(prompt_ids),
        "prompt_mask": torch.ones(len(prompt_ids), len(prompt_ids[0]), dtype=torch.long),
        "completion_ids": right_pad(completion_ids, pad_id),
        "completion_mask": mask,
        "advantages": torch.tensor(advantages),
        "old_per_token_logps": right_pad(old_logps, 0.0).float(),
        "ref_per_token_logps": right_pad(ref_logps, 0.0).float(),
        "num_items_in_batch": mask.sum(),
        "old_logps": torch.tensor([sum(r) for r in old_logps]),  # RLOO's: per sequence
    }
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    with torch.no_grad():
        return float(trainer._compute_loss(trainer.model, inputs))
