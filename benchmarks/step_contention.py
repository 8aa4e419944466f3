"""What the rest of a server costs the continuous-batching step (no HTTP): other threads, another process.

    python benchmarks/step_contention.py [--rows 16] [--steps 400] [--repeats 3] [--threads N]

The tiny model of `serve_batching.py` steps `--rows` rows (one row leaves and one joins every 60 steps, as
in a server), alone, then beside a thread that only sleeps 0.2 ms at a time, beside one that holds the GIL
for 0.1 ms of every millisecond (pure Python, like an event loop answering requests), and beside another
process busy 30% of the time (like the HTTP side, or the clients, on the same cores). A step calls ~150 torch
operations, each of which releases the GIL and takes it back, so another thread's wake-ups delay it; and
with torch's intra-op threads (`--threads`, default torch's), an operation waits for all of them, so a
busy core anywhere delays it. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _step_ms(model: object, pad_id: int, rows: int, steps: int) -> float:
    from alignkit.generation.continuous import ContinuousBatch, Sampling

    setting = Sampling(1.0, 1.0, None, None)
    batch = ContinuousBatch(model, pad_id)
    batch.add([[5] * 21] * rows, [setting] * rows)
    start = time.perf_counter()
    for i in range(steps):
        batch.step()
        if i % 60 == 59:
            batch.keep([False] + [True] * (rows - 1))
            batch.add([[5] * 21], [setting])
    return (time.perf_counter() - start) / steps * 1e3


def _sleeper(stop: threading.Event) -> None:
    while not stop.is_set():
        time.sleep(0.0002)


def _python_duty(stop: threading.Event) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        while time.perf_counter() - start < 0.0001:  # holds the GIL
            pass
        time.sleep(0.0009)


_BURN = "import time\nwhile True:\n    t = time.perf_counter()\n    while time.perf_counter() - t < 3e-4: pass\n    time.sleep(7e-4)"


def _beside_process(measure: Callable[[], float]) -> float:
    """`measure` while another process keeps a core busy 30% of the time."""
    burner = subprocess.Popen([sys.executable, "-c", _BURN])
    try:
        time.sleep(0.3)
        return measure()
    finally:
        burner.kill()
        burner.wait()


def _beside(target: Callable[[threading.Event], None] | None, measure: Callable[[], float]) -> float:
    stop = threading.Event()
    thread = threading.Thread(target=target, args=(stop,)) if target else None
    if thread:
        thread.start()
    try:
        return measure()
    finally:
        stop.set()
        if thread:
            thread.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch's intra-op threads (default: torch's own)")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from alignkit.modeling.load import load_causal_lm
    from alignkit.modeling.tiny import build_tiny
    from tests.ship.serve_helpers import make_endless

    with tempfile.TemporaryDirectory() as tmp:
        path = make_endless(build_tiny(str(Path(tmp) / "tiny"), hidden_size=64), Path(tmp) / "model")
        model, tokenizer = load_causal_lm(path)
        model.eval()
        measure = lambda: _step_ms(model, tokenizer.pad_token_id, args.rows, args.steps)  # noqa: E731
        import torch

        print(f"| {args.rows}-row step, ms ({torch.get_num_threads()} torch threads) | repeats | mean |")
        print("|---|---|---|")
        cases = [
            ("alone", lambda: _beside(None, measure)),
            ("beside a thread waking every 0.2 ms", lambda: _beside(_sleeper, measure)),
            ("beside a thread holding the GIL 10% of the time", lambda: _beside(_python_duty, measure)),
            ("beside another process busy 30% of the time", lambda: _beside_process(measure)),
        ]
        for name, run in cases:
            times = [run() for _ in range(args.repeats)]
            shown = ", ".join(f"{t:.2f}" for t in times)
            print(f"| {name} | {shown} | {sum(times) / len(times):.2f} |")


if __name__ == "__main__":
    main()
