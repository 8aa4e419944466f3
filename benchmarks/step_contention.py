"""What other threads of the server's process cost the continuous-batching step (no HTTP, one process).

    python benchmarks/step_contention.py [--rows 16] [--steps 400] [--repeats 3]

The tiny model of `serve_batching.py` steps `--rows` rows (one row leaves and one joins every 60 steps, as
in a server), alone, then beside a thread that only sleeps 0.2 ms at a time, then beside one that holds the
GIL for 0.1 ms of every millisecond (pure Python, like an event loop answering requests). A step calls ~150
torch operations and each releases the GIL and takes it back: every time another thread wakes, the step
waits for the GIL and its next operation starts late. This is the cost the server's event loop and request
threads put on its worker thread. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
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
    args = p.parse_args()

    from alignkit.modeling.load import load_causal_lm
    from alignkit.modeling.tiny import build_tiny
    from tests.ship.serve_helpers import make_endless

    with tempfile.TemporaryDirectory() as tmp:
        path = make_endless(build_tiny(str(Path(tmp) / "tiny"), hidden_size=64), Path(tmp) / "model")
        model, tokenizer = load_causal_lm(path)
        model.eval()
        measure = lambda: _step_ms(model, tokenizer.pad_token_id, args.rows, args.steps)  # noqa: E731
        print(f"| {args.rows}-row step, ms | repeats | mean |\n|---|---|---|")
        for name, target in (("alone", None), ("beside a thread waking every 0.2 ms", _sleeper),
                             ("beside a thread holding the GIL 10% of the time", _python_duty)):  # fmt: skip
            times = [_beside(target, measure) for _ in range(args.repeats)]
            shown = ", ".join(f"{t:.2f}" for t in times)
            print(f"| {name} | {shown} | {sum(times) / len(times):.2f} |")


if __name__ == "__main__":
    main()
