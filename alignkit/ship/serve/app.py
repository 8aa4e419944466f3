"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions, /v1/feedback, /health,
/metrics. Bad input is a 4xx in OpenAI's error shape; only a failure of the server itself is a 500."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from alignkit.generation.rollout import encode_prompts
from alignkit.ship.serve.batcher import Batcher, Job
from alignkit.ship.serve.body import MAX_REQUEST_BYTES, parse_body, read_body
from alignkit.ship.serve.engine import ModelPool
from alignkit.ship.serve.logprobs import Step, TokenNames, chat_logprobs, completion_logprobs
from alignkit.ship.serve.metrics import Metrics, MetricsAndAuth
from alignkit.ship.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    Feedback,
    Sampling,
    validation_message,
)

log = logging.getLogger("alignkit")


@dataclass
class Server:
    pool: ModelPool
    batcher: Batcher
    metrics: Metrics
    store: Any = None  # a FeedbackStore with --log-db
    max_input_tokens: int | None = None
    max_n: int = 16
    max_request_bytes: int = MAX_REQUEST_BYTES
    started: int = field(default_factory=lambda: int(time.time()))

    def prepare(
        self, body: bytes, kind: type[Sampling], loop: asyncio.AbstractEventLoop
    ) -> tuple[Sampling, list[Any], Job]:
        """(request, prompts, job) of a request body: parsed, checked against the server's limits and
        tokenized, a 400, 404 or 413 before it queues. The CPU work of a request (JSON, chat template, tokens):
        call it in a worker thread, so that a big prompt never stalls the event loop and the other clients."""
        req = parse_body(body, kind)
        if isinstance(req, ChatRequest):
            prompts, field = [req.conversation()], "messages"  # `field`: the prompt's field, named in errors
        else:
            prompts, field = req.prompts(), "prompt"
        self.check(req, prompts, field)
        return req, prompts, self.job(req, self.encode(prompts, field), field, loop)

    def check(self, req: Sampling, prompts: list[Any], field: str) -> None:
        """The request against the server's models and limits (--max-n, --max-batch-size): 404 or 400."""
        if req.model not in self.pool.ids:
            served = ", ".join(self.pool.ids)
            raise APIError(
                404,
                f"model `{req.model}` is not served here; GET /v1/models lists: {served}",
                "model",
                "model_not_found",
            )
        if req.n > self.max_n:
            raise APIError(400, f"n = {req.n} is over this server's limit of {self.max_n} (--max-n)", "n")
        if len(prompts) * req.n > self.batcher.max_batch_size:
            raise APIError(
                400,
                f"{len(prompts)} prompt(s) x n = {req.n} asks for {len(prompts) * req.n} answers; "
                f"this server generates at most {self.batcher.max_batch_size} at once "
                "(--max-batch-size): send fewer",
                field,
            )
        if req.top_logprobs_asked() is not None and not getattr(self.batcher.generate, "logprobs", False):
            raise APIError(400, "this server's backend (vLLM) does not return log-probs", "logprobs")

    def encode(self, prompts: list[Any], field: str) -> list[list[int]]:
        """Token ids of each prompt (messages through the chat template), each inside the input limit."""

        try:
            ids = encode_prompts(self.pool.tokenizer, prompts)
        except Exception as exc:  # the chat template refused the messages (e.g. roles out of order)
            what = (
                "the model's chat template refused the messages" if field == "messages" else "cannot tokenize"
            )
            raise APIError(400, f"{what}: {exc}", field) from exc
        if min(len(p) for p in ids) == 0:
            raise APIError(400, f"`{field}` is empty: give the model something to continue", field)
        longest = max(len(p) for p in ids)
        limit = self.max_input_tokens or self.pool.context
        if limit and longest > limit:
            source = "--max-input-tokens" if self.max_input_tokens else "the model's context"
            raise APIError(
                413,
                f"the prompt is {longest} tokens, over {limit} ({source})",
                field,
                "context_length_exceeded",
            )
        return ids

    def job(self, req: Sampling, ids: list[list[int]], field: str, loop: asyncio.AbstractEventLoop) -> Job:
        """The job of a checked, tokenized request, its token limit inside the model's context (or a 413)."""
        longest = max(len(p) for p in ids)
        room = (self.pool.context - longest) if self.pool.context else None
        wanted = req.token_limit() or room or 256
        max_tokens = min(wanted, room) if room else wanted  # never past the model's context
        if max_tokens < 1:
            raise APIError(
                413,
                f"the prompt ({longest} tokens) leaves no room in the model's context",
                field,
                "context_length_exceeded",
            )
        tok, top = self.pool.tokenizer, req.top_logprobs_asked()
        job = Job(
            req.model, ids, req.n, max_tokens, req.temperature, req.top_p, req.stop, req.seed, tok, loop, top
        )
        job.streaming = bool(req.stream)
        return job

    async def log(self, job: Job, cid: str, prompts: list[Any], req: Sampling) -> None:
        """Each answered prompt into the feedback store (committed before the answer's last byte is sent)."""
        if self.store is None:
            return
        params = {
            "temperature": req.temperature,
            "top_p": req.top_p,
            "max_tokens": job.max_tokens,
            "n": req.n,
            "stop": req.stop,
            "seed": req.seed,
        }
        created = int(time.time())
        try:
            for p, prompt in enumerate(prompts):
                answers = [r.text for r in job.rows[p * job.n : (p + 1) * job.n]]
                pid = cid if len(prompts) == 1 else f"{cid}:{p}"
                await asyncio.to_thread(
                    self.store.log_completion, pid, req.model, prompt, answers, created, params, p * job.n
                )
        except Exception:  # the answer is still the client's: a store failure is logged, not a 500
            log.exception("could not store completion %s in --log-db", cid)

    def count(self, job: Job) -> None:
        usage = job.usage()
        self.metrics.prompt_tokens.inc(usage["prompt_tokens"])
        self.metrics.completion_tokens.inc(usage["completion_tokens"])


