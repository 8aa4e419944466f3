"""`alignkit console`: the console's app on a port, in the foreground (the command) or on a background thread
(`start_console`, for notebooks and tests)."""

from __future__ import annotations

import logging
from contextlib import closing

import uvicorn

from alignkit.console.app import ConsoleSettings, build_app
from alignkit.console.context import is_loopback
from alignkit.errors import UserError
from alignkit.ship.serve.command import RunningServer, listen, listen_socket

log = logging.getLogger("alignkit")


def _bound(settings: ConsoleSettings) -> tuple[uvicorn.Server, object]:
    if not is_loopback(settings.host) and not settings.token:
        raise UserError(
            f"--host {settings.host} lets other machines in: give --token T (every request must carry it), "
            "or keep the default 127.0.0.1"
        )
    if settings.max_upload_mb <= 0:
        raise UserError(f"--max-upload-mb must be > 0, got {settings.max_upload_mb}")
    sock = listen_socket(settings.host, settings.port)
    try:
        app = build_app(settings)
        listen(sock, settings.host, settings.port)
    except BaseException:
        sock.close()
        raise
    config = uvicorn.Config(
        app, host=settings.host, port=sock.getsockname()[1], log_level="warning", timeout_graceful_shutdown=5
    )
    return uvicorn.Server(config), sock


def run_console(settings: ConsoleSettings) -> int:
    server, sock = _bound(settings)
    with closing(sock):
        port = sock.getsockname()[1]
        query = f"?token={settings.token}" if settings.token else ""
        log.info("console at http://%s:%d/%s (workspace %s)", settings.host, port, query, settings.workspace)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            pass
    return 0


def start_console(settings: ConsoleSettings) -> RunningServer:
    """The console on a background thread of this process; `url`, `stop()`; a context manager."""
    server, sock = _bound(settings)
    return RunningServer(server, sock, [], settings.host, path="").start()
