"""What batching buys `alignkit serve`, continuous (the default) and pass by pass (`--batching pass`).

    python benchmarks/serve_batching.py [--batching continuous,pass] [--clients 16] [--requests 128]
                                        [--concurrent-requests 512] [--max-tokens 64] [--long-tokens 128]
                                        [--hidden 64] [--json]

A tiny model is built in place (no download) whose answers never end before their token limit (its EOS is out
of its reach), so every answer has the length asked. The real server runs as its own process on 127.0.0.1
and is driven through the official `openai` client, once per batching mode:
- throughput: `--requests` chat requests (temperature 1, `--max-tokens` each) from one client, then
  `--concurrent-requests` from `--clients` concurrent clients (each side's connections opened by a warm-up
  first; the concurrent side runs long enough to leave the first wave, whose rows start and end together,
  behind); completion tokens (the server's usage counts) over wall time;
- latency of a short request (4 tokens): alone, then while `--clients` / 2 clients keep `--long-tokens`
  answers running (a mixed workload: what a late request waits for); p50 and p95 of 20 such requests.
Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.ship.serve_helpers import running  # noqa: E402  (the server process the tests use)


def _client(url: str) -> object:
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)


def _ask(client: object, i: int, max_tokens: int) -> tuple[int, float]:
    start = time.perf_counter()
    r = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": f"Tell me about item {i}."}],
        max_tokens=max_tokens,
        temperature=1.0,
    )
    return r.usage.completion_tokens, time.perf_counter() - start


def _quantiles(latencies: list[float]) -> dict:
    latencies = sorted(latencies)
    return {
        "p50_latency_s": round(statistics.median(latencies), 3),
        "p95_latency_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3),
    }


def _side(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    client = _client(url)
    with ThreadPoolExecutor(clients) as pool:  # warm-up: every client's connection open
        list(pool.map(lambda i: _ask(client, i, 4), range(clients)))
    start, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: _ask(client, i, max_tokens), range(requests)))
    wall = time.perf_counter() - start
    tokens = sum(t for t, _ in results)
    return {
        "clients": clients,
        "requests": requests,
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "client_cpu_share": round((time.process_time() - cpu) / wall, 2),  # cores the clients kept busy
        **_quantiles([s for _, s in results]),
    }


def _short_latency(url: str, background: int, long_tokens: int, n: int = 20) -> dict:
    """p50/p95 of `n` 4-token requests, one after another, while `background` clients keep long answers
    running (0: alone)."""
    client, stop = _client(url), threading.Event()

    def keep_busy(i: int) -> None:
        while not stop.is_set():
            _ask(client, 1000 + i, long_tokens)

    threads = [threading.Thread(target=keep_busy, args=(i,)) for i in range(background)]
    for t in threads:
        t.start()
    time.sleep(0.5 if background else 0)  # the long answers are running
    latencies = [_ask(client, i, 4)[1] for i in range(n)]
    stop.set()
    for t in threads:
        t.join()
    return {"background_clients": background, "requests": n, **_quantiles(latencies)}


def measure(model: str, mode: str, args: argparse.Namespace, log: Path) -> dict:
    serve = ["--model", model, "--served-model-name", "m", "--max-batch-size", str(args.max_batch_size)]
    with running([*serve, "--batching", mode], log) as server:
        one = _side(server.url, 1, args.requests, args.max_tokens)
        many = _side(server.url, args.clients, args.concurrent_requests, args.max_tokens)
        alone = _short_latency(server.url, 0, args.long_tokens)
        loaded = _short_latency(server.url, args.clients // 2, args.long_tokens)
    return {
        "batching": mode,
        "one_client": one,
        "concurrent": many,
        "speedup": round(many["tokens_per_s"] / one["tokens_per_s"], 2),
        "short_alone": alone,
        "short_under_load": loaded,
        "short_p95_ratio": round(loaded["p95_latency_s"] / alone["p95_latency_s"], 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batching", default="continuous,pass", help="comma list: continuous, pass")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=128, help="requests from one client")
    p.add_argument(
        "--concurrent-requests", type=int, default=512, help="requests from the concurrent clients"
    )
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--long-tokens", type=int, default=128, help="answers running beside the short requests")
    p.add_argument(
        "--hidden", type=int, default=64, help="hidden size of the tiny model (alignkit tiny's default)"
    )
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    from alignkit.modeling.tiny import build_tiny
    from tests.ship.serve_helpers import make_endless

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny(str(Path(tmp) / "tiny"), hidden_size=args.hidden, layers=args.layers)
        model = make_endless(tiny, Path(tmp) / "model")
        for mode in args.batching.split(","):
            results.append(measure(model, mode, args, Path(tmp) / f"server-{mode}.log"))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(
        f"| batching | 1 client tokens/s | {args.clients} clients tokens/s | x | client CPU (cores) 1 / "
        f"{args.clients} | short p50 / p95 alone s | short p50 / p95 beside long answers s | p95 x |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        a, b = r["short_alone"], r["short_under_load"]
        print(
            f"| {r['batching']} | {r['one_client']['tokens_per_s']} | {r['concurrent']['tokens_per_s']} | "
            f"{r['speedup']}x | {r['one_client']['client_cpu_share']} / {r['concurrent']['client_cpu_share']} | "
            f"{a['p50_latency_s']} / {a['p95_latency_s']} | "
            f"{b['p50_latency_s']} / {b['p95_latency_s']} | {r['short_p95_ratio']}x |"
        )


if __name__ == "__main__":
    main()
