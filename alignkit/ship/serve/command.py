"""`alignkit serve`: load the model and its adapters, then run the OpenAI-compatible API under uvicorn.

uvicorn owns the signals: on SIGTERM (or Ctrl-C) it stops accepting connections, lets the requests in flight
finish (streams included), then runs the app's shutdown, which stops the batcher and closes the store.
"""

from __future__ import annotations

import argparse
import logging
import os

from alignkit.errors import UserError

log = logging.getLogger("alignkit")


def serve_command(args: argparse.Namespace) -> int:
    import uvicorn

    app, ids = build_server(args)
    log.info("serving %s at http://%s:%d/v1", ", ".join(ids), args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=None)
    return 0


def build_server(args: argparse.Namespace) -> tuple[object, list[str]]:
    """(the ASGI app, its model ids) from `alignkit serve`'s arguments; every bad argument is a UserError
    before the model loads."""
    import torch

    from alignkit.ship.serve.app import Server, build_app
    from alignkit.ship.serve.batcher import Batcher
    from alignkit.ship.serve.engine import HFGenerate, ModelPool, VLLMGenerate, parse_adapters, vllm_available
    from alignkit.ship.serve.metrics import Metrics

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
    server = Server(pool, batcher, metrics, store, args.max_input_tokens, args.max_n)
    api_key = args.api_key or os.environ.get("ALIGNKIT_API_KEY") or None
    return build_app(server, api_key), list(pool.ids)


def _check_limits(args: argparse.Namespace) -> None:
    for flag in ("max_batch_size", "max_queue", "max_n", "max_input_tokens", "port"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "port" else 1):
            raise UserError(f"--{flag.replace('_', '-')} {value}: give a positive number")
