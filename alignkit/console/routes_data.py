"""The routes of the model, the data and the forms: what a model is, a data set previewed and reported, a
stage's form, a config checked, YAML in and out, uploads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from alignkit import api
from alignkit.config import STAGES
from alignkit.console.context import Console, body, integer
from alignkit.console.forms import check_keys, eval_form, stage_form
from alignkit.console.models import model_info
from alignkit.console.paths import checked_keys
from alignkit.console.preview import preview
from alignkit.console.workspace import PathRefused
from alignkit.errors import UserError
from alignkit.ship.serve.body import read_bounded


def form_routes(app: FastAPI, console: Console) -> None:
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


def data_routes(app: FastAPI, console: Console) -> None:
    ws = console.ws

    @app.post("/api/model")
    async def model(request: Request) -> dict[str, Any]:
        path = ws.model_or_hub(str((await body(request)).get("path", "")), "model")
        return await run_in_threadpool(model_info, path)

    @app.post("/api/data/preview")
    async def data_preview(request: Request) -> dict[str, Any]:
        data = await body(request)
        keys = checked_keys(ws, {k: data.get(k) for k in ("dataset", "dataset_dir", "model_name_or_path")})
        model = keys.get("model_name_or_path")
        args = (
            keys["dataset"],
            keys["dataset_dir"],
            model,
            integer(data.get("rows"), "rows", 5, 1, 100),
            data.get("template"),
        )
        return await run_in_threadpool(preview, *args)

    @app.post("/api/data/inspect")
    async def data_inspect(request: Request) -> dict[str, Any]:
        data = await body(request)
        keys = checked_keys(ws, {k: data.get(k) for k in ("dataset", "dataset_dir", "model_name_or_path")})
        return await run_in_threadpool(
            lambda: api.inspect(
                keys["dataset"],
                model=keys.get("model_name_or_path"),
                max_length=integer(data.get("max_length"), "max_length", 1024, 1, 10**7),
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
