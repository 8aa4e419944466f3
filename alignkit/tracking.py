"""Where metrics go: `metrics.jsonl` (always), TensorBoard / W&B / MLflow (`report_to`), a loss-curve PNG."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from alignkit.errors import UserError

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends one JSON line per log event; on resume, keeps only the lines up to the resumed step."""

    def __init__(
        self, output_dir: str, report_to: str, run_name: str | None, config: dict, resume_step: int | None
    ):
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.report_to = report_to
        if resume_step is None:
            open(self.path, "w", encoding="utf-8").close()
        else:
            kept = [
                r
                for r in read_metrics(self.path)
                if r.get("step", 0) <= resume_step and "train_runtime" not in r
            ]
            with open(self.path, "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in kept)
        self._tracker = _open_tracker(report_to, output_dir, run_name, config)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tracker is not None:
            self._tracker(record)

    def close(self) -> None:
        closer = getattr(self._tracker, "close", None)
        if closer:
            closer()


def read_metrics(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a crash
                    continue
    return out


class _Tracker:
    def __init__(self, log: Any, close: Any = None) -> None:
        self._log, self.close = log, close

    def __call__(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        scalars = {
            k: float(v)
            for k, v in record.items()
            if isinstance(v, (int, float)) and k != "step" and math.isfinite(float(v))
        }
        self._log(scalars, step)


def _open_tracker(report_to: str, output_dir: str, run_name: str | None, config: dict) -> _Tracker | None:
    if report_to == "none":
        return None
    try:
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(os.path.join(output_dir, "runs"))

            def log(scalars: dict, step: int) -> None:
                for k, v in scalars.items():
                    writer.add_scalar(k, v, step)

            return _Tracker(log, writer.close)
        if report_to == "wandb":
            import wandb

            run = wandb.init(name=run_name, config=config, dir=output_dir)
            return _Tracker(lambda s, step: run.log(s, step=step), run.finish)
        if report_to == "mlflow":
            import mlflow

            mlflow.start_run(run_name=run_name)
            mlflow.log_params({k: str(v)[:250] for k, v in config.items()})
            return _Tracker(lambda s, step: mlflow.log_metrics(s, step=step), mlflow.end_run)
    except ImportError as exc:
        raise UserError(
            f"report_to: {report_to} needs the `{report_to}` package: pip install {report_to}"
        ) from exc
    return None


def plot_loss(output_dir: str) -> str | None:
    """Write `loss.png` from metrics.jsonl (train loss, and eval loss when there is one)."""
    records = read_metrics(os.path.join(output_dir, METRICS_FILE))
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    path = os.path.join(output_dir, "loss.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
