"""The routes of using a model: streamed chat, votes and the feedback store (browse, make KTO data), and
`serve` started and stopped for a model."""

from __future__ import annotations

import math
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from alignkit import api
from alignkit.console.context import Console, body, integer
from alignkit.errors import UserError
from alignkit.ship.serve.protocol import APIError


def chat_routes(app: FastAPI, console: Console) -> None:
    ws = console.ws

    @app.get("/api/models")
    async def models() -> list[dict[str, str]]:
        """The models a run made: finished training runs' folders and exported models."""
        found = []
        for run in ws.runs():
            if run.status == "finished" and run.kind in ("train", "export"):
                folder = ws.run_dir(run.id) / ("output" if run.kind == "train" else "model")
                found.append({"path": ws.rel(folder), "label": f"{run.id} ({run.label})"})
        return found

    @app.post("/api/chat")
    async def chat(request: Request) -> StreamingResponse:
        data = await body(request)
        messages = data.get("messages")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise UserError("messages: a list of {role, content} objects, both text")
        given = str(data.get("model", ""))
        path = ws.model_or_hub(given, "model")
        sampling = {k: data[k] for k in ("temperature", "max_new_tokens", "top_p") if data.get(k) is not None}
        lines = console.chat.stream(path, ws.rel(path), messages, **sampling)
        return StreamingResponse(lines, media_type="application/x-ndjson")

    @app.post("/api/feedback")
    async def vote(request: Request) -> dict[str, bool]:
        data = await body(request)
        label = data.get("label")
        if label not in ("up", "down"):
            raise UserError("label: up or down")
        ok = console.store.add_feedback(str(data.get("id", "")), label, data.get("comment"))
        if not ok:
            raise APIError(404, f"no answer {data.get('id')!r} in the feedback store")
        return {"ok": True}

    @app.get("/api/feedback")
    async def entries(
        model: str | None = None, label: str | None = None, q: str | None = None, days: str | None = None
    ) -> list[dict[str, Any]]:
        try:
            since = time.time() - float(days) * 86400 if days else None
            if since is not None and not math.isfinite(since):
                raise ValueError(days)
        except ValueError:
            raise UserError(f"days: a number of days (got {days!r})") from None
        if label and label not in ("up", "down", "none"):
            raise UserError(f"label: up, down or none (got {label!r})")
        return console.store.entries(model or None, label or None, q or None, since)

    @app.post("/api/feedback/data")
    async def make_data(request: Request) -> dict[str, Any]:
        model = (await body(request)).get("model") or None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = ws.path(f"data/feedback-kto-{stamp}.jsonl", "output")
        target.parent.mkdir(exist_ok=True)
        counts = await run_in_threadpool(
            api.from_feedback, str(ws.root / "feedback.db"), str(target), model=model
        )
        voted = console.store.models_with_feedback()
        source = model or (voted[0] if len(voted) == 1 else "")  # the model the votes are on, when one
        prefill: dict[str, Any] = {"stage": "kto", "model_name_or_path": source, "dataset": ws.rel(target)}
        if source and (ws.path(source, "model") / "adapter_config.json").is_file():
            prefill["finetuning_type"] = "lora"  # the run's adapter, trained on
        if counts["rows"] and not (counts["up"] and counts["down"]):  # KTO refuses one label unless told
            prefill["allow_single_label"] = True
        return {"path": ws.rel(target), "counts": counts, "prefill": prefill}


def serve_routes(app: FastAPI, console: Console) -> None:
    """`alignkit serve` for a model, on a port of this machine, its answers and votes in the console's store."""

    @app.post("/api/serve")
    async def start(request: Request) -> dict[str, Any]:
        data = await body(request)
        path = console.ws.model_or_hub(str(data.get("model", "")), "model")
        port = integer(data.get("port"), "port", 8000, 1, 65535)
        if port in console.servers:
            raise UserError(f"port {port} already serves {console.servers[port][1]}; stop it first")
        db = str(console.ws.root / "feedback.db")
        handle = await run_in_threadpool(lambda: api.serve(path, port=port, log_db=db))
        console.servers[port] = (handle, console.ws.rel(path))
        return _server(port, handle, console.ws.rel(path))

    @app.get("/api/serve")
    async def servers() -> list[dict[str, Any]]:
        return [_server(port, handle, model) for port, (handle, model) in sorted(console.servers.items())]

    @app.post("/api/serve/{port}/stop")
    async def stop(port: int) -> dict[str, bool]:
        if port not in console.servers:
            raise APIError(404, f"nothing served on port {port} by this console")
        handle, _ = console.servers.pop(port)
        await run_in_threadpool(handle.stop)
        return {"ok": True}


def _server(port: int, handle: Any, model: str) -> dict[str, Any]:
    return {"port": port, "url": handle.url, "ids": list(handle.ids), "model": model}
