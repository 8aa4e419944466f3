"""The console's jobs: training, evaluation and export, run through the library on one worker thread, one at a
time (a machine trains one model at a time; further starts queue). A training job's events arrive through
the library's callbacks (`alignkit.train(callbacks=...)`) and are kept for the page as they come; a stop is the
library's stop signal, so the run ends at its next checkpoint and resumes from it.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit import api
from alignkit.console.workspace import Run, Workspace
from alignkit.errors import UserError
from alignkit.training.checkpoint import list_checkpoints
from alignkit.training.events import TrainEvent
from alignkit.training.tracking import METRICS_FILE

log = logging.getLogger("alignkit")


@dataclass
class Live:
    """What a run reported so far: progress and the records of metrics.jsonl, in order."""

    stop: threading.Event = field(default_factory=threading.Event)
    progress: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)

    def on_event(self, event: TrainEvent) -> None:
        if event.kind == "start":
            self.progress.update(step=event.data.get("resumed_at") or 0, total=event.total_steps)
        elif event.kind == "step":
            self.progress.update(step=event.step, total=event.total_steps, loss=event.data.get("loss"))
            self._eta(event.step, event.total_steps)
        elif event.kind == "log":
            self.records.append(dict(event.data))

    def _eta(self, step: int, total: int) -> None:
        started = self.progress.setdefault("first_step", (step, time.time()))
        done, elapsed = step - started[0], time.time() - started[1]
        if done > 0 and total:
            self.progress["eta_s"] = round(elapsed / done * (total - step), 1)


class RunLog(logging.Handler):
    """The library's log lines of the worker thread, into the run's log.txt."""

    def __init__(self, path: Path, thread: int) -> None:
        super().__init__(logging.INFO)
        self.path, self.thread = path, thread
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(self.format(record) + "\n")


def _train(run: Run, live: Live, folder: Path) -> dict[str, Any]:
    # `auto`: a first start finds no checkpoint and starts; a resumed run continues from its newest one
    keys = {**run.config, "output_dir": str(folder / "output"), "disable_tqdm": True}
    keys["resume_from_checkpoint"] = "auto"
    result = api.train(keys, callbacks=[live.on_event], stop=live.stop)
    return {
        "output_dir": result.output_dir,
        "stopped": result.stopped,
        "steps": result.steps,
        "total_steps": result.total_steps,
        "checkpoint": result.checkpoint,
        "metrics": result.metrics,
    }


def _evaluate(run: Run, live: Live, folder: Path) -> dict[str, Any]:
    result = api.evaluate(dict(run.config), output_dir=str(folder / "eval"))
    return {
        "output_dir": result.output_dir,
        "metrics": result.metrics,
        "baseline_metrics": result.baseline_metrics,
        "skipped": result.skipped,
        "n_prompts": result.n_prompts,
        "table": result.table,
    }


def _export(run: Run, live: Live, folder: Path) -> dict[str, Any]:
    result = api.export(**run.config, output=str(folder / "model"))
    fields = getattr(result, "__dataclass_fields__", {})
    return {name: getattr(result, name) for name in fields}


def _compare(run: Run, live: Live, folder: Path) -> dict[str, Any]:
    result = api.compare(dict(run.config), output_dir=str(folder / "compare"))
    return {
        "output_dir": result.output_dir,
        "table": result.table,
        "report_md": (folder / "compare" / "report.md").read_text(encoding="utf-8"),
        "reward_hacking": result.reward_hacking,
        "plots": [Path(p).name for p in result.plots],
        "methods": {name: m.get("metrics", {}) for name, m in result.report.get("methods", {}).items()},
    }


def _sxs(run: Run, live: Live, folder: Path) -> dict[str, Any]:
    keys = run.config
    made = api.sxs(
        keys["model"],
        keys["baseline"],
        keys["dataset"],
        max_samples=keys["max_samples"],
        max_new_tokens=keys["max_new_tokens"],
        output_dir=str(folder / "sxs"),
    )
    return {"items": made["items"], "tallied": False}


JOBS: dict[str, Callable[[Run, Live, Path], dict[str, Any]]] = {
    "sxs": _sxs,
    "train": _train,
    "eval": _evaluate,
    "export": _export,
    "compare": _compare,
}


class Jobs:
    """The queue and its worker thread. Runs are on disk (the workspace); `live` holds the running ones."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.live: dict[str, Live] = {}
        self.lock = threading.Lock()
        self.closing = False
        self.thread = threading.Thread(target=self._work, name="alignkit-console-jobs", daemon=True)
        self.thread.start()

    def submit(self, kind: str, config: dict[str, Any], label: str = "") -> Run:
        if kind not in JOBS:
            raise UserError(f"no job kind `{kind}`; kinds: {', '.join(JOBS)}")
        run = self.workspace.new_run(kind, config, label)
        self._enqueue(run)
        return run

    def _enqueue(self, run: Run, records: list[dict[str, Any]] | None = None) -> None:
        with self.lock:
            self.live[run.id] = Live(records=list(records or []))
        self.queue.put(run.id)

    def stop(self, run_id: str) -> Run:
        """A queued run is taken off the queue; a running training run stops at its next checkpoint. The run's
        state is read and changed under the lock the worker takes to start a run, so the two never cross."""
        with self.lock:
            run = self.workspace.load(run_id)
            if run.status == "queued":
                run.status = "stopped"
                self.workspace.save(run)
            elif run.status == "running" and run.kind == "train" and run_id in self.live:
                self.live[run_id].stop.set()
            elif run.status == "running":
                raise UserError(
                    f"run {run_id} is a {run.kind} run: it cannot stop midway (only training can)"
                )
            else:
                raise UserError(f"run {run_id} is {run.status}: only a queued or running run can be stopped")
        return run

    def resume(self, run_id: str) -> Run:
        """A stopped, interrupted or failed training run queued again; it continues from its newest checkpoint,
        its curve from that step."""
        with self.lock:
            run = self.workspace.load(run_id)
            if run.kind != "train" or run.status not in ("stopped", "interrupted", "failed"):
                raise UserError(
                    f"run {run_id} is a {run.kind} run, {run.status}: only stopped training resumes"
                )
            checkpoints = list_checkpoints(str(self.workspace.run_dir(run.id) / "output"))
            step = int(checkpoints[-1].rsplit("-", 1)[-1]) if checkpoints else 0
            earlier = [
                r for r in self._file_records(run) if r.get("step", 0) <= step and "train_runtime" not in r
            ]
            run.status, run.error = "queued", None
            self.workspace.save(run)
        self._enqueue(run, earlier)
        return run

    def records(self, run: Run) -> list[dict[str, Any]]:
        """The run's metrics records: while it is queued or running, as the callbacks deliver them; after that
        (or after a restart), from its metrics.jsonl."""
        live = self.live.get(run.id)
        if live is not None and (run.status in ("queued", "running") or live.records):
            return live.records
        return self._file_records(run)

    def _file_records(self, run: Run) -> list[dict[str, Any]]:
        path = self.workspace.run_dir(run.id) / "output" / METRICS_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def progress(self, run_id: str) -> dict[str, Any]:
        live = self.live.get(run_id)
        return {
            k: v
            for k, v in (live.progress if live else {}).items()
            if k in ("step", "total", "eta_s", "loss")
        }

    def close(self, timeout: float = 60.0) -> None:
        """Stop the running job at its next checkpoint (waiting up to `timeout` s for it) and the worker; runs
        still queued stay queued (the next console shows them interrupted)."""
        with self.lock:
            self.closing = True
            for live in self.live.values():
                live.stop.set()
        self.queue.put(None)
        self.thread.join(timeout)

    def _work(self) -> None:
        while True:
            run_id = self.queue.get()
            if run_id is None or self.closing:
                return
            try:
                run = self._start(run_id)
                if run is not None:
                    self._run(run)
            except Exception:  # noqa: BLE001 - the worker outlives a run it could not even start
                log.exception("run %s could not start", run_id)

    def _start(self, run_id: str) -> Run | None:
        """The queued run marked running (None: it was taken off the queue meanwhile)."""
        with self.lock:
            run = self.workspace.load(run_id)
            if run.status != "queued":
                return None
            run.status, run.started = "running", time.time()
            self.workspace.save(run)
            return run

    def _run(self, run: Run) -> None:
        folder = self.workspace.run_dir(run.id)
        live = self.live[run.id]
        handler = RunLog(folder / "log.txt", threading.get_ident())
        if log.getEffectiveLevel() > logging.INFO:  # the run's log holds the library's INFO lines
            log.setLevel(logging.INFO)
        log.addHandler(handler)
        try:
            result = JOBS[run.kind](run, live, folder)
            run.result = result
            run.status = "stopped" if result.get("stopped") else "finished"
        except UserError as exc:
            run.status, run.error = "failed", str(exc)
        except Exception as exc:  # noqa: BLE001 - a job's failure is the run's, the console keeps serving
            log.exception("run %s failed", run.id)
            run.status, run.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            log.removeHandler(handler)
            run.finished = time.time()
            self.workspace.save(run)
