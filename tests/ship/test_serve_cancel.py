"""A client that leaves stops its rows, counted by alignkit_cancelled_rows_total. The server answers with a
model that cannot draw its EOS: every answer runs to its token limit (thousands of tokens), so the client has
certainly left while its rows still run, on a machine of any speed."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.ship.serve_helpers import ServerProcess, make_endless, running

pytestmark = pytest.mark.slow  # real server processes: not in the fast tier

HI = [{"role": "user", "content": "hi there"}]
LONG = 8000  # tokens: far more than any client here waits for


@pytest.fixture(scope="module")
def server(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("serve_cancel")
    model = make_endless(tiny_model, folder / "endless")
    with running(["--model", model, "--served-model-name", "m"], folder / "server.log") as s:
        yield s


def _ask(server: ServerProcess, max_tokens: int) -> dict:
    """A greedy answer of `max_tokens` tokens (finish_reason `length`: this model never stops by itself)."""
    body = {"model": "m", "prompt": "abc", "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).json()


def _counted(server: ServerProcess, name: str, value: float, within_s: float = 30.0) -> float:
    """The metric once it reaches `value` (or its last reading after `within_s`): the server notices a client
    that left at its next write or poll, while other requests go on beside the rows (continuous batching)."""
    deadline = time.monotonic() + within_s
    while (got := server.metric(name)) != value and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


def test_client_dropped_mid_stream_stops_its_rows(server: ServerProcess) -> None:
    cancelled = server.metric("alignkit_cancelled_rows_total")
    tokens_before = server.metric("alignkit_completion_tokens_total")
    body = {"model": "m", "messages": HI, "max_tokens": LONG, "stream": True, "temperature": 1.0}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    # the server stops the dropped rows at their next step; the next request is answered beside them
    assert _ask(server, 4)["choices"][0]["finish_reason"] == "length"
    assert _counted(server, "alignkit_cancelled_rows_total", cancelled + 1) == cancelled + 1
    assert server.metric("alignkit_completion_tokens_total") - tokens_before < LONG


def test_client_that_gives_up_on_a_plain_request_stops_its_rows(server: ServerProcess) -> None:
    cancelled = server.metric("alignkit_cancelled_rows_total")
    body = {"model": "m", "prompt": "abc", "max_tokens": LONG, "temperature": 1.0}
    with pytest.raises(httpx.TimeoutException):  # the answer is thousands of tokens away: the client leaves
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=1)
    assert _ask(server, 2)["choices"][0]["finish_reason"] == "length"  # answered beside the rows
    assert _counted(server, "alignkit_cancelled_rows_total", cancelled + 1) == cancelled + 1
