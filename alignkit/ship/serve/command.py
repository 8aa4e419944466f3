"""`alignkit serve` (and `alignkit.serve`): load the model and its adapters, then run the OpenAI-compatible API
under uvicorn, in the foreground (the command) or on a thread (the library: a handle with `url` and `stop()`).

The port is bound before the model loads (a port in use is a one-line error at once, not after the load) and
the bound socket is handed to uvicorn. uvicorn owns the signals: on SIGTERM (or Ctrl-C) it stops accepting
connections, lets the requests in flight finish (streams included), then runs the app's shutdown, which stops
the batcher and closes the store.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import torch
import uvicorn

from alignkit.errors import UserError
from alignkit.generation.continuous import supports
from alignkit.ship.serve.app import Server, build_app
from alignkit.ship.serve.batcher import Batcher
from alignkit.ship.serve.body import MAX_REQUEST_BYTES
from alignkit.ship.serve.continuous import ContinuousBatcher, Stepper
from alignkit.ship.serve.engine import HFGenerate, ModelPool, VLLMGenerate, parse_adapters, vllm_available
from alignkit.ship.serve.feedback import FeedbackStore
from alignkit.ship.serve.metrics import Metrics

log = logging.getLogger("alignkit")
STARTUP_FAILURE = 3  # uvicorn's exit code when the app's startup fails


@dataclass
class ServeSettings:
    """What `alignkit serve` serves and how (its flags, by the same names)."""

    model: str
    adapter: list[str] = field(default_factory=list)  # NAME=DIR: a LoRA adapter on `model`, served as NAME
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port
    backend: str = "hf"  # hf | vllm
    batching: str = "continuous"  # hf: continuous | pass
    api_key: str | None = None  # default: $ALIGNKIT_API_KEY, else none
    max_batch_size: int = 32
    max_queue: int = 256
    max_input_tokens: int | None = None
    max_n: int = 16
    max_request_bytes: int | None = None  # default 4 MiB
    log_db: str | None = None
    dtype: str = "auto"
    device: str | None = None
    trust_remote_code: bool = False


def _bound(settings: ServeSettings) -> tuple[Any, socket.socket, list[str]]:
    """(the uvicorn server, its listening socket, the model ids): arguments checked, port bound, model loaded."""
    adapters, store = checked_args(settings)
    try:
        sock = listen_socket(settings.host, settings.port)
    except UserError:
        if store is not None:
            store.close()
        raise
    try:
        app, ids = build_server(settings, adapters, store)
        listen(sock, settings.host, settings.port)
    except BaseException:
        sock.close()
        if store is not None:
            store.close()
        raise
    port = sock.getsockname()[1]  # port 0: the port the system chose
    config = uvicorn.Config(
        app, host=settings.host, port=port, log_level="warning", timeout_graceful_shutdown=None
    )
    return uvicorn.Server(config), sock, ids


def serve_forever(settings: ServeSettings) -> int:
    """Serve in the foreground until SIGTERM or Ctrl-C (uvicorn drains the requests in flight); the exit code."""
    server, sock, ids = _bound(settings)
    with closing(sock):
        log.info("serving %s at http://%s:%d/v1", ", ".join(ids), settings.host, sock.getsockname()[1])
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # Ctrl-C: uvicorn has drained the requests in flight
            pass
    return 0 if server.started else STARTUP_FAILURE


class RunningServer:
    """A server on a background thread: `url` (the /v1 base of OpenAI clients), `ids` (its model ids),
    `stop()` (drain the requests in flight, then shut down); also a context manager."""

    def __init__(
        self, server: Any, sock: socket.socket, ids: list[str], host: str, path: str = "/v1"
    ) -> None:
        self._server, self._sock, self.ids = server, sock, ids
        self.url = f"http://{host}:{sock.getsockname()[1]}{path}"
        self._thread = threading.Thread(target=self._run, name="alignkit-serve", daemon=True)

    def _run(self) -> None:
        with closing(self._sock):
            self._server.run(sockets=[self._sock])

    def start(self, timeout: float = 60.0) -> RunningServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop(timeout=5.0)
                raise UserError(f"the server at {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Let the requests in flight finish for up to `timeout` seconds, then close what is still open."""
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():  # a stream that does not end: cut it
            self._server.force_exit = True
            self._thread.join(10.0)
        if self._thread.is_alive():
            raise UserError(f"the server at {self.url} did not stop")

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(settings: ServeSettings) -> RunningServer:
    """Serve on a background thread of this process; returns once the server answers."""
    server, sock, ids = _bound(settings)
    log.info("serving %s at http://%s:%d/v1", ", ".join(ids), settings.host, sock.getsockname()[1])
    return RunningServer(server, sock, ids, settings.host).start()


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (as uvicorn binds one: IPv6 when the host has a colon), or a UserError that
    says why not. Bound before the model loads, so that a server already there is said at once.

    The protocol is named: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on connections of a socket
    whose `proto` is IPPROTO_TCP, and with Nagle on, a response written in two parts (head, then body) waited
    for the client's delayed ACK: ~40 ms added to every answer."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(_bind_error(host, port, exc)) from None
    return sock