def build_app(server: Server, api_key: str | None = None) -> Any:
    """The ASGI application: FastAPI routes wrapped in the metrics and API-key middleware."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.batcher.start()
        yield  # uvicorn drains the requests in flight (SIGTERM) before this returns
        await server.batcher.stop()
        if server.store is not None:
            server.store.close()

    app = FastAPI(title="alignkit", lifespan=lifespan)
    _errors(app)
    _routes(app, server)
    return MetricsAndAuth(app, server.metrics, api_key)


def _errors(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return JSONResponse(APIError(400, message, param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)


def _routes(app: FastAPI, server: Server) -> None:
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def card(mid: str) -> dict:
        root = server.pool.paths[mid]
        return {"id": mid, "object": "model", "created": server.started, "owned_by": "alignkit", "root": root}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [card(mid) for mid in server.pool.ids]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id not in server.pool.ids:
            raise APIError(404, f"model `{model_id}` is not served here", "model", "model_not_found")
        return card(model_id)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await _answer(server, request, ChatRequest, f"chatcmpl-{uuid.uuid4().hex}")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _answer(server, request, CompletionRequest, f"cmpl-{uuid.uuid4().hex}")

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> dict:
        body = await read_body(request, server.max_request_bytes)
        fb = await asyncio.to_thread(parse_body, body, Feedback)
        if server.store is None:
            raise APIError(404, "this server keeps no completions: start it with --log-db to take feedback")
        known = await asyncio.to_thread(server.store.add_feedback, fb.id, fb.label, fb.comment, fb.index)
        if not known:
            raise APIError(404, f"no completion with id `{fb.id}` and index {fb.index} is stored", "id")
        return {"object": "feedback", "id": fb.id, "index": fb.index, "label": fb.label}


async def _answer(server: Server, request: Request, kind: type[Sampling], cid: str) -> Any:
    body = await read_body(request, server.max_request_bytes)  # 413 before a byte past the limit is read
    loop = asyncio.get_running_loop()
    req, prompts, job = await asyncio.to_thread(server.prepare, body, kind, loop)
    what = "chat.completion" if kind is ChatRequest else "text_completion"
    server.batcher.submit(job)  # 503 when the queue is full, before any byte is sent
    if req.stream:
        return StreamingResponse(_sse(server, job, req, prompts, what, cid), media_type="text/event-stream")
    try:
        await _wait_while_connected(job, request)
    finally:
        if not job.done:
            server.batcher.withdraw(job)
    if not job.done:  # the client left: nobody to answer
        return Response(status_code=499)
    server.count(job)
    await server.log(job, cid, prompts, req)
    return _body(job, what, cid, req.model)


async def _wait_while_connected(job: Job, request: Request, poll_s: float = 0.25) -> None:
    """Wait for the job, watching the connection: a client that gave up stops its rows (or leaves the queue)
    instead of holding a generation pass for an answer nobody reads."""
    waiter = asyncio.ensure_future(job.wait())
    try:
        while not waiter.done():
            await asyncio.wait({waiter}, timeout=poll_s)
            if not waiter.done() and await request.is_disconnected():
                return
        waiter.result()  # an engine failure raises here
    finally:
        if not waiter.done():
            waiter.cancel()


def _logprobs(job: Job, chat: bool, index: int, steps: list[Step], names: TokenNames) -> dict | None:
    """A choice's (or a chunk's) `logprobs`: None unless the request asked for them."""
    if job.top_logprobs is None:
        return None
    if chat:
        return chat_logprobs(steps, job.top_logprobs, names)
    return completion_logprobs(steps, job.top_logprobs, job.rows[index].text, names)


def _body(job: Job, kind: str, cid: str, model: str) -> dict:
    choices, chat, names = [], kind == "chat.completion", TokenNames(job.tokenizer)
    for row in job.rows:
        finish = "length" if row.finish == "cancelled" else row.finish
        logprobs = _logprobs(job, chat, row.index, row.steps or [], names)
        if chat:
            choices.append(
                {
                    "index": row.index,
                    "message": {"role": "assistant", "content": row.text},
                    "finish_reason": finish,
                    "logprobs": logprobs,
                }
            )
        else:
            choices.append(
                {"index": row.index, "text": row.text, "finish_reason": finish, "logprobs": logprobs}
            )
    return {
        "id": cid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": job.usage(),
    }


async def _sse(
    server: Server, job: Job, req: Sampling, prompts: list, kind: str, cid: str
) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: a role chunk per choice (chat), text deltas, a finish chunk per
    choice, the usage chunk if asked, then `data: [DONE]`. A client that leaves stops its rows."""
    chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
    created, names = int(time.time()), TokenNames(job.tokenizer)

    def event(choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": cid, "object": chunk_kind, "created": created, "model": req.model, "choices": choices}
        if usage is not None or req.include_usage():
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def choice(
        index: int, text: str | None, finish: str | None, role: bool = False, steps: list[Step] | None = None
    ) -> dict:
        chat = chunk_kind != "text_completion"
        logprobs = _logprobs(job, chat, index, steps, names) if steps is not None else None
        if not chat:
            return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
        delta = (
            {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
        )
        return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}

    try:
        if chunk_kind != "text_completion":
            yield event([choice(r.index, None, None, role=True) for r in job.rows])
        async for index, text, steps in job.stream():  # each chunk: the log-probs of its new tokens
            yield event([choice(index, text, None, steps=steps)])
        yield event(
            [choice(r.index, None, "length" if r.finish == "cancelled" else r.finish) for r in job.rows]
        )
        if req.include_usage():
            yield event([], job.usage())
        server.count(job)
        await server.log(job, cid, prompts, req)
        yield "data: [DONE]\n\n"
    except APIError as exc:  # the engine failed after the stream began: say so in the stream
        yield f"data: {json.dumps(exc.body())}\n\n"
    finally:
        if not job.done:
            server.batcher.withdraw(job)
            server.count(job)
