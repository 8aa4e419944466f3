"""`alignkit quickstart`: every method at work on a task it builds itself, in 240-307 s on 2 CPU cores.

It writes a tiny model, generates two-digit addition data whose SFT answers carry a sloppy annotator's
systematic error (a forgotten carry), trains each method through the same `alignkit train` path a user
runs, and reports held-out exact-match accuracy before and after. Nothing is downloaded. Runs go through
`alignkit compare`'s resumable training: run again in the same folder, a method whose config, data and
starting model are unchanged is not retrained (its table row keeps the training time it first took).
After SFT the other rows train side by side, one per core (`lanes.py`), with the same numbers as one by one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from alignkit.modeling.tiny import build_tiny
from alignkit.quickstart.lanes import default_jobs, run_rows
from alignkit.quickstart.recipes import (
    CONTROLS,
    DEFAULT_METHODS,
    METHODS,
    TOOL_ROWS,
    Context,
    data_file,
    pairs_file,
)
from alignkit.quickstart.report import (
    accuracy,
    reward_model_diagnosis,
    reward_trend,
    tool_accuracy,
    write_report,
)
from alignkit.quickstart.task import split_problems

__all__ = ["CONTROLS", "DEFAULT_METHODS", "METHODS", "run_quickstart"]

log = logging.getLogger("alignkit")

TINY = {"vocab_size": 512, "hidden_size": 128, "layers": 3}


def _run(ctx: Context, name: str, runner: Callable[[Context], str]) -> dict[str, Any]:
    """Train one method, then measure it: the test set (reported) and the validation set (recipes chosen)."""
    before = ctx.train_wall_s
    model_dir = runner(ctx)
    # the training this method needed (PPO's includes its reward model): a reused run reports its first time
    wall = round(ctx.train_wall_s - before, 1)
    measure = tool_accuracy if name in TOOL_ROWS else accuracy  # a tool row answers in episodes with its tool
    result = {**measure(model_dir, ctx.split.test), "validation": measure(model_dir, ctx.split.validation)}
    result.update(wall_s=wall, model_dir=model_dir, **reward_trend(model_dir))
    best = os.path.join(model_dir, "best")
    if os.path.isdir(best):  # chosen on the validation prompts while it trained; reported on the test set
        result["best"] = measure(best, ctx.split.test)
    log.info("%s: test accuracy %.3f (%.1f s)", name, result["accuracy"], wall)
    return result


def run_quickstart(
    output_dir: str = "./alignkit-quickstart",
    seed: int = 0,
    methods: Sequence[str] | None = None,
    controls: bool | Sequence[str] = True,
    jobs: int | None = None,
) -> dict[str, Any]:
    """Train each method (SFT first; the others start from it), evaluate, write report.md / report.json; return
    the report (its table under "table"). `controls`: all (True), none (False) or those named. `jobs`: rows
    trained side by side after SFT (default: one per core, up to 4; 1: one after another in this process)."""
    t0 = time.perf_counter()
    os.makedirs(output_dir, exist_ok=True)
    split = split_problems(seed)
    base = build_tiny(os.path.join(output_dir, "base"), seed=seed, **TINY)
    ctx = Context(output_dir, seed, split, base)
    report: dict[str, Any] = {
        "task": "two-digit addition; SFT data forgets 60% of carries",
        "seed": seed,
        "test_problems": len(split.test),
        "validation_problems": len(split.validation),
        "base_accuracy": accuracy(base, split.test)["accuracy"],
    }
    # the test problems with their answers, for `alignkit eval` / `sxs` on the models this run trains
    data_file(ctx, "test", lambda: [{"messages": p.messages(), "answer": str(p.answer)} for p in split.test])
    names = methods or DEFAULT_METHODS
    if "sft" not in names:
        names = ("sft", *names)
    wanted = CONTROLS if controls is True else {} if controls is False else {n: CONTROLS[n] for n in controls}
    wanted = wanted if len(names) > 1 else {}
    sft = _run(ctx, "sft", METHODS["sft"])  # every other row starts from it
    rows = {**{n: METHODS[n] for n in names if n != "sft"}, **wanted}
    jobs = min(jobs or default_jobs(), max(len(rows), 1))
    if jobs > 1:
        results = run_rows(ctx, rows, _run, jobs)
    else:
        results = {n: _run(ctx, n, runner) for n, runner in rows.items()}
    report["methods"] = {"sft": sft, **{n: results[n] for n in names if n != "sft"}}
    report["controls"] = {n: results[n] for n in wanted}
    if ctx.reward_model:
        report["reward_model"] = reward_model_diagnosis(ctx.reward_model, pairs_file(ctx), split.test)
    report["total_wall_s"] = round(time.perf_counter() - t0, 1)
    table = write_report(output_dir, report)
    log.info(
        "next: alignkit eval --model %s --baseline %s --dataset %s max_new_tokens=5",
        os.path.join(output_dir, names[1] if len(names) > 1 else "sft"),
        os.path.join(output_dir, "sft"),
        ctx.data["test"],
    )
    return {**report, "table": table}
