"""The quickstart's rows after SFT, side by side: each row is a task in one of `jobs` worker processes with
`threads` torch threads each, started once its inputs exist (the reward model for the rows that score with
it, the GRPO model for distillation). Every row trains and is measured exactly as in one process: its runs are
seeded by the run's seed, and the tiny model's losses are bit-identical at 1 and 2 torch threads (its
matrices split by output rows), so only the wall clock changes.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

from alignkit.quickstart.recipes import Context, train_reward_model

log = logging.getLogger("alignkit")
REWARD_MODEL = "rm"  # the task that trains the reward model the RM-scored rows share
NEEDS = {"ppo": REWARD_MODEL, "ppo_weak_kl": REWARD_MODEL, "online_dpo_rm": REWARD_MODEL, "distill": "grpo"}
# seconds each row took in a one-thread lane of the 2-core machine (seed 0): the progress line's estimate
TYPICAL_S = {
    "rm": 170,
    "ppo": 32,
    "ppo_verifiable": 32,
    "ppo_weak_kl": 33,
    "distill": 36,
    "grpo": 28,
    "dpo": 23,
}


def default_jobs() -> int:
    """One row per core, up to 4 at a time (the tiny model gains little from more than 2 threads)."""
    return max(1, min(4, os.cpu_count() or 1))


def _init(threads: int, level: int, configured: bool) -> None:
    import torch

    torch.set_num_threads(threads)
    if configured:  # the command line's lines, from the workers too
        logging.basicConfig(level=level, format="[%(name)s] %(message)s")


def _task(ctx: Context, name: str, runner: Callable[[Context], Any], measure: Callable | None) -> tuple:
    """One row in a worker: (what it made, training seconds); the reward model's task returns its folder."""
    before = ctx.train_wall_s
    made = runner(ctx) if measure is None else measure(ctx, name, runner)
    return made, ctx.train_wall_s - before


def run_rows(
    ctx: Context,
    rows: dict[str, Callable[[Context], str]],
    measure: Callable,
    jobs: int,
    reward_model: Callable[[Context], str] = train_reward_model,
) -> dict[str, dict[str, Any]]:
    """Every row of `rows` (name -> runner; `measure(ctx, name, runner)` trains and measures it), `jobs` at a
    time; results in the order given. The reward model's seconds go to the first row that uses it, as when
    that row trained it itself."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    root = logging.getLogger()
    init = (threads, logging.getLogger("alignkit").getEffectiveLevel(), bool(root.handlers))
    pending = dict(rows)
    if any(NEEDS.get(name) == REWARD_MODEL for name in rows) and not ctx.reward_model:
        pending = {REWARD_MODEL: reward_model, **pending}  # first: three rows wait for it
    done: dict[str, Any] = {}
    running: dict[Future, str] = {}
    start, total, rm_seconds = time.perf_counter(), len(pending), 0.0
    pool = ProcessPoolExecutor(
        jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init, initargs=init
    )
    with pool:
        while pending or running:
            waiting_on = {*pending, *running.values()}  # a row whose input no task makes, makes it itself
            for name in [n for n in pending if NEEDS.get(n) in done or NEEDS.get(n) not in waiting_on]:
                if len(running) < jobs:
                    how = None if name == REWARD_MODEL else measure
                    running[pool.submit(_task, ctx, name, pending.pop(name), how)] = name
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                done[name], seconds = future.result()
                ctx.train_wall_s += seconds
                if name == REWARD_MODEL:
                    ctx.reward_model, rm_seconds = done[name], seconds
                _progress(
                    name, len(done), total, time.perf_counter() - start, [*pending, *running.values()], jobs
                )
    users = [n for n in rows if NEEDS.get(n) == REWARD_MODEL]
    if REWARD_MODEL in done and users:
        done[users[0]]["wall_s"] = round(done[users[0]]["wall_s"] + rm_seconds, 1)
    return {name: done[name] for name in rows}


def _progress(name: str, finished: int, total: int, elapsed: float, left: list[str], jobs: int) -> None:
    eta = max([sum(TYPICAL_S.get(n, 15) for n in left) / jobs, *(TYPICAL_S.get(n, 15) / 2 for n in left)])
    log.info(
        "quickstart: %s done (%d/%d, %.0f s so far, about %.0f s to go)", name, finished, total, elapsed, eta
    )
