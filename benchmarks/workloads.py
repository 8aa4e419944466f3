"""The benchmark's workloads: each run once through alignkit and once through TRL 1.16 per setting.

Both tools read the same rows: alignkit reads the files as a user would; TRL gets the Examples alignkit's
reader made of them (conversational prompt / completion / chosen / rejected / label), so the text is the same
and only the tools differ. Batches are taken in file order by both.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import online
from harness import SHARED, count_through, peak_mb, train_alignkit

LF = SHARED / "llamafactory"


@dataclass
class Setting:
    tool: str  # alignkit | trl
    name: str
    keys: dict[str, Any] = field(default_factory=dict)


@dataclass
class Workload:
    stage: str  # alignkit's stage; TRL's trainer is picked from it
    data: str
    what: str  # one line for the table's caption
    settings: list[Setting]
    rm: bool = False  # starts from the seeded scalar-head model
    teacher: bool = False  # learns from a second model (another seed of the same shape)


NO_GC = {"gradient_checkpointing": False}
WORKLOADS: dict[str, Workload] = {
    "sft": Workload("sft", str(LF / "alpaca_en_demo.json"), "alpaca_en_demo, completion-only loss", [
        Setting("alignkit", "default"),
        Setting("alignkit", "padding_free", {"padding_free": True}),
        Setting("trl", "default"),
        Setting("trl", "no checkpointing + padding_free", {**NO_GC, "padding_free": True}),
    ]),
    "rm": Workload("rm", str(LF / "dpo_en_demo.json"), "dpo_en_demo pairs, Bradley-Terry", [
        Setting("alignkit", "default"),
        Setting("alignkit", "one padded batch", {"length_groups": False}),  # the default before length groups
        Setting("alignkit", "padding_free", {"padding_free": True}),
        Setting("alignkit", "gradient_checkpointing", {"gradient_checkpointing": True}),  # TRL's default's
        Setting("trl", "default"),
        Setting("trl", "no checkpointing", NO_GC),
    ], rm=True),
    "dpo": Workload("dpo", str(LF / "dpo_en_demo.json"), "dpo_en_demo pairs, sigmoid loss, reference = start", [
        Setting("alignkit", "default"),
        Setting("alignkit", "prefix_sharing", {"prefix_sharing": True}),
        Setting("alignkit", "precompute_ref_log_probs", {"precompute_ref_log_probs": True}),
        Setting("trl", "default"),
        Setting("trl", "no checkpointing + precompute_ref_log_probs",
                {**NO_GC, "precompute_ref_log_probs": True}),
    ]),
    "kto": Workload("kto", str(LF / "kto_en_demo.json"), "kto_en_demo rows that fit max_length, KL from mismatched completions", [
        Setting("alignkit", "default"),
        Setting("alignkit", "prefix_sharing", {"prefix_sharing": True}),
        Setting("trl", "default"),
        Setting("trl", "no checkpointing + precompute_ref_log_probs",
                {**NO_GC, "precompute_ref_log_probs": True}),
    ]),
    "grpo": Workload("grpo", str(online.GSM8K), "GSM8K prompts, 4 completions each, 64 new tokens, math reward", [
        Setting("alignkit", "default"),
        Setting("trl", "default"),
        Setting("trl", "no checkpointing", NO_GC),
    ]),
    "online_dpo": Workload("online_dpo", str(online.GSM8K), "GSM8K prompts, 2 completions each (best vs worst), 64 new tokens, math reward", [
        Setting("alignkit", "default"),
        Setting("trl", "default"),
        Setting("trl", "no checkpointing", NO_GC),
    ]),
    "distill": Workload("distill", str(LF / "alpaca_en_demo.json"), "GKD on the student's own samples (lmbda 1), 64 new tokens, JSD beta 0.5", [
        Setting("alignkit", "default", {"lmbda": 1.0}),
        Setting("trl", "default", {"lmbda": 1.0}),
        Setting("trl", "no checkpointing", {**NO_GC, "lmbda": 1.0}),
    ], teacher=True),
    "distill_kd": Workload("distill", str(LF / "alpaca_en_demo.json"), "GKD on the data's completions (lmbda 0): supervised KD, JSD beta 0.5", [
        Setting("alignkit", "default", {"lmbda": 0.0}),
        Setting("trl", "default", {"lmbda": 0.0}),
        Setting("trl", "no checkpointing", {**NO_GC, "lmbda": 0.0}),
    ], teacher=True),
}  # fmt: skip
ONLINE = {
    "grpo": (online.grpo_alignkit, online.grpo_trl),
    "online_dpo": (online.online_dpo_alignkit, online.online_dpo_trl),
}


def run(workload: str, setting: Setting, model_dir: str, args: Any, out: str) -> dict:
    """One side of one workload, in this (child) process: tokens, loop seconds, peak memory, first loss."""
    w = WORKLOADS[workload]
    if w.stage == "kto":  # both tools read the rows that fit, so neither drops any and both labels stay
        w = dataclasses.replace(w, data=rows_that_fit(w.data, model_dir, args.max_length, out))
    if workload in ONLINE:
        return ONLINE[workload][setting.tool == "trl"](model_dir, setting, args, out)
    if w.stage == "distill":  # both read the same conversations, those that fit max_length
        w = dataclasses.replace(
            w, data=rows_that_fit(as_messages(w.data, out), model_dir, args.max_length, out)
        )
        teacher = str(Path(model_dir).parent / "teacher")
        if setting.tool == "alignkit":
            return online.distill_alignkit(model_dir, setting, args, out, w.data, teacher)
        return online.distill_trl(model_dir, setting, args, out, trl_rows(w, _rows_used(args)), teacher)
    return (offline_alignkit if setting.tool == "alignkit" else offline_trl)(w, model_dir, setting, args, out)


def rows_that_fit(path: str, model_dir: str, max_length: int, out: str) -> str:
    """The rows of a messages-format file whose whole conversation (chat template applied) fits `max_length`
    tokens, in file order, written beside the run: a workload both tools train on without truncation."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    kept = [
        r
        for r in rows
        if len(tok.apply_chat_template(r["messages"], return_dict=True)["input_ids"]) <= max_length
    ]
    target = Path(out) / f"fit-{max_length}-{Path(path).name}"
    target.write_text(json.dumps(kept), encoding="utf-8")
    return str(target)


