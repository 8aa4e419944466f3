"""`alignkit serve`: load the model and its adapters, then run the OpenAI-compatible API under uvicorn.

The port is bound before the model loads (a port in use is a one-line error at once, not after the load) and
the bound socket is handed to uvicorn. uvicorn owns the signals: on SIGTERM (or Ctrl-C) it stops accepting
connections, lets the requests in flight finish (streams included), then runs the app's shutdown, which stops
the batcher and closes the store.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
from contextlib import closing
from typing import Any

from alignkit.errors import UserError

log = logging.getLogger("alignkit")
STARTUP_FAILURE = 3  # uvicorn's exit code when the app's startup fails


def serve_command(args: argparse.Namespace) -> int:
    import uvicorn

    adapters, store = checked_args(args)
    try:
        sock = listen_socket(args.host, args.port)
    except UserError:
        if store is not None:
            store.close()
        raise
    with closing(sock):
        app, ids = build_server(args, adapters, store)
        listen(sock, args.host, args.port)
        port = sock.getsockname()[1]  # --port 0: the port the system chose
        log.info("serving %s at http://%s:%d/v1", ", ".join(ids), args.host, port)
        config = uvicorn.Config(
            app, host=args.host, port=port, log_level="warning", timeout_graceful_shutdown=None
        )
        server = uvicorn.Server(config)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # Ctrl-C: uvicorn has drained the requests in flight
            pass
    return 0 if server.started else STARTUP_FAILURE


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (as uvicorn binds one: IPv6 when the host has a colon), or a UserError that
    says why not. Bound before the model loads, so that a server already there is said at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
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


def checked_args(args: argparse.Namespace) -> tuple[dict[str, str], Any]:
    """({adapter name: folder}, the FeedbackStore or None): every bad argument is a UserError here, before
    the port is bound and the model loads."""
    from alignkit.ship.serve.engine import parse_adapters, vllm_available

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
        from alignkit.ship.serve.feedback import FeedbackStore

        store = FeedbackStore(args.log_db)
    return adapters, store


def build_server(args: argparse.Namespace, adapters: dict[str, str], store: Any) -> tuple[object, list[str]]:
    """(the ASGI app, its model ids) from `alignkit serve`'s arguments, once `checked_args` passed them."""
    import torch

    from alignkit.ship.serve.app import Server, build_app
    from alignkit.ship.serve.batcher import Batcher
    from alignkit.ship.serve.body import MAX_REQUEST_BYTES
    from alignkit.ship.serve.engine import HFGenerate, ModelPool, VLLMGenerate
    from alignkit.ship.serve.metrics import Metrics

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    weights = args.backend == "hf"  # vLLM loads the weights itself: only the tokenizer and config here
    pool = ModelPool(
        args.model, adapters, args.served_model_name, args.dtype, device, args.trust_remote_code, weights
    )
    if args.backend == "vllm":
        generate = VLLMGenerate(args.model, pool.tokenizer, pool.eos)
    else:
        generate = HFGenerate(pool)
    metrics = Metrics()
    batcher = Batcher(generate, args.max_batch_size, args.max_queue, metrics, pool.context)
    max_bytes = getattr(args, "max_request_bytes", None) or MAX_REQUEST_BYTES
    server = Server(pool, batcher, metrics, store, args.max_input_tokens, args.max_n, max_bytes)
    api_key = args.api_key or os.environ.get("ALIGNKIT_API_KEY") or None
    return build_app(server, api_key), list(pool.ids)


def _check_limits(args: argparse.Namespace) -> None:
    for flag in ("max_batch_size", "max_queue", "max_n", "max_input_tokens", "max_request_bytes"):
        value = getattr(args, flag, None)  # --max-request-bytes: absent from a parser that predates it
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} {value}: give a positive number")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: give a port from 1 to 65535 (0: any free port)")
