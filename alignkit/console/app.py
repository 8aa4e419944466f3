"""The console's web app: the page (static files shipped in the package) and its JSON API, every route a call
into the library or the console's jobs. A mistake in a request is a 4xx with the message the CLI would print
(and the key at fault, for forms); the app keeps serving.

Safety: bound to 127.0.0.1 by default; with a token, every request carries it (the page's first load takes it
from `?token=` and keeps it as a cookie); every path is checked by the workspace.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from alignkit import api
from alignkit.comparison.config import compare_config
from alignkit.config import STAGES
from alignkit.console.chat import ChatModels
from alignkit.console.forms import check_keys, error_key, eval_form, stage_form
from alignkit.console.jobs import Jobs
from alignkit.console.models import model_info
from alignkit.console.paths import checked_compare, checked_keys
from alignkit.console.preview import preview
from alignkit.console.workspace import PathRefused, Workspace
from alignkit.errors import UserError
from alignkit.evaluation import registry as metric_registry
from alignkit.evaluation.config import build_eval_config
from alignkit.ship.serve.body import read_bounded
from alignkit.ship.serve.feedback import FeedbackStore
from alignkit.ship.serve.protocol import APIError

log = logging.getLogger("alignkit")
STATIC = resources.files("alignkit.console") / "static"
COOKIE = "alignkit_console_token"
MAX_JSON_BYTES = 4 * 1024 * 1024


@dataclass
class ConsoleSettings:
    workspace: str = "alignkit-workspace"
    host: str = "127.0.0.1"
    port: int = 7860
    token: str | None = None  # required of every request; needed when host is not a loopback address
    allow: list[str] = field(default_factory=list)  # folders outside the workspace it may read and write
    max_upload_mb: float = 200.0


class Console:
    """What the routes share: the workspace, the jobs, the chat models and the feedback store."""

    def __init__(self, settings: ConsoleSettings) -> None:
        self.settings = settings
        self.ws = Workspace(settings.workspace, settings.allow)
        self.interrupted = self.ws.recover()
        self.jobs = Jobs(self.ws)
        self.store = FeedbackStore(str(self.ws.root / "feedback.db"))
        self.chat = ChatModels(self.store)
        self.servers: dict[int, tuple[Any, str]] = {}  # port -> (the running server, its model)

    def close(self) -> None:
        for handle, _ in self.servers.values():
            handle.stop(timeout=5.0)
        self.jobs.close()
        self.store.close()


async def body(request: Request) -> dict[str, Any]:
    raw = await read_bounded(request, MAX_JSON_BYTES, "the console's request limit")
    try:
        data = json.loads(raw or b"{}")
    except ValueError as exc:
        raise UserError(f"the request body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError("the request body must be a JSON object")
    return data


def _error(status: int, message: str, key: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "key": key}, status_code=status)


def build_app(settings: ConsoleSettings) -> FastAPI:
    console = Console(settings)
    app = FastAPI(title="alignkit console", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.console = console
    app.router.on_shutdown.append(console.close)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> JSONResponse:
        if isinstance(exc, PathRefused):
            return _error(403, str(exc), exc.key)
        return _error(400, str(exc))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:  # a console bug: said, and logged
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(500, f"the console failed on this request ({type(exc).__name__}: {exc}); see its log")

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
        return _error(400, f"{where}: {first.get('msg', 'not valid')}", where or None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.middleware("http")
    async def token(request: Request, call_next: Any) -> Response:
        expected = settings.token
        if not expected:
            return await call_next(request)
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        given = given or request.cookies.get(COOKIE, "") or request.query_params.get("token", "")
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return _error(401, "this console needs its token: open it with ?token=TOKEN")
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie(COOKIE, expected, httponly=True, samesite="strict")
        return response

    _page_routes(app)
    _form_routes(app, console)
    _run_routes(app, console)
    _chat_routes(app, console)
    _serve_routes(app, console)
    return app


def _page_routes(app: FastAPI) -> None:
    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), headers={"Cache-Control": "no-store"})

    @app.get("/favicon.ico")
    async def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/static/{name}")
    async def static(name: str) -> FileResponse:
        if name not in {p.name for p in STATIC.iterdir()}:
            raise APIError(404, f"no file {name}")
        return FileResponse(str(STATIC / name))


def _form_routes(app: FastAPI, console: Console) -> None:
    ws = console.ws

    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        data_dir = ws.root / "data"
        return {
            "workspace": str(ws.root),
            "allowed": [str(r) for r in ws.roots[1:]],
            "stages": list(STAGES),
            "interrupted": console.interrupted,
            "data_files": sorted(p.name for p in data_dir.iterdir()) if data_dir.is_dir() else [],
        }

    @app.get("/api/form/{stage}")
    async def form(stage: str) -> dict[str, Any]:
        return {"stage": stage, "fields": eval_form() if stage == "eval" else stage_form(stage)}

    @app.post("/api/check")
    async def check(request: Request) -> dict[str, Any]:
        keys = (await body(request)).get("keys", {})
        try:
            keys = checked_keys(ws, keys)
        except PathRefused as exc:
            return {"error": {"key": exc.key, "message": str(exc)}}
        return {"error": await run_in_threadpool(check_keys, keys)}

    @app.post("/api/yaml")
    async def to_yaml(request: Request) -> dict[str, str]:
        keys = (await body(request)).get("keys", {})
        return {"yaml": yaml.safe_dump(keys, sort_keys=False, allow_unicode=True)}

    @app.post("/api/yaml/parse")
    async def from_yaml(request: Request) -> dict[str, Any]:
        text = (await body(request)).get("yaml", "")
        try:
            keys = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"not valid YAML: {exc}") from None
        if not isinstance(keys, dict):
            raise UserError("the YAML must be a mapping of keys to values")
        return {"keys": keys}

    @app.post("/api/configs")
    async def save_config(request: Request) -> dict[str, str]:
        data = await body(request)
        name = str(data.get("name", "")).strip()
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise UserError("config name: letters, digits, - and _ only")
        path = ws.root / "configs" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(data.get("keys", {}), sort_keys=False, allow_unicode=True), "utf-8")
        return {"path": str(path)}

    @app.post("/api/model")
    async def model(request: Request) -> dict[str, Any]:
        path = ws.model_or_hub(str((await body(request)).get("path", "")), "model")
        return await run_in_threadpool(model_info, path)

    @app.post("/api/data/preview")
    async def data_preview(request: Request) -> dict[str, Any]:
        data = await body(request)
        keys = checked_keys(ws, {k: data.get(k) for k in ("dataset", "dataset_dir", "model_name_or_path")})
        model = keys.get("model_name_or_path")
        args = (keys["dataset"], keys["dataset_dir"], model, int(data.get("rows", 5)), data.get("template"))
        return await run_in_threadpool(preview, *args)

    @app.post("/api/data/inspect")
    async def data_inspect(request: Request) -> dict[str, Any]:
        data = await body(request)
        keys = checked_keys(ws, {k: data.get(k) for k in ("dataset", "dataset_dir", "model_name_or_path")})
        return await run_in_threadpool(
            lambda: api.inspect(
                keys["dataset"],
                model=keys.get("model_name_or_path"),
                max_length=int(data.get("max_length") or 1024),
                dataset_dir=keys["dataset_dir"],
            )
        )

    @app.post("/api/upload")
    async def upload(request: Request, name: str) -> dict[str, Any]:
        safe = Path(name).name
        if not safe or safe != name or not safe.endswith((".json", ".jsonl", ".csv", ".parquet")):
            raise UserError(f"upload {name!r}: a plain file name ending in .json, .jsonl, .csv or .parquet")
        limit = int(console.settings.max_upload_mb * 1024 * 1024)
        data = await read_bounded(request, limit, "--max-upload-mb")
        target = ws.path(f"data/{safe}", "upload")
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(data)
        return {"path": ws.rel(target), "bytes": len(data)}


def _job_keys(console: Console, kind: str, config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A job's keys, paths checked, values checked as the command would check them: (keys, label)."""
    ws = console.ws
    if kind == "train":
        keys = checked_keys(ws, config)
        problem = check_keys(keys)
        if problem:
            raise FormError(problem["message"], problem["key"])
        return keys, f"{keys.get('stage', 'sft')} · {ws.rel(keys.get('model_name_or_path', ''))}"
    if kind == "eval":
        keys = checked_keys(ws, config, training=False)
        try:
            build_eval_config({**keys, "output_dir": str(ws.root)}, "form")
        except UserError as exc:
            raise FormError(str(exc).removeprefix("form: "), error_key(str(exc), keys)) from None
        return keys, f"eval · {ws.rel(keys.get('model', ''))}"
    if kind == "compare":
        keys = checked_compare(ws, config)
        try:
            compare_config({**keys, "output_dir": str(ws.root / "compare-check")})
        except UserError as exc:
            raise FormError(str(exc), error_key(str(exc), keys)) from None
        return keys, f"compare · {', '.join(keys.get('methods', {}))}"
    if kind == "export":
        keys = checked_keys(ws, config, training=False)
        return keys, f"export · {ws.rel(keys.get('adapter') or keys.get('model') or '')}"
    raise UserError(f"no job kind `{kind}`; kinds: train, eval, compare, export")


