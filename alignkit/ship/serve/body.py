"""Request bodies: JSON only, bounded before they are read, parsed away from the event loop.

A body over `--max-request-bytes` is a 413 as soon as its Content-Length says so, or as soon as a streamed
(chunked) body passes the bound: no more than the limit (and the chunk that passed it) is ever held in memory.
Parsing and checking run in a worker thread (`parse_body` is synchronous on purpose), so that one big request
never stalls the others.
"""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from alignkit.ship.serve.protocol import APIError, validation_message

# the default of --max-request-bytes: far above the text of a long context (128k tokens: about 0.5 MB)
MAX_REQUEST_BYTES = 4 * 1024 * 1024

Model = TypeVar("Model", bound=BaseModel)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, at most `limit` bytes: 400 unless it is JSON, 413 once it is known to be bigger."""
    check_content_type(request.headers.get("content-type"))
    return await read_bounded(request, limit)


async def read_bounded(request: Request, limit: int, flag: str = "--max-request-bytes") -> bytes:
    """The body of any type, at most `limit` bytes (`flag` sets the limit): a 413 once it is known to be
    bigger, from Content-Length or from what has streamed in."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit, int(declared), flag)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(limit, None, flag)
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "the connection closed before the request body ended") from None
    return b"".join(chunks)


def check_content_type(value: str | None) -> None:
    """JSON (`application/json`, `application/*+json`) or no Content-Type at all (read as JSON); anything else
    is a 400 that says what came, e.g. a form that `curl -d` sends unless told `-H 'Content-Type: ...'`."""
    media = (value or "").split(";", 1)[0].strip().lower()
    json_type = media == "application/json" or (media.startswith("application/") and media.endswith("+json"))
    if not media or json_type:
        return
    raise APIError(
        400,
        f"request body must be JSON (Content-Type: application/json); got {media}",
        None,
        "unsupported_content_type",
    )


def too_large(limit: int, size: int | None = None, flag: str = "--max-request-bytes") -> APIError:
    """The 413 of a body over `limit` bytes (`size`: its declared length, when it declared one)."""
    what = f"is {size} bytes, over" if size is not None else "is over"
    return APIError(
        413,
        f"the request body {what} this server's limit of {limit} bytes ({flag})",
        None,
        "request_too_large",
    )


def parse_body(body: bytes, model: type[Model]) -> Model:
    """The body as `model`, or a 400 naming the field at fault. CPU work on a body of up to
    --max-request-bytes: call it in a worker thread."""
    if not body.strip():
        raise APIError(400, "the request body is empty: send a JSON object")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested past the recursion limit
        raise APIError(400, f"the body is not valid JSON: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(list(exc.errors()))
        raise APIError(400, message, param) from None
    except RecursionError:
        raise APIError(400, "the body is nested too deeply") from None