def as_messages(path: str, out: str) -> str:
    """An SFT file alignkit reads (alpaca here) as conversations (`messages`), written beside the run."""
    from alignkit.data.formats import load_examples

    rows = [{"messages": ex.prompt + ex.completion} for ex in load_examples(path)]
    target = Path(out) / f"messages-{Path(path).name}"
    target.write_text(json.dumps(rows), encoding="utf-8")
    return str(target)


def _common(args: Any) -> dict:
    return {"per_device_train_batch_size": args.batch, "max_length": args.max_length}


def _rows_used(args: Any) -> int:
    """Only the rows the steps train on are read (a precomputed reference pass covers the whole data set)."""
    return args.batch * args.steps


def offline_alignkit(w: Workload, model_dir: str, s: Setting, args: Any, out: str) -> dict:
    dtype = {"bf16": True} if args.gpu else {"torch_dtype": "float32"}
    keys = {"stage": w.stage, "model_name_or_path": model_dir, "dataset": w.data, **_common(args), **dtype}
    keys["max_samples"] = _rows_used(args)
    records = train_alignkit({**keys, **s.keys}, args.steps, out)
    last = records[-1]
    return {
        "tokens": last["num_tokens"],
        "loop_s": last["train_runtime"],
        "peak_mb": peak_mb(),
        "first_loss": records[0]["loss"],
    }


def trl_rows(w: Workload, n: int) -> list[dict]:
    """The first `n` Examples alignkit reads from the workload's file, in TRL's conversational columns."""
    from alignkit.data.formats import load_examples

    rows = []
    for ex in load_examples(w.data)[:n]:
        if ex.kind == "pair":
            rows.append({"prompt": ex.prompt, "chosen": ex.chosen, "rejected": ex.rejected})
        elif w.stage == "kto":
            rows.append({"prompt": ex.prompt, "completion": ex.completion, "label": bool(ex.label)})
        else:
            rows.append({"prompt": ex.prompt, "completion": ex.completion})
    return rows


TRL_CLASSES = {
    "sft": ("SFTConfig", "SFTTrainer"),
    "rm": ("RewardConfig", "RewardTrainer"),
    "dpo": ("DPOConfig", "DPOTrainer"),
    "kto": ("KTOConfig", "KTOTrainer"),
}


def _count_tokens(inputs: dict) -> int:
    """Real tokens in one of TRL's batches: its attention masks' sum (the input ids where it packs rows)."""
    # KTO's KL batch (mismatched completions, `KL_*` keys) is not counted: alignkit counts the policy's batch
    masks = [v for k, v in inputs.items() if k.endswith("attention_mask") and not k.startswith("KL_")]
    if masks:
        return int(sum(int(m.sum()) for m in masks))
    return int(inputs["input_ids"].numel())


def offline_trl(w: Workload, model_dir: str, s: Setting, args: Any, out: str) -> dict:
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer

    config_cls, trainer_cls = (getattr(trl, n) for n in TRL_CLASSES[w.stage])
    cfg = config_cls(
        output_dir=out,
        max_steps=args.steps,
        logging_steps=1,
        report_to="none",
        bf16=args.gpu,  # fp32 on CPU, as alignkit's default there
        use_cpu=not args.gpu,
        train_sampling_strategy="sequential",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **_common(args),
        **s.keys,
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    trainer = trainer_cls(
        model=model_dir,
        args=cfg,
        processing_class=tok,
        train_dataset=Dataset.from_list(trl_rows(w, _rows_used(args))),
    )
    tokens = count_through(trainer, "compute_loss", lambda model, inputs, *_, **__: _count_tokens(inputs))
    result = trainer.train()
    return {
        "tokens": tokens[0],
        "loop_s": result.metrics["train_runtime"],
        "peak_mb": peak_mb(),
        "first_loss": trainer.state.log_history[0]["loss"],
    }
