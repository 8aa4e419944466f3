"""TRL 1.16 as the oracle for the online objectives: Online DPO's training step on fixed completions and fixed
rewards, and GKD's generalized Jensen-Shannon divergence; fp32 on CPU.

Only the tests import this (and TRL); alignkit never does.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # the oracle knows it imports `trl.experimental`
trl = pytest.importorskip("trl")


def trl_online_dpo_loss(
    model_dir: str,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    rewards: list[float],
    beta: float,
    loss_type: str = "sigmoid",
    ref_dir: str | None = None,
) -> dict[str, float]:
    """One `OnlineDPOTrainer.training_step` (via `train()`, max_steps=1) with generation replaced by the given rows.

    `prompt_ids`: B prompts of any lengths, left-padded here with the pad token (mask 0), as TRL's `_generate`
    pads them, then repeated twice (2B rows). `completion_ids`: 2B rows, row i and row i + B are the two
    completions of prompt i; they are right-padded with the pad token and passed through TRL's own
    `truncate_right`: the mask is 1 up to and including the first EOS (any of the model's eos ids) and the ids
    after it become pad. A row shorter than the longest must contain an EOS (as out of `generate`; otherwise
    `truncate_right` would count its pad tokens as completion). `rewards`: 2B floats, returned by the reward
    function (TRL casts them to float32; chosen is row i when reward[i] >= reward[i + B], so a tie picks the
    first). The reference is a copy of the policy, or the model in `ref_dir`. Returns the step's loss (the value
    `training_step` returned, not the log's 4-digit rounding) and TRL's `stats` for logps/rewards (means over B).
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
    from trl.experimental.utils import truncate_right

    n = len(prompt_ids)
    if len(completion_ids) != 2 * n or len(rewards) != 2 * n:
        raise ValueError(f"{n} prompts need 2*{n} completions and rewards")
    fixed_rewards = [float(r) for r in rewards]
    p_width = max(len(p) for p in prompt_ids)
    c_width = max(len(c) for c in completion_ids)

    def fixed_reward(completions: list, **_: object) -> list[float]:
        return list(fixed_rewards)

    args = OnlineDPOConfig(
        output_dir=tempfile.mkdtemp(),
        beta=beta,
        loss_type=loss_type,
        max_length=max(512, p_width + c_width),  # `_forward` left-truncates the prompt past max_length
        max_new_tokens=c_width,
        missing_eos_penalty=None,
        disable_dropout=True,
        model_init_kwargs={"dtype": "float32"},
        max_steps=1,
        logging_steps=1,
        report_to="none",
        per_device_train_batch_size=n,
        gradient_accumulation_steps=1,
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        seed=42,
        dataloader_num_workers=0,
        disable_tqdm=True,
        gradient_checkpointing=False,
    )
    extra = {}
    if ref_dir is not None:
        extra["ref_model"] = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    trainer = OnlineDPOTrainer(
        model=model_dir,
        reward_funcs=fixed_reward,
        args=args,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        train_dataset=Dataset.from_list([{"prompt": "unused"}] * n),
        **extra,
    )
    pad_id = trainer._tokenizer.pad_token_id
    eos_ids = trainer.eos_token_ids
    for row in completion_ids:
        if len(row) < c_width and not any(t in eos_ids for t in row):
            raise ValueError(f"completion {row} is shorter than the longest and has no EOS {eos_ids}")

    def fixed_generate(
        model: torch.nn.Module, prompts: list, images: object = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, None]:
        device = next(model.parameters()).device
        p_ids = torch.tensor([[pad_id] * (p_width - len(p)) + p for p in prompt_ids])  # (B, P)
        p_mask = torch.tensor([[0] * (p_width - len(p)) + [1] * len(p) for p in prompt_ids])  # (B, P)
        c_ids = torch.tensor([c + [pad_id] * (c_width - len(c)) for c in completion_ids])  # (2B, C)
        c_ids, c_mask = truncate_right(c_ids, eos_ids, pad_id)
        return (
            p_ids.repeat(2, 1).to(device),
            p_mask.repeat(2, 1).to(device),
            c_ids.to(device),
            c_mask.to(device),
            None,
        )

    trainer._generate = fixed_generate
    steps: list[tuple[float, dict[str, list[float]]]] = []
    training_step = trainer.training_step

    def recording(*a: object, **kw: object) -> torch.Tensor:
        loss = training_step(*a, **kw)
        steps.append((float(loss), {k: list(v) for k, v in trainer.stats.items()}))
        return loss

    trainer.training_step = recording
    trainer.train()
    assert len(steps) == 1  # one micro-batch, no accumulation
    loss, stats = steps[0]
    keys = ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins")
    return {"loss": loss, **{k: stats[k][0] for k in keys}}


def trl_gkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    beta: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """TRL's `GKDTrainer.generalized_jsd_loss(..., reduction="batchmean")`: a scalar.

    Logits (B, T, V) and labels (B, T) are already aligned (the trainer passes `logits[:, :-1]`, `labels[:, 1:]`);
    -100 labels are dropped. Both logits are divided by `temperature`; p_s, p_t are their softmaxes. Per token,
    summed over V: beta == 0 is the forward KL(p_t || p_s); beta == 1 the reverse KL(p_s || p_t); otherwise
    beta * KL(p_t || m) + (1 - beta) * KL(p_s || m) with m = beta * p_t + (1 - beta) * p_s (this tends to 0, not
    to the endpoint KLs, as beta -> 0 or 1). "batchmean" with labels divides the sum over kept tokens by the number
    of kept tokens (clamped to >= 1), i.e. a per-token mean, not a per-sequence one. `GKDTrainer.compute_loss`
    itself always uses temperature 1.0 here (its config temperature is only the sampling one).
    """
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer.generalized_jsd_loss(
        student_logits,
        teacher_logits,
        labels=labels,
        beta=beta,
        temperature=temperature,
        reduction="batchmean",
    )
