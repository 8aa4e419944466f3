"""`auto_find_batch_size: true`: the largest micro-batch that fits the device's memory, the global batch kept.

The per-device batch (`per_device_train_batch_size`, bs) runs as micro-batches of m rows, m a divisor of bs,
with the accumulation multiplied by bs / m. The loop's plan makes an update a function of the global batch
alone (`stages.base.Plan`), so the update is the one of the unsplit batch, to float rounding; transformers'
own `auto_find_batch_size` halves the batch itself on out-of-memory, which changes the training.

m comes from measured memory, not from trying until a crash (on CPU there is no out-of-memory error to catch,
only the kernel's OOM killer): forward and backward on the train set's longest rows, at 1 row and at 2, give
the memory one more row takes and what the step costs besides; the optimizer's state (two tensors per
trainable parameter for AdamW, not yet made at that point) is added; m is the largest divisor of bs whose
step fits 85% of the memory the device has free (CUDA's free memory plus what this process holds; on CPU the
kernel's MemAvailable plus this process's resident memory).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from alignkit.errors import UserError
from alignkit.stages.base import Plan, Stage

log = logging.getLogger("alignkit")
SHARE = 0.85  # of the free memory a step may use


@dataclass(frozen=True)
class Probe:
    """What one step costs in bytes: besides its rows, and per row of the longest rows."""

    fixed: float
    per_row: float


def fit_micro_batch(bs: int, probe: Probe, optimizer_bytes: float, budget: float) -> int:
    """The largest divisor m of `bs` with fixed + optimizer state + m rows inside `budget` (1 at least)."""
    for m in sorted((d for d in range(1, bs + 1) if bs % d == 0), reverse=True):
        if probe.fixed + optimizer_bytes + m * probe.per_row <= budget:
            return m
    return 1


def sized_plan(
    plan: Plan,
    stage: Stage,
    model: torch.nn.Module,
    step: Callable[[list[dict]], None],
    agree: Callable[[int], int] = lambda m: m,
) -> Plan:
    """`plan` with its micro-batch sized to the device's memory (see the module's text); `step(rows)` runs
    forward and backward on those rows and leaves no gradient behind; `agree` makes every process take the
    same size (the smallest)."""
    if stage.online:
        raise UserError(
            f"auto_find_batch_size: stage {stage.name} samples its own batches; give "
            "per_device_train_batch_size and gradient_accumulation_steps instead"
        )
    if plan.bs == 1:
        return plan  # one row per micro-batch already: nothing to measure
    device = next(model.parameters()).device
    longest = sorted(stage.train_rows, key=_row_length, reverse=True)[:2]
    peaks = []
    for n in (1, 2):
        base = _reset_peak(device)
        with _RngKept(device):
            step(longest[:n])
        peaks.append(_peak(device) - base)
    per_row = max(peaks[1] - peaks[0], 1.0)
    probe = Probe(fixed=max(peaks[0] - per_row, 0.0), per_row=per_row)
    trainable = sum(p.numel() * p.element_size() for p in stage.trainable_parameters())
    budget = SHARE * _free_bytes(device)
    m = agree(fit_micro_batch(plan.bs, probe, 2 * trainable, budget))
    log.info(
        "auto_find_batch_size: %d rows per micro-batch (a row takes %.0f MB, the step %.0f MB besides, the "
        "optimizer %.0f MB; %.0f MB usable): %d x %d accumulation = %d rows per device, as configured",
        m,
        probe.per_row / 2**20,
        probe.fixed / 2**20,
        2 * trainable / 2**20,
        budget / 2**20,
        m,
        plan.accum * plan.bs // m,
        plan.bs * plan.accum,
    )
    return replace(plan, bs=m, accum=plan.accum * plan.bs // m)


def _row_length(row: dict) -> int:
    return sum(len(v) for v in row.values() if isinstance(v, list | tuple))


class _RngKept:
    """The probe draws no random number the run would otherwise draw (dropout, sampling)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    def __exit__(self, *exc: object) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def _reset_peak(device: torch.device) -> float:
    """Start measuring a peak; the bytes in use now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return float(torch.cuda.memory_allocated(device))
    try:  # Linux: writing 5 resets this process's peak resident memory (VmHWM) to the current one
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError as exc:
        raise UserError(
            "auto_find_batch_size on CPU reads the process's peak memory from /proc (Linux); "
            "give per_device_train_batch_size instead"
        ) from exc
    return _status_kb("VmRSS") * 1024.0


def _peak(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return _status_kb("VmHWM") * 1024.0


def _free_bytes(device: torch.device) -> float:
    """What this process may hold in all: the device's free memory plus what it holds already."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free + torch.cuda.memory_allocated(device))
    with open("/proc/meminfo") as fh:
        available = next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable:"))
    return (available + _status_kb("VmRSS")) * 1024.0


def _status_kb(key: str) -> int:
    with open(f"/proc/{os.getpid()}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))