def listen(sock: socket.socket, host: str, port: int, backlog: int = 2048) -> None:
    """Listen on the bound socket, once the model is loaded (connections are refused, not left waiting, while
    it loads). A server that started on the same port meanwhile (a bound socket does not keep another process
    from binding it, only a listening one does) is the same one-line error."""
    try:
        sock.listen(backlog)
    except OSError as exc:
        raise UserError(_bind_error(host, port, exc)) from None


def _bind_error(host: str, port: int, exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return f"--host {host}: no such host ({exc.strerror}); give an address such as 127.0.0.1 or 0.0.0.0"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"port {port} on {host} is in use (another server listens there); stop it or pick another port "
            "with --port"
        )
    if exc.errno == errno.EACCES:
        return (
            f"port {port} on {host}: permission denied (ports below 1024 need root); pick another with --port"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"--host {host}: not an address of this machine; use 127.0.0.1, 0.0.0.0 or one of its own"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"


def checked_args(args: ServeSettings) -> tuple[dict[str, str], Any]:
    """({adapter name: folder}, the FeedbackStore or None): every bad argument is a UserError here, before
    the port is bound and the model loads."""
    _check_limits(args)
    adapters = parse_adapters(args.adapter)
    if args.backend == "vllm":
        vllm_available()
        if adapters or os.path.isfile(os.path.join(args.model, "adapter_config.json")):
            raise UserError(
                "--backend vllm serves a full model folder: merge the adapter first with "
                "`alignkit export`, or use --backend hf"
            )
    store = None
    if args.log_db:
        store = FeedbackStore(args.log_db)
    return adapters, store


def build_server(args: ServeSettings, adapters: dict[str, str], store: Any) -> tuple[object, list[str]]:
    """(the ASGI app, its model ids) from `alignkit serve`'s arguments, once `checked_args` passed them."""

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    weights = args.backend == "hf"  # vLLM loads the weights itself: only the tokenizer and config here
    pool = ModelPool(
        args.model, adapters, args.served_model_name, args.dtype, device, args.trust_remote_code, weights
    )
    metrics = Metrics()
    batcher = _batcher(args, pool, metrics)
    max_bytes = args.max_request_bytes or MAX_REQUEST_BYTES
    server = Server(pool, batcher, metrics, store, args.max_input_tokens, args.max_n, max_bytes)
    api_key = args.api_key or os.environ.get("ALIGNKIT_API_KEY") or None
    return build_app(server, api_key), list(pool.ids)


def _batcher(args: ServeSettings, pool: ModelPool, metrics: Metrics) -> Batcher:
    """vLLM's engine, transformers' generate pass by pass, or (the default for hf) continuous batching where
    the model's cache allows it."""
    if args.backend == "vllm":
        generate = VLLMGenerate(args.model, pool.tokenizer, pool.eos)
        return Batcher(generate, args.max_batch_size, args.max_queue, metrics, pool.context)
    why = supports(pool.model) if args.batching == "continuous" else None
    if args.batching == "continuous" and why is None:
        return ContinuousBatcher(Stepper(pool, metrics), args.max_batch_size, args.max_queue, metrics)
    if why:
        log.warning("continuous batching is off for this model (%s): requests batch pass by pass", why)
    return Batcher(HFGenerate(pool), args.max_batch_size, args.max_queue, metrics, pool.context)


def _check_limits(args: ServeSettings) -> None:
    for flag in ("max_batch_size", "max_queue", "max_n", "max_input_tokens", "max_request_bytes"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} {value}: give a positive number")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: give a port from 1 to 65535 (0: any free port)")
