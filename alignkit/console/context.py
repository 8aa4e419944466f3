"""What the console's routes share: its settings, its state (workspace, jobs, chat models, feedback store,
servers), the request body reader and the error answer."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from alignkit.console.chat import ChatModels
from alignkit.console.jobs import Jobs
from alignkit.console.workspace import Workspace
from alignkit.errors import UserError
from alignkit.ship.serve.body import read_bounded
from alignkit.ship.serve.feedback import FeedbackStore

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


def error_response(status: int, message: str, key: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "key": key}, status_code=status)


class FormError(UserError):
    def __init__(self, message: str, key: str | None) -> None:
        super().__init__(message)
        self.key = key


def integer(value: Any, key: str, default: int, low: int, high: int) -> int:
    """A whole number from a request, in [low, high]; a UserError naming `key` otherwise (never a 500)."""
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UserError(f"`{key}`: a whole number (got {value!r})") from None
    if not low <= number <= high:
        raise UserError(f"`{key}`: between {low} and {high} (got {number})")
    return number


def is_loopback(host: str) -> bool:
    """Whether a host name or address is this machine only (127.0.0.0/8, ::1, localhost): the one test of
    whether the console needs a token and whether a request's Host may be trusted."""
    name = host.strip("[]")
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return name == "localhost"
