"""Where metrics go: `metrics.jsonl` (always), TensorBoard / W&B / MLflow (`report_to`), a loss-curve PNG."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from alignkit.errors import UserError

if TYPE_CHECKING:
    from alignkit.stages.base import Metrics


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

    def close(self, failed: bool = False) -> None:
        """End the tracker's run; after an exception it is marked failed (and MLflow's is not left active)."""
        if self._tracker is not None:
            self._tracker.close(failed)
            self._tracker = None


def add_metrics(acc: dict[str, list[torch.Tensor]], metrics: Metrics, real: bool = True) -> None:
    """Add a micro-batch's (sum, count) pairs into `acc`, as float64 on the CPU. A filler (`real=False`) adds
    its names with zero sum and count: every process then all-reduces the same names, and a process that
    ran only fillers still takes part in the reduction."""
    for name, (total, count) in metrics.items():
        t = torch.as_tensor(total, dtype=torch.float64).detach().cpu()
        c = torch.as_tensor(count, dtype=torch.float64).detach().cpu()
        if not real:
            t, c = torch.zeros_like(t), torch.zeros_like(c)
        if name in acc:
            acc[name][0] += t
            acc[name][1] += c
        else:
            acc[name] = [t, c]


def reduce_metrics(accelerator: Any, acc: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Sum (metric sum, count) pairs over processes; return the means."""
    if not acc:
        return {}
    names = sorted(acc)
    flat = torch.stack([torch.stack(acc[n]) for n in names]).to(accelerator.device)  # (M, 2)
    flat = accelerator.reduce(flat, reduction="sum").cpu()
    return {
        n: (flat[i, 0] / flat[i, 1]).item() if flat[i, 1] > 0 else float("nan") for i, n in enumerate(names)
    }


def window_means(window: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the steps of a logging window where it was defined (a batch without
    undesirable rows has no `rewards/rejected`; such a step is left out of that mean, as TRL does)."""
    keys = dict.fromkeys(k for w in window for k in w)
    out = {}
    for key in keys:
        values = [w[key] for w in window if key in w and w[key] == w[key]]
        if values:
            out[key] = sum(values) / len(values)
    return out


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
    """`log(scalars, step)` and `close(failed)` of one tracking backend."""

    def __init__(self, log: Callable[[dict, int], None], close: Callable[[bool], None]) -> None:
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

            return _Tracker(log, lambda failed: writer.close())
        if report_to == "wandb":
            import wandb

            # WANDB_MODE=offline writes the run under output_dir/wandb for a later `wandb sync`
            run = wandb.init(name=run_name, config=config, dir=output_dir)
            return _Tracker(
                lambda s, step: run.log(s, step=step), lambda failed: run.finish(exit_code=int(failed))
            )
        if report_to == "mlflow":
            return _mlflow_tracker(run_name, config)
    except ImportError as exc:
        raise UserError(
            f"report_to: {report_to} needs the `{report_to}` package: pip install 'alignkit[{report_to}]'"
        ) from exc
    return None


def _mlflow_tracker(run_name: str | None, config: dict) -> _Tracker:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:  # the tracking URI comes from MLFLOW_TRACKING_URI: a server, or a local `file:` store
        mlflow.start_run(run_name=run_name)
    except MlflowException as exc:
        raise UserError(
            f"report_to: mlflow could not start a run at {mlflow.get_tracking_uri()} "
            f"({str(exc).splitlines()[0][:200]}); set MLFLOW_TRACKING_URI to an MLflow server, or to a "
            "local store, file:/path/to/mlruns (MLflow 3 also needs MLFLOW_ALLOW_FILE_STORE=true)"
        ) from exc
    mlflow.log_params({k: str(v)[:250] for k, v in config.items()})
    return _Tracker(
        lambda s, step: mlflow.log_metrics(s, step=step),
        lambda failed: mlflow.end_run("FAILED" if failed else "FINISHED"),
    )


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