class FormError(UserError):
    def __init__(self, message: str, key: str | None) -> None:
        super().__init__(message)
        self.key = key


def _run_view(console: Console, run_id: str, after: int = 0) -> dict[str, Any]:
    run = console.ws.load(run_id)
    folder = console.ws.run_dir(run_id)
    log_file = folder / "log.txt"
    lines = log_file.read_text(encoding="utf-8").splitlines()[-200:] if log_file.is_file() else []
    records = console.jobs.records(run)
    resolved = folder / "output" / "config.yaml"  # every key as the run used it (defaults, derived values)
    return {
        **run.public(),
        "folder": console.ws.rel(folder),
        "progress": console.jobs.progress(run_id),
        "records": records[after:],
        "n_records": len(records),
        "log": lines,
        "yaml": yaml.safe_dump(run.config, sort_keys=False, allow_unicode=True),
        "resolved": resolved.read_text(encoding="utf-8") if resolved.is_file() else None,
    }


def _run_routes(app: FastAPI, console: Console) -> None:
    @app.exception_handler(FormError)
    async def form_error(request: Request, exc: FormError) -> JSONResponse:
        return _error(422, str(exc), exc.key)

    @app.post("/api/runs")
    async def start(request: Request) -> dict[str, Any]:
        data = await body(request)
        kind = str(data.get("kind", "train"))
        keys, label = await run_in_threadpool(_job_keys, console, kind, dict(data.get("config") or {}))
        return console.jobs.submit(kind, keys, label).public()

    @app.get("/api/runs")
    async def runs() -> list[dict[str, Any]]:
        return [{**r.public(), "progress": console.jobs.progress(r.id)} for r in console.ws.runs()]

    @app.get("/api/runs/{run_id}")
    async def run(run_id: str, after: int = 0) -> dict[str, Any]:
        return _run_view(console, run_id, max(0, after))

    @app.post("/api/runs/{run_id}/stop")
    async def stop(run_id: str) -> dict[str, Any]:
        return console.jobs.stop(run_id).public()

    @app.post("/api/runs/{run_id}/resume")
    async def resume(run_id: str) -> dict[str, Any]:
        return console.jobs.resume(run_id).public()

    @app.get("/api/runs/{run_id}/plots/{name}")
    async def plot(run_id: str, name: str) -> FileResponse:
        """A compare run's plot (a PNG it wrote)."""
        folder = console.ws.run_dir(run_id) / "compare"
        if not name.endswith(".png") or name not in {p.name for p in folder.glob("*.png")}:
            raise APIError(404, f"run {run_id} has no plot {name}")
        return FileResponse(str(folder / name))

    @app.get("/api/runs/{run_id}/samples")
    async def samples(run_id: str, worst: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        """An eval's samples.jsonl rows; `worst`: the metric whose worst scores come first."""
        path = console.ws.run_dir(run_id) / "eval" / "samples.jsonl"
        if not path.is_file():
            raise APIError(404, f"run {run_id} has no samples.jsonl")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if worst:
            rows = worst_first(rows, worst)
        return rows[: max(1, min(limit, 500))]


def worst_first(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Rows scored on `metric`, worst first: the lowest where higher is better, else (the metric should stay
    near the baseline: KL, length) the farthest from the baseline's score on the same prompt (from 0 where the
    baseline has none, as KL). Rows without the score come last."""
    spec = metric_registry.spec_of_row(metric)
    higher = spec is not None and spec.direction == "higher"

    def key(row: dict[str, Any]) -> tuple[int, float]:
        score = row.get("model", {}).get("scores", {}).get(metric)
        if not isinstance(score, (int, float)):
            return (1, 0.0)
        if higher:
            return (0, score)
        base = (row.get("baseline") or {}).get("scores", {}).get(metric, 0.0)
        return (0, -abs(score - base))

    return sorted(rows, key=key)


def _chat_routes(app: FastAPI, console: Console) -> None:
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


def _serve_routes(app: FastAPI, console: Console) -> None:
    """`alignkit serve` for a model, on a port of this machine, its answers and votes in the console's store."""

    @app.post("/api/serve")
    async def start(request: Request) -> dict[str, Any]:
        data = await body(request)
        path = console.ws.model_or_hub(str(data.get("model", "")), "model")
        port = int(data.get("port") or 8000)
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
