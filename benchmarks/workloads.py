"""The benchmark's workloads: each run once through alignkit and once through TRL 1.16 per setting.

Both tools read the same rows: alignkit reads the files as a user would; TRL gets the Examples alignkit's
reader made of them (conversational prompt / completion / chosen / rejected / label), so the text is the same
and only the tools differ. Batches are taken in file order by both.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import SHARED, PhaseTimer, peak_mb, train_alignkit

LF = SHARED / "llamafactory"
GSM8K = SHARED / "gsm8k" / "train.jsonl"


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
        Setting("alignkit", "padding_free", {"padding_free": True}),
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
    "grpo": Workload("grpo", str(GSM8K), "GSM8K prompts, 4 completions each, 64 new tokens, math reward", [
        Setting("alignkit", "default"),
        Setting("trl", "default"),
        Setting("trl", "no checkpointing", NO_GC),
    ]),
}  # fmt: skip


def run(workload: str, setting: Setting, model_dir: str, args: Any, out: str) -> dict:
    """One side of one workload, in this (child) process: tokens, loop seconds, peak memory, first loss."""
    w = WORKLOADS[workload]
    if w.stage == "kto":  # both tools read the rows that fit, so neither drops any and both labels stay
        w = dataclasses.replace(w, data=rows_that_fit(w.data, model_dir, args.max_length, out))
    if workload == "grpo":
        return (grpo_alignkit if setting.tool == "alignkit" else grpo_trl)(model_dir, setting, args, out)
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
    tokens = [0]
    compute_loss = trainer.compute_loss

    def counting(model: Any, inputs: dict, *a: Any, **kw: Any) -> Any:
        tokens[0] += _count_tokens(inputs)
        return compute_loss(model, inputs, *a, **kw)

    trainer.compute_loss = counting
    result = trainer.train()
    return {
        "tokens": tokens[0],
        "loop_s": result.metrics["train_runtime"],
        "peak_mb": peak_mb(),
        "first_loss": trainer.state.log_history[0]["loss"],
    }


def grpo_alignkit(model_dir: str, s: Setting, args: Any, out: str) -> dict:
    dtype = {"bf16": True} if args.gpu else {"torch_dtype": "float32"}
    keys = {
        "stage": "grpo",
        "model_name_or_path": model_dir,
        "dataset": str(GSM8K),
        "reward_funcs": ["math_accuracy"],
        "num_generations": args.generations,
        "per_device_train_batch_size": args.batch,
        "max_new_tokens": args.max_new_tokens,
        "max_length": 1024,  # no GSM8K prompt is dropped (TRL does not truncate prompts)
        "loss_type": "grpo",
        "learning_rate": 1e-6,
        **dtype,
        **s.keys,
    }
    from alignkit.stages.grpo import GRPOStage

    timer = PhaseTimer(GRPOStage, "rollout")
    records = train_alignkit(keys, args.steps, out)
    length = sum(r["completion_length"] for r in records) / len(records)
    loop_s = records[-1]["train_runtime"]
    return {
        "tokens": records[-1]["num_tokens"],
        "loop_s": loop_s,
        "peak_mb": peak_mb(),
        "first_loss": records[0]["loss"],
        "completion_length": length,
        **timer.split(loop_s, length * args.batch * args.generations * args.steps),
    }


def grpo_trl(model_dir: str, s: Setting, args: Any, out: str) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from alignkit.generation.rewards import math_accuracy

    def reward(prompts: list, completions: list, answer: list, **_: object) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return math_accuracy(prompts, texts, answer)

    rows = [json.loads(line) for line in GSM8K.open()][: args.batch * args.steps]
    data = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]} for r in rows]
    )
    cfg = GRPOConfig(
        output_dir=out,
        max_steps=args.steps,
        logging_steps=1,
        report_to="none",
        per_device_train_batch_size=args.batch * args.generations,  # TRL's batch counts completions
        num_generations=args.generations,
        max_completion_length=args.max_new_tokens,
        loss_type="grpo",
        beta=0.0,
        learning_rate=1e-6,
        bf16=args.gpu,
        use_cpu=not args.gpu,
        shuffle_dataset=False,
        save_strategy="no",
        disable_tqdm=True,
        **s.keys,
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    trainer = GRPOTrainer(
        model=model_dir, reward_funcs=reward, args=cfg, processing_class=tok, train_dataset=data
    )
    timer = PhaseTimer(GRPOTrainer, "_generate_and_score_completions")
    t = time.perf_counter()
    result = trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    length = sum(h.get("completions/mean_length", 0.0) for h in logs) / len(logs)
    loop_s = result.metrics.get("train_runtime", time.perf_counter() - t)
    return {
        "tokens": sum(int(h.get("num_tokens", 0)) for h in logs[-1:]),
        "loop_s": loop_s,
        "peak_mb": peak_mb(),
        "first_loss": logs[0]["loss"],
        "completion_length": length,
        **timer.split(loop_s, length * args.batch * args.generations * args.steps),
    }
