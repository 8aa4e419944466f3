"""`alignkit compare CONFIG.yaml`: train several methods from the same starting model on the same data with
the same budget, evaluate each with the same eval keys against that starting model, and report: report.md,
report.json and PNG plots in output_dir, each method's run in output_dir/<name> (its eval in .../eval).

A method (or an eval) already finished with the same resolved config and inputs is reused, so a compare that
was interrupted, or run again after one method's keys changed, redoes only what is missing or changed."""

from __future__ import annotations

import logging
import os
from typing import Any

from alignkit.comparison.config import CompareConfig, eval_config, load_compare_config
from alignkit.comparison.plots import write_plots
from alignkit.comparison.report import build_report, write_report
from alignkit.comparison.runs import TrainResult, budget, check_budgets, eval_method, train_method
from alignkit.errors import UserError

log = logging.getLogger("alignkit")

__all__ = ["run_compare", "train_method", "TrainResult", "load_compare_config"]


def _processes() -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise UserError(
            "alignkit compare runs in one process (it trains, evaluates and writes the report itself); start "
            "it without torchrun / accelerate launch"
        )
    return world


def run_compare(cfg: CompareConfig) -> dict[str, Any]:
    """Train and evaluate every method (reusing finished ones), then write the report and plots."""

    processes = _processes()
    budgets = {m.name: budget(m.cfg, processes) for m in cfg.methods}
    check_budgets(budgets, cfg.source, cfg.allow_unequal_budget)
    os.makedirs(cfg.output_dir, exist_ok=True)
    runs: dict[str, dict[str, Any]] = {}
    for method in cfg.methods:
        trained = train_method(method.raw, f"{cfg.source}: methods.{method.name}")
        ecfg = eval_config(cfg, method.name, trained.run_dir)
        report, evaluated = eval_method(ecfg)
        runs[method.name] = {
            "run_dir": trained.run_dir,
            "eval_dir": ecfg.output_dir,
            "eval": report,
            "train_wall_s": trained.wall_s,
            "trained": trained.trained,
            "evaluated": evaluated,
        }
    seed = int(cfg.eval_raw.get("seed", 0) or 0)
    report = build_report(budgets, runs, seed=seed)
    plots = write_plots(report, cfg.output_dir)
    report["plots"] = plots
    report["table"] = write_report(cfg.output_dir, report, plots)
    return report
