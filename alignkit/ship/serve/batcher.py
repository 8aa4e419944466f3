"""Requests that wait together are generated together.

A `Job` is one API request: its prompts, `n` answers each, and its sampling settings. The `Batcher` keeps the
waiting jobs in arrival order; each pass takes the oldest one and every waiting job that can share its
generation call (same model id, same temperature and top_p, no seed of its own), up to `max_batch_size` rows,
and runs one pass through the rollout engine in a worker thread. Each row keeps its own token limit and stop
strings and ends on its own (`rollout.RowsDone`); a row whose client has gone stops at the next step. Text
reaches the request's event queue as it is drawn, so streaming and batching are one path.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from alignkit.generation.streaming import TextStream
from alignkit.ship.serve.logprobs import Step, StepLogprobs
from alignkit.ship.serve.protocol import APIError

log = logging.getLogger("alignkit")
_seq = itertools.count()


@dataclass
class Row:
    """One answer being drawn: its tokens, its text (cut at a stop string) and why it ended."""

    index: int
    max_tokens: int
    stream: TextStream
    tokens: list[int] = field(default_factory=list)
    text: str | None = ""  # None: not decoded yet (an answer that is read only when it ends)
    sent: int = 0  # characters already handed to the client
    finish: str | None = None  # "stop", "length" or "cancelled"
    steps: list[Step] | None = None  # each token's log-probs, when the request asked for them
    steps_sent: int = 0

    def push(
        self,
        token: int,
        eos: set[int],
        stop: list[str],
        scored: tuple[float, list] | None = None,
        live: bool = True,
    ) -> str:
        """Take one drawn token (and its log-probs, `StepLogprobs.take`'s); return the text that may be sent
        now. `live=False` (an answer neither streamed nor cut at stop strings): the text is decoded once, when
        the row ends, instead of token by token."""
        if token in eos:
            self.finish = "stop"
            self.text = self.full_text()
            return self._release()
        if not live and self.steps is None:
            self.tokens.append(token)
            self.text = None  # decoded when the row ends (`end`)
            if len(self.tokens) >= self.max_tokens:
                self.end("length")
            return ""
        if (
            self.steps is not None and scored is not None
        ):  # where its text starts: after all the tokens before
            self.steps.append(Step(token, scored[0], len(self.full_text()), scored[1]))
        self.tokens.append(token)
        self.text += self.stream.push([token])
        for s in stop:
            at = self.text.find(s)
            if at >= 0:
                self.text, self.finish = self.text[:at], "stop"
        if self.finish is None and len(self.tokens) >= self.max_tokens:
            self.finish = "length"
            self.text = self.full_text()
        # while the row runs, keep back what could be the start of a stop string
        hold = 0 if self.finish or not stop else max(len(s) for s in stop) - 1
        return self._release(hold)

    def end(self, finish: str) -> None:
        """The row ends for `finish` (if it has not ended yet); text not decoded as it was drawn is now."""
        self.finish = self.finish or finish
        if self.text is None:
            self.text = self.full_text()

    def full_text(self) -> str:
        """The whole answer decoded at once: the streamed text may still hold back a character cut between
        tokens, which is released (or shown as U+FFFD, as a plain decode does) when the row ends."""
        return self.stream.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def unsent_steps(self) -> list[Step]:
        """The log-probs of the tokens not yet sent to a streaming client."""
        out = (self.steps or [])[self.steps_sent :]
        self.steps_sent += len(out)
        return out

    def _release(self, hold: int = 0) -> str:
        end = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent : end], end
        return out


@dataclass
class Job:
    """One request. `prompt_ids[p]` is answered `n` times: rows p*n .. p*n+n-1."""

    model: str
    prompt_ids: list[list[int]]
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    tokenizer: Any
    loop: asyncio.AbstractEventLoop
    top_logprobs: int | None = None  # log-probs asked for: how many alternatives per token (None: not asked)
    streaming: bool = True  # False: the text is read from the rows at the end, no event per token
    rows: list[Row] = field(default_factory=list)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    done: bool = False  # the request's coroutine has seen the end
    ended: bool = False  # the worker has sent the end (every row finished)
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        limit, scored = self.max_tokens, self.top_logprobs is not None
        self.rows = [
            Row(i, limit, TextStream(self.tokenizer), steps=[] if scored else None)
            for i in range(len(self.prompt_ids) * self.n)
        ]
        self.order = next(_seq)

    def key(self) -> tuple:
        """Jobs with equal keys share a generation call. A seeded job runs alone, so that its seed alone decides
        its answers (the same request with the same seed gives the same answer)."""
        sampling = (0.0, 1.0) if self.temperature == 0 else (self.temperature, self.top_p)
        return (self.model, sampling, ("seed", self.order) if self.seed is not None else None)

    def longest(self) -> int:
        return max(len(p) for p in self.prompt_ids)

    def prompt_of(self, row: Row) -> list[int]:
        return self.prompt_ids[row.index // self.n]

    def end(self) -> None:
        """From the worker thread, once: every row is finished; the client is answered now, even if other
        rows of the pass go on."""
        if not self.ended:
            self.ended = True
            self.emit(("done",))

    def emit(self, item: tuple) -> None:
        """From the worker thread: hand an event to the request's coroutine."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    async def stream(self) -> AsyncIterator[tuple[int, str, list[Step]]]:
        """(row index, text, its tokens' log-probs if asked) as it is drawn, until the job is done; an engine
        failure raises."""
        while True:
            kind, *rest = await self.events.get()
            if kind == "text":
                yield rest[0], rest[1], rest[2]
            elif kind == "error":
                raise APIError(500, rest[0])
            else:
                self.done = True
                return

    async def wait(self) -> None:
        async for _ in self.stream():
            pass

    def usage(self) -> dict[str, int]:
        prompt = sum(len(p) for p in self.prompt_ids)
        completion = sum(len(r.tokens) for r in self.rows)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


Generate = Callable[[list[Job]], None]


class Batcher:
    """The queue of waiting jobs and the loop that runs them, one generation pass at a time."""

    def __init__(
        self,
        generate: Generate,
        max_batch_size: int,
        max_queue: int,
        metrics: Any = None,
        context: int | None = None,
    ) -> None:
        self.generate = generate
        self.context = context
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.metrics = metrics
        self.waiting: deque[Job] = deque()
        # around `waiting`: the continuous batcher's worker takes jobs from it too
        self.lock = threading.Lock()
        self.wake = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alignkit-generate")
        self.task: asyncio.Task | None = None
        self.stopping = False

    def submit(self, job: Job) -> None:
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise APIError(
                    503, f"the server is busy ({len(self.waiting)} requests waiting); retry shortly"
                )
            self.waiting.append(job)
        self._gauge()
        self.wake.set()

    def withdraw(self, job: Job) -> None:
        """A job whose client left: out of the queue if it waits, its rows stop if it runs."""
        job.cancelled = True
        with self.lock:
            if job in self.waiting:
                self.waiting.remove(job)
        self._gauge()

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self.stopping = True  # a worker looping over steps ends at the next one
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.waiting:
                batch = self._take()
                if self.metrics is not None:
                    self.metrics.batch_rows.observe(sum(len(j.rows) for j in batch))
                await loop.run_in_executor(self.executor, self._pass, batch)

    def _take(self) -> list[Job]:
        """The oldest job and every waiting job that can share its pass: same key, room in the batch, and the
        padded batch (longest prompt + longest token limit) still inside the model's context."""
        first = self.waiting.popleft()
        batch, rows = [first], len(first.rows)
        longest, limit = first.longest(), first.max_tokens
        for job in list(self.waiting):
            fits = (
                self.context is None
                or max(longest, job.longest()) + max(limit, job.max_tokens) <= self.context
            )
            if job.key() == first.key() and rows + len(job.rows) <= self.max_batch_size and fits:
                self.waiting.remove(job)
                batch.append(job)
                rows += len(job.rows)
                longest, limit = max(longest, job.longest()), max(limit, job.max_tokens)
        self._gauge()
        return batch

    def _pass(self, batch: list[Job]) -> None:
        live = [j for j in batch if not j.cancelled]
        try:
            if live:
                self.generate(live)
        except Exception as exc:  # an engine failure is the server's, never a hang for the clients
            log.exception("generation failed")
            for job in batch:
                job.emit(("error", f"generation failed: {type(exc).__name__}: {exc}"))
            return
        for job in batch:
            for row in job.rows:
                row.end("cancelled" if job.cancelled else "length")
            if self.metrics is not None:
                self.metrics.cancelled.inc(sum(r.finish == "cancelled" for r in job.rows))
            job.end()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self.waiting))


