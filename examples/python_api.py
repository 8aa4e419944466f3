"""alignkit from Python, as in a notebook: SFT -> DPO -> evaluate -> export, with data made in memory.

    python examples/python_api.py [--workdir api-tour] [--model DIR]

Without --model a tiny random model is built in place (`alignkit.tiny`), so it runs offline in about a minute
on 2 CPU cores and the accuracies are those of a model that has barely trained; with a real model folder (or
a hub id, online) the same calls train it. The task is the quickstart's: two-digit addition whose SFT answers
forget 60% of carries, and preference pairs that contrast the correct answer with that mistake.
"""

from __future__ import annotations

import argparse
import json
import os

import alignkit
from alignkit.quickstart.task import preference_rows, sft_rows, split_problems


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="api-tour")
    parser.add_argument("--model", help="a model folder or hub id (default: a tiny random model)")
    args = parser.parse_args()
    work = args.workdir
    base = args.model or alignkit.tiny(os.path.join(work, "base"), hidden_size=64, layers=2)
    split = split_problems(seed=0)
    common = {"model_name_or_path": base, "torch_dtype": "float32", "logging_steps": 5, "max_length": 64}

    # rows in memory (a list of dicts or a datasets.Dataset): no file to write first
    sft = alignkit.train(
        {**common, "stage": "sft", "output_dir": os.path.join(work, "sft"), "finetuning_type": "lora"},
        dataset=sft_rows(split.train, n=256, carry_error_rate=0.6, seed=0),
        learning_rate=2e-3,
        per_device_train_batch_size=16,
        max_steps=16,
    )
    print(f"sft: {sft.steps} steps, loss {sft.metrics['loss']:.3f}, adapter in {sft.output_dir}")

    # the DPO run continues the SFT adapter; a callback watches the reward margins as they are logged
    def watch(event: alignkit.TrainEvent) -> None:
        if event.kind == "log":
            print(f"  dpo step {event.step}/{event.total_steps}: margin {event.data['rewards/margins']:+.3f}")

    dpo = alignkit.train(
        {
            **common,
            "stage": "dpo",
            "model_name_or_path": sft.output_dir,
            "output_dir": os.path.join(work, "dpo"),
        },
        dataset=preference_rows(split.train, n=128, seed=1),
        finetuning_type="lora",
        learning_rate=5e-4,
        per_device_train_batch_size=16,
        max_steps=8,
        callbacks=[watch],
    )

    test = [{"messages": p.messages(), "answer": str(p.answer)} for p in split.test[:40]]
    report = alignkit.evaluate(
        model=dpo.output_dir,
        baseline=sft.output_dir,
        dataset=test,
        max_new_tokens=4,
        output_dir=os.path.join(work, "eval"),
    )
    print(report.table)

    merged = alignkit.export(adapter=dpo.output_dir, output=os.path.join(work, "merged"))
    print(
        f"export: {merged.output} (largest logit difference to the unmerged model {merged.max_logit_diff:.1e})"
    )
    summary = {
        "sft": {"steps": sft.steps, "loss": sft.metrics["loss"]},
        "dpo": {"steps": dpo.steps, "total_steps": dpo.total_steps, "margin": dpo.metrics["rewards/margins"]},
        "eval": {
            "accuracy": report.metrics["accuracy"]["value"],
            "baseline_accuracy": report.baseline_metrics["accuracy"]["value"]
            if report.baseline_metrics
            else None,
            "n": report.n_prompts,
        },
        "export": {"folder": merged.output, "max_logit_diff": merged.max_logit_diff},
    }
    with open(os.path.join(work, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)


if __name__ == "__main__":
    main()
