"""The server's continuous batching: a request joins the running batch at the next token, a finished row leaves
at once, and rows of different model ids (LoRA adapters of one base) and sampling settings share each forward.

`ContinuousBatcher` keeps `Batcher`'s queue, admission limits and API; its loop, instead of one generation
pass per group of waiting requests, runs one token step at a time in the worker thread (`Stepper.advance`):
first it prefills the requests admitted since the last step (as many as fit `--max-batch-size` rows, in
arrival order), then it draws the next token of every row in flight (`generation.continuous`).
"""

from __future__ import annotations

import asyncio
import logging

from alignkit.generation.continuous import ContinuousBatch, Sampling
from alignkit.ship.serve.batcher import Batcher, Job, Row, deliver
from alignkit.ship.serve.engine import ModelPool
from alignkit.ship.serve.logprobs import StepLogprobs

log = logging.getLogger("alignkit")


class Stepper:
    """The rows in flight, each with its job, over one `ContinuousBatch` of the pool's model."""

    logprobs = True  # token log-probs can be asked for

    def __init__(self, pool: ModelPool, metrics: object = None) -> None:
        self.pool, self.metrics = pool, metrics
        self.batch = ContinuousBatch(pool.model, pool.tokenizer.pad_token_id or 0)
        self.rows: list[tuple[Job, Row]] = []  # in the batch's row order

    def __len__(self) -> int:
        return len(self.rows)

    def advance(self, admitted: list[Job]) -> None:
        """Prefill `admitted`, then one token for every row; on an engine failure every job in flight (and
        admitted) gets the error and the batch starts empty."""
        try:
            if admitted:
                self._admit(admitted)
            if self.rows:
                tokens, logits = self.batch.step()
                self._take(self.rows, tokens, logits)
        except Exception as exc:  # an engine failure is the server's, never a hang for the clients
            log.exception("generation failed")
            failed = {id(j): j for j in [*(j for j, _ in self.rows), *admitted]}  # each job once
            for job in failed.values():
                job.emit(("error", f"generation failed: {type(exc).__name__}: {exc}"))
            self.rows = []
            self.batch = ContinuousBatch(self.pool.model, self.batch.pad_id)

    def _admit(self, jobs: list[Job]) -> None:
        rows = [(job, row) for job in jobs for row in job.rows]
        settings = [_sampling(job, row, self.pool.ids[job.model]) for job, row in rows]
        tokens, logits = self.batch.add([job.prompt_of(row) for job, row in rows], settings)
        self.rows += rows
        if self.metrics is not None:
            self.metrics.batch_rows.observe(len(rows))  # rows that joined at this step
        self._take(rows, tokens, logits, offset=len(self.rows) - len(rows))

    def _take(self, rows: list[tuple[Job, Row]], tokens: list[int], logits: object, offset: int = 0) -> None:
        """Hand each row its token, answer the jobs whose rows are all finished, drop the finished rows."""
        asked = [job.top_logprobs for job, _ in rows if job.top_logprobs is not None]
        scored = None
        if asked:
            scores = StepLogprobs(max(asked))
            scores(None, logits)
            scored = scores.take(tokens)
        done = deliver(rows, tokens, self.pool.eos, scored)
        for job in {id(j): j for j, _ in rows}.values():
            if not job.ended and all(r.finish is not None for r in job.rows):
                if self.metrics is not None:
                    self.metrics.cancelled.inc(sum(r.finish == "cancelled" for r in job.rows))
                job.end()
        alive = [True] * offset + [not d for d in done]
        self.rows = [r for r, a in zip(self.rows, alive) if a]
        self.batch.keep(alive)


def _sampling(job: Job, row: Row, adapter: str | None) -> Sampling:
    """A row's sampling settings; a seeded request's rows each get their own stream (seed + row index)."""
    seed = None if job.seed is None else job.seed + row.index
    return Sampling(job.temperature, job.top_p, seed, adapter)


class ContinuousBatcher(Batcher):
    """`Batcher`'s queue, stepped one token at a time (see the module's text)."""

    def __init__(self, stepper: Stepper, max_batch_size: int, max_queue: int, metrics: object = None) -> None:
        super().__init__(stepper, max_batch_size, max_queue, metrics)
        self.stepper = stepper

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.waiting or len(self.stepper):
                await loop.run_in_executor(self.executor, self._steps)

    def _steps(self, most: int = 64) -> None:
        """In the worker thread: up to `most` steps, each first admitting the requests that arrived since the
        last (so a request joins at the next token, with no turn of the event loop to wait for), until no row
        is left or the server stops; then the event loop gets the batch back."""
        for _ in range(most):
            if self.stopping:
                return
            admitted = self._admit()
            if not admitted and not len(self.stepper):
                return
            self.stepper.advance(admitted)

    def _admit(self) -> list[Job]:
        """The waiting jobs, oldest first, while their rows fit beside the rows in flight (a job that does not
        fit waits, and so do the ones behind it: no request is passed over for ever); cancelled ones end."""
        room = self.max_batch_size - len(self.stepper)
        admitted = []
        with self.lock:
            while self.waiting and (self.waiting[0].cancelled or len(self.waiting[0].rows) <= room):
                job = self.waiting.popleft()
                if job.cancelled:
                    job.end()
                    continue
                admitted.append(job)
                room -= len(job.rows)
        self._gauge()
        return admitted
