"""TRL 1.16 as the oracle: one optimizer step of its trainer, fp32 on CPU, batch in file order.

Only the tests import this (and TRL); alignkit never does.
"""

from __future__ import annotations

import tempfile

import pytest

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


def trl_first_step(
    kind: str, model_dir: str, rows: list[dict], train: bool = True, ref_dir: str | None = None, **kw
) -> tuple[dict, list]:
    """Run one step of TRL's trainer for `kind`; return its first log and its tokenised rows.

    `ref_dir` gives DPO/KTO an explicit reference model (by default TRL reloads the policy's checkpoint).
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_name, trainer_name = _TRAINERS[kind]
    config_cls, trainer_cls = getattr(trl, config_name), getattr(trl, trainer_name)
    args = config_cls(output_dir=tempfile.mkdtemp(), **{**_trl_common(), **kw})
    tok = AutoTokenizer.from_pretrained(model_dir)
    extra = {}
    if ref_dir is not None:
        extra["ref_model"] = AutoModelForCausalLM.from_pretrained(ref_dir)
    trainer = trainer_cls(
        model=model_dir, args=args, processing_class=tok, train_dataset=Dataset.from_list(rows), **extra
    )
    prepared = trainer.train_dataset.to_list()
    if not train:
        return {}, prepared
    trainer.train()
    return trainer.state.log_history[0], prepared
