"""The server's event loop stays free while a request is tokenized: proven in-process, without timing, by a
tokenizer that blocks until the test has had its /health answer."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

import httpx

from alignkit.ship.serve.app import Server, build_app
from alignkit.ship.serve.batcher import Batcher
from alignkit.ship.serve.metrics import Metrics

NEVER = 10  # seconds: how long the tokenizer waits for a release that a blocked event loop cannot give


class BlockingTokenizer:
    """Tokenizes (chat template included) only once the test releases it; `released` says whether it was."""

    chat_template = "stub"

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.released: bool | None = None

    def apply_chat_template(self, messages: list[dict], **kwargs: Any) -> dict:
        self.entered.set()
        self.released = self.release.wait(NEVER)
        return {"input_ids": [1] * 100}  # over the context below: a 413, no generation needed


def test_health_is_answered_while_a_prompt_is_tokenized() -> None:
    tokenizer = BlockingTokenizer()
    pool = SimpleNamespace(ids={"m": None}, paths={"m": "m"}, tokenizer=tokenizer, context=64)
    app = build_app(Server(pool, Batcher(lambda batch: None, 8, 8), Metrics()))

    async def scenario() -> tuple[int, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            chat = asyncio.ensure_future(client.post("/v1/chat/completions", json=body))
            assert await asyncio.to_thread(tokenizer.entered.wait, NEVER)  # the prompt is being tokenized
            health = await client.get("/health")  # on a blocked loop: only after the tokenizer gave up
            tokenizer.release.set()
            return health.status_code, await chat

    health, chat = asyncio.run(scenario())
    assert health == 200 and tokenizer.released is True  # /health was answered while the tokenizer ran
    assert chat.status_code == 413 and chat.json()["error"]["code"] == "context_length_exceeded"
