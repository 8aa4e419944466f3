"""The server's continuous batching on the tiny model (in process, no HTTP): a request that arrives while a long
answer runs joins it at the next token and is answered long before it ends; both answers are the ones each
gets alone; a cancelled request's rows leave the batch at once."""

from __future__ import annotations

import asyncio

import pytest
import torch

from alignkit.ship.serve.batcher import Job
from alignkit.ship.serve.continuous import ContinuousBatcher, Stepper
from alignkit.ship.serve.engine import ModelPool
from alignkit.ship.serve.metrics import Metrics
from tests.generation.test_continuous import _alone as alone
from tests.ship.serve_helpers import make_endless

LONG, SHORT = [5, 17, 33, 2, 9, 41, 8], [40, 12]


@pytest.fixture(scope="module")
def pool(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> ModelPool:
    endless = make_endless(tiny_model, tmp_path_factory.mktemp("endless") / "model")
    return ModelPool(endless, {}, "tiny", dtype="float32", device="cpu")


def _alone(pool: ModelPool, prompt: list[int], n: int) -> list[int]:
    return alone(pool.model, pool.tokenizer, prompt, n)


def _job(pool: ModelPool, prompt: list[int], max_tokens: int, loop: asyncio.AbstractEventLoop) -> Job:
    return Job("tiny", [prompt], 1, max_tokens, 0.0, 1.0, [], None, pool.tokenizer, loop)


async def _until(condition: object, timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.005)


def test_a_late_short_request_joins_the_running_batch_and_ends_first(pool: ModelPool) -> None:
    async def scenario() -> tuple[Job, Job, int, int]:
        loop = asyncio.get_running_loop()
        metrics = Metrics()
        batcher = ContinuousBatcher(Stepper(pool, metrics), max_batch_size=8, max_queue=8, metrics=metrics)
        batcher.start()
        long, short = _job(pool, LONG, 300, loop), _job(pool, SHORT, 4, loop)
        batcher.submit(long)
        await _until(lambda: len(long.rows[0].tokens) >= 5)
        at_submit = len(long.rows[0].tokens)
        batcher.submit(short)
        await short.wait()
        at_answer = len(long.rows[0].tokens)
        await long.wait()
        await batcher.stop()
        return long, short, at_submit, at_answer

    long, short, at_submit, at_answer = asyncio.run(scenario())
    # the short request was drawn beside the long one: 4 tokens in a few steps, not after its 300
    assert at_answer - at_submit <= 8 and at_answer < 300
    assert (short.rows[0].tokens, short.rows[0].finish) == (_alone(pool, SHORT, 4), "length")
    assert long.rows[0].tokens == _alone(pool, LONG, 300) and long.rows[0].finish == "length"


def test_a_cancelled_request_leaves_the_batch_and_the_other_goes_on(pool: ModelPool) -> None:
    async def scenario() -> tuple[Job, Job, Stepper]:
        loop = asyncio.get_running_loop()
        stepper = Stepper(pool)
        batcher = ContinuousBatcher(stepper, max_batch_size=8, max_queue=8)
        batcher.start()
        gone, kept = _job(pool, LONG, 400, loop), _job(pool, SHORT, 40, loop)
        batcher.submit(gone)
        batcher.submit(kept)
        await _until(lambda: len(kept.rows[0].tokens) >= 3)
        batcher.withdraw(gone)
        await _until(lambda: len(stepper) == 1)
        await kept.wait()
        await batcher.stop()
        return gone, kept, stepper

    gone, kept, stepper = asyncio.run(scenario())
    assert gone.rows[0].finish == "cancelled" and len(gone.rows[0].tokens) < 40
    assert kept.rows[0].tokens == _alone(pool, SHORT, 40)
    assert len(stepper) == 0 and len(stepper.batch) == 0


def test_more_rows_than_room_wait_for_a_row_to_end(pool: ModelPool) -> None:
    async def scenario() -> list[Job]:
        loop = asyncio.get_running_loop()
        batcher = ContinuousBatcher(Stepper(pool), max_batch_size=2, max_queue=8)
        batcher.start()
        jobs = [_job(pool, SHORT, n, loop) for n in (6, 30, 3)]
        for job in jobs:
            batcher.submit(job)
        await jobs[2].wait()
        assert jobs[0].ended and not jobs[1].ended  # the third took the first one's place
        await jobs[1].wait()
        await batcher.stop()
        return jobs

    jobs = asyncio.run(scenario())
    for job in jobs:
        assert job.rows[0].tokens == _alone(pool, SHORT, job.max_tokens)


def test_the_server_batches_continuously_unless_the_cache_cannot_be_stacked(
    pool: ModelPool, caplog: pytest.LogCaptureFixture
) -> None:
    from types import SimpleNamespace

    from transformers import AutoConfig

    from alignkit.ship.serve.batcher import Batcher
    from alignkit.ship.serve.command import ServeSettings, _batcher

    args = ServeSettings(model="m")
    assert isinstance(_batcher(args, pool, Metrics()), ContinuousBatcher)
    assert type(_batcher(ServeSettings(model="m", batching="pass"), pool, Metrics())) is Batcher
    window = torch.nn.Linear(1, 1)
    window.config = AutoConfig.for_model("mistral", sliding_window=64, num_hidden_layers=2)
    with caplog.at_level("WARNING", logger="alignkit"):
        fallback = _batcher(args, SimpleNamespace(model=window, context=64), Metrics())
    assert type(fallback) is Batcher
    assert "continuous batching is off for this model (its attention has a sliding window)" in caplog.text
