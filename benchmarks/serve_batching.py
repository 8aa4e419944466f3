"""Aggregate generation throughput of `alignkit serve`: 16 concurrent clients against one client at a time.

    python benchmarks/serve_batching.py [--clients 16] [--requests 64] [--max-tokens 64] [--hidden 64] [--json]

A tiny model is built in place (no download), the real server runs as its own process on 127.0.0.1, and each
side sends the same number of chat requests (sampling at temperature 1, `--max-tokens` each) through the
official `openai` client. Throughput is completion tokens (the server's usage counts) over wall time; the
ratio is what batching waiting requests into one generation pass buys. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.ship.serve_helpers import running  # noqa: E402  (the server process the tests use)


def _side(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)

    def one(i: int) -> tuple[int, float]:
        start = time.perf_counter()
        r = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": f"Tell me about item {i}."}],
            max_tokens=max_tokens,
            temperature=1.0,
            seed=None,
        )
        return r.usage.completion_tokens, time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    tokens = sum(t for t, _ in results)
    latencies = sorted(s for _, s in results)
    return {
        "clients": clients,
        "requests": requests,
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "p50_latency_s": round(statistics.median(latencies), 3),
        "p95_latency_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=64, help="requests per side")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument(
        "--hidden", type=int, default=64, help="hidden size of the tiny model (alignkit tiny's default)"
    )
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    from alignkit.modeling.tiny import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny(str(Path(tmp) / "model"), hidden_size=args.hidden, layers=args.layers)
        serve = ["--model", model, "--served-model-name", "m", "--max-batch-size", str(args.max_batch_size)]
        with running(serve, Path(tmp) / "server.log") as server:
            _side(server.url, 1, 4, args.max_tokens)  # warm-up
            one = _side(server.url, 1, args.requests, args.max_tokens)
            passes, rows = (
                server.metric("alignkit_batch_rows_count"),
                server.metric("alignkit_batch_rows_sum"),
            )
            many = _side(server.url, args.clients, args.requests, args.max_tokens)
            passes = server.metric("alignkit_batch_rows_count") - passes
            rows = server.metric("alignkit_batch_rows_sum") - rows
    result = {
        "one_client": one,
        "concurrent": many,
        "speedup": round(many["tokens_per_s"] / one["tokens_per_s"], 2),
        "answers_per_pass_concurrent": round(rows / passes, 2),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print("| clients | requests | tokens | wall s | tokens/s | p50 latency s | p95 latency s |")
    print("|---|---|---|---|---|---|---|")
    for side in (one, many):
        print(
            f"| {side['clients']} | {side['requests']} | {side['tokens']} | {side['wall_s']} | "
            f"{side['tokens_per_s']} | {side['p50_latency_s']} | {side['p95_latency_s']} |"
        )
    print(
        f"\naggregate speed-up with {args.clients} clients: {result['speedup']}x "
        f"({result['answers_per_pass_concurrent']} answers per generation pass on average)"
    )


if __name__ == "__main__":
    main()
