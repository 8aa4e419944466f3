"""The routes of the jobs: start (train, eval, compare, sxs, export; paths and values checked first), the run
list, a run's view (progress, records since the page's last poll, log, configs), stop and resume, an eval's
samples worst first, a compare's plots, and the blind side-by-side review served live."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from alignkit import api
from alignkit.comparison.config import compare_config
from alignkit.console.context import Console, FormError, body, error_response, integer
from alignkit.console.forms import check_keys, error_key
from alignkit.console.paths import checked_compare, checked_keys
from alignkit.console.workspace import write_json_atomic
from alignkit.errors import UserError
from alignkit.evaluation import registry as metric_registry
from alignkit.evaluation.config import build_eval_config
from alignkit.evaluation.sxs import VOTES as SXS_VOTES
from alignkit.evaluation.sxs import script_json
from alignkit.ship.serve.protocol import APIError


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
    if kind == "sxs":
        keys = checked_keys(ws, config, training=False)
        missing = [k for k in ("model", "baseline", "dataset") if not keys.get(k)]
        if missing:
            raise FormError(f"`{missing[0]}` is required for a side-by-side review", missing[0])
        keys["max_samples"] = integer(keys.get("max_samples"), "max_samples", 20, 1, 10_000)
        keys["max_new_tokens"] = integer(keys.get("max_new_tokens"), "max_new_tokens", 128, 1, 100_000)
        return keys, f"review · {ws.rel(keys['model'])} vs {ws.rel(keys['baseline'])}"
    if kind == "export":
        keys = checked_keys(ws, config, training=False)
        return keys, f"export · {ws.rel(keys.get('adapter') or keys.get('model') or '')}"
    raise UserError(f"no job kind `{kind}`; kinds: train, eval, compare, sxs, export")


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


def run_routes(app: FastAPI, console: Console) -> None:
    @app.exception_handler(FormError)
    async def form_error(request: Request, exc: FormError) -> JSONResponse:
        return error_response(422, str(exc), exc.key)

    @app.post("/api/runs")
    async def start(request: Request) -> dict[str, Any]:
        data = await body(request)
        kind = str(data.get("kind", "train"))
        config = data.get("config") or {}
        if not isinstance(config, dict):
            raise UserError(f"config: a mapping of keys to values (got {type(config).__name__})")
        keys, label = await run_in_threadpool(_job_keys, console, kind, config)
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


def review_routes(app: FastAPI, console: Console) -> None:
    """The blind side-by-side review served live: the page `alignkit sxs` writes, its votes stored here as
    they are cast, the key (which model is A) never sent to the page; a tally reveals it and writes data."""

    def folder(run_id: str) -> Path:
        run = console.ws.load(run_id)
        if run.kind != "sxs" or run.status != "finished":
            raise UserError(f"run {run_id} is not a finished side-by-side review")
        return console.ws.run_dir(run_id) / "sxs"

    @app.get("/api/runs/{run_id}/review")
    async def page(run_id: str) -> Response:
        where = folder(run_id)
        votes = where / "votes.json"
        live = {
            "url": f"/api/runs/{run_id}/votes",
            "votes": json.loads(votes.read_text("utf-8"))["votes"] if votes.is_file() else {},
        }
        hook = f"<script>window.ALIGNKIT_LIVE = {script_json(live)};</script>\n"  # no text ends the element
        html = (
            (where / "sxs.html")
            .read_text("utf-8")
            .replace('<script id="sxs-data"', hook + '<script id="sxs-data"', 1)
        )
        return Response(html, media_type="text/html", headers={"Cache-Control": "no-store"})

    @app.post("/api/runs/{run_id}/votes")
    async def votes(run_id: str, request: Request) -> dict[str, Any]:
        where = folder(run_id)
        data = await body(request)
        key = json.loads((where / "sxs_key.json").read_text("utf-8"))
        given = data.get("votes")
        if data.get("page_id") != key["page_id"]:
            raise UserError("these votes are for another review page")
        items = {item["id"] for item in key["items"]}
        if not isinstance(given, dict) or not all(k in items and v in SXS_VOTES for k, v in given.items()):
            raise UserError(f"votes: a mapping of this page's item ids to one of {', '.join(SXS_VOTES)}")
        page_id = key["page_id"]
        stored = where / "votes.json"
        # merged into the stored votes: another tab (or reviewer) of this page keeps its own
        kept = json.loads(stored.read_text("utf-8"))["votes"] if stored.exists() else {}
        merged = {**kept, **given}
        write_json_atomic(stored, {"page_id": page_id, "votes": merged, "saved_at": time.time()})
        return {"votes": len(merged), "all": merged}

    @app.post("/api/runs/{run_id}/tally")
    async def tally(run_id: str) -> dict[str, Any]:
        where = folder(run_id)
        if not (where / "votes.json").is_file():
            raise UserError("no votes yet: open the review and vote first")
        out = console.ws.root / "data" / f"review-{run_id}"
        made = await run_in_threadpool(api.from_votes, str(where / "votes.json"), output_dir=str(out))
        run = console.ws.load(run_id)
        run.result = {**run.result, "tallied": True, "summary": made["summary"]}
        console.ws.save(run)
        model = run.config["model"]
        prefill = {
            "stage": "dpo",
            "model_name_or_path": console.ws.rel(model),
            "dataset": console.ws.rel(made["dpo"]),
        }
        return {
            **made,
            "dpo": console.ws.rel(made["dpo"]),
            "kto": console.ws.rel(made["kto"]),
            "prefill": prefill,
        }
