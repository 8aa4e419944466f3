"""The console's web app: the page (static files shipped in the package) and its JSON API, every route a call
into the library or the console's jobs. A mistake in a request is a 4xx with the message the CLI would print
(and the key at fault, for forms); the app keeps serving.

Safety: bound to 127.0.0.1 by default; with a token, every request carries it (the page's first load takes it
from `?token=` and keeps it as a cookie); every path is checked by the workspace.
"""

from __future__ import annotations

import hmac
import logging
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response

from alignkit.console.context import Console, ConsoleSettings, error_response, is_loopback
from alignkit.console.routes_data import data_routes, form_routes
from alignkit.console.routes_runs import review_routes, run_routes, worst_first
from alignkit.console.routes_ship import chat_routes, serve_routes
from alignkit.console.workspace import PathRefused
from alignkit.errors import UserError
from alignkit.ship.serve.protocol import APIError

log = logging.getLogger("alignkit")
STATIC = resources.files("alignkit.console") / "static"
COOKIE = "alignkit_console_token"
__all__ = ["ConsoleSettings", "build_app", "worst_first"]


def build_app(settings: ConsoleSettings) -> FastAPI:
    console = Console(settings)
    app = FastAPI(title="alignkit console", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.console = console
    app.router.on_shutdown.append(console.close)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> JSONResponse:
        if isinstance(exc, PathRefused):
            return error_response(403, str(exc), exc.key)
        return error_response(400, str(exc))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:  # a console bug: said, and logged
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(
            500, f"the console failed on this request ({type(exc).__name__}: {exc}); see its log"
        )

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
        return error_response(400, f"{where}: {first.get('msg', 'not valid')}", where or None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message)

    @app.middleware("http")
    async def token(request: Request, call_next: Any) -> Response:
        refused = foreign(request, settings)
        if refused:
            return error_response(403, refused)
        expected = settings.token
        if not expected:
            return await call_next(request)
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        given = given or request.cookies.get(COOKIE, "") or request.query_params.get("token", "")
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return error_response(401, "this console needs its token: open it with ?token=TOKEN")
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie(COOKIE, expected, httponly=True, samesite="strict")
        return response

    _page_routes(app)
    form_routes(app, console)
    data_routes(app, console)
    run_routes(app, console)
    chat_routes(app, console)
    serve_routes(app, console)
    review_routes(app, console)
    return app


def foreign(request: Request, settings: ConsoleSettings) -> str | None:
    """Why a request that did not come from the console's own page is refused, or None. Another site's page
    in the user's browser may send it requests: a write from another origin is refused (cross-site request
    forgery), and a console on loopback answers only to a loopback host name (DNS rebinding)."""
    host = request.headers.get("host", "")
    origin = request.headers.get("origin")
    if request.method not in ("GET", "HEAD") and origin and urlsplit(origin).netloc != host:
        return f"a request from another site ({origin}) is refused"
    name = urlsplit(f"//{host}").hostname or ""
    if is_loopback(settings.host) and not is_loopback(name):
        return f"this console answers on 127.0.0.1 / localhost only (the request named host {host})"
    return None


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
