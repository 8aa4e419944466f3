"""What a run reports as it goes, and how it is asked to stop.

A callback is any callable taking a `TrainEvent`; the loop calls it between optimizer steps, never from another
thread, in every process of a multi-process run (`event.main` is true in the main one: `alignkit.train` hands
its caller's callbacks the main process's events only). A stop request is
any object with `is_set()` (a `threading.Event`): the loop checks it after each optimizer step, and at the next
point where a checkpoint can be written (a global batch done: for online stages, the end of the rollout's
updates) it writes one, reports `stopped` and returns; `resume_from_checkpoint: auto` continues the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

log = logging.getLogger("alignkit")

EventKind = Literal["start", "step", "log", "eval", "checkpoint", "stopped", "end"]


@dataclass(frozen=True)
class TrainEvent:
    """One thing a run did.

    start: before the first step (`data`: stage, rows, total_steps, steps_per_epoch, global_batch, resumed_at);
    step: after each optimizer step (`data`: loss, learning_rate, elapsed_s: for progress bars and ETAs);
    log: a record written to metrics.jsonl (`data`: the record); eval: the evaluation part of one (`eval_*`);
    checkpoint: a checkpoint written (`data`: path); stopped: the run stopped on request (`data`: checkpoint);
    end: the run is over (`data`: the final record, and `result` on the TrainResult the library returns).
    """

    kind: EventKind
    step: int
    total_steps: int
    data: dict[str, Any] = field(default_factory=dict)
    main: bool = True  # reported by the main process (of several, or the only one)


Callback = Callable[[TrainEvent], None]


class StopSignal(Protocol):
    def is_set(self) -> bool: ...


class Reporter:
    """Hands events to the callbacks. A callback that raises stops the run: its error is the caller's, reported
    where it happened, as any other error in the process."""

    def __init__(self, callbacks: Sequence[Callback] | None, total_steps: int, main: bool) -> None:
        self.callbacks = list(callbacks or [])
        self.total_steps, self.main = total_steps, main

    def __call__(self, kind: EventKind, step: int, /, **data: Any) -> None:
        event = TrainEvent(kind, step, self.total_steps, data, self.main)
        for callback in self.callbacks:
            callback(event)