def deliver(
    rows: list[tuple[Job, Row]], tokens: list[int], eos: set[int], scored: list | None = None
) -> list[bool]:
    """Each row takes its token (or stops: its client gone) and sends its new text, with the log-probs of its
    tokens since the last send when its request asked (`StepLogprobs.take`'s, in row order); which rows are
    finished."""
    flags, events = [], []
    for (job, row), token, lp in zip(rows, tokens, scored or [None] * len(tokens)):
        if row.finish is None and job.cancelled:
            row.end("cancelled")
        if row.finish is None:
            text = row.push(token, eos, job.stop, lp, live=job.streaming or bool(job.stop))
            steps = row.unsent_steps() if job.streaming and (text or row.finish) else []
            if job.streaming and (text or steps):
                events.append((job.events, ("text", row.index, text, steps)))
        flags.append(row.finish is not None)
    if events:  # one wake-up of the event loop for the whole step, not one per row
        rows[0][0].loop.call_soon_threadsafe(_put_all, events)
    return flags


def _put_all(events: list[tuple[asyncio.Queue, tuple]]) -> None:
    for queue, item in events:
        queue.put_nowait(item)


def on_step_for(
    batch: list[Job], eos: set[int], scores: StepLogprobs | None = None
) -> Callable[[list[int]], list[bool]]:
    """The per-step hook of one pass: `deliver` for every row of the pass; a job whose rows are all finished is
    answered at once (one with cancelled rows is counted and ended by the pass)."""
    rows = [(job, row) for job in batch for row in job.rows]

    def on_step(tokens: list[int]) -> list[bool]:
        flags = deliver(rows, tokens, eos, scores.take(tokens) if scores is not None else None)
        for job in batch:
            if not job.ended and all(r.finish is not None for r in job.rows):
                if job.cancelled or any(r.finish == "cancelled" for r in job.rows):
                    continue  # counted and ended by the pass, with its cancelled rows
                job.end()
        return flags

    return on_step
