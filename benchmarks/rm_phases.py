"""The reward model's step in its phases, per layout: forward, backward and the fused AdamW step, timed apart.

    python benchmarks/rm_phases.py [--steps 6] [--batch 4]

One process, the benchmark's `cpu` shape (Qwen2's 151,936-entry vocabulary, hidden 256, 4 layers) with a
seeded scalar head, `dpo_en_demo` pairs that fit 512 tokens in file order; one warm-up step, then `--steps`
steps per layout: one padded batch (`length_groups: false`), `padding_free` and `length_groups` (the default).
Prints seconds summed over the steps. What it found is in docs/benchmarks.md (the reward model's length groups).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from harness import SHARED, build_qwen2, build_reward_model

from alignkit.config import build_config
from alignkit.modeling.load import load_reward_model, load_tokenizer
from alignkit.stages import get_stage

DATA = SHARED / "llamafactory" / "dpo_en_demo.json"
LAYOUTS = {
    "one padded batch": {"length_groups": False},
    "padding_free": {"padding_free": True},
    "length_groups": {},
}


def phases(model_dir: str, keys: dict, steps: int, batch: int) -> tuple[float, float, float]:
    cfg = build_config({"stage": "rm", "model_name_or_path": model_dir, "dataset": str(DATA), **keys})
    stage = get_stage("rm")(cfg)
    stage.tokenizer = load_tokenizer(model_dir)
    rows = stage.rows(str(DATA))[: (steps + 1) * batch]
    model = load_reward_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    totals = [0.0, 0.0, 0.0]
    for i in range(steps + 1):
        b = stage.collate(rows[i * batch : (i + 1) * batch])
        t0 = time.perf_counter()
        out = stage.step(model, b)
        t1 = time.perf_counter()
        out.loss_sum.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if i:  # the first step warms up
            for k, dt in enumerate((t1 - t0, t2 - t1, t3 - t2)):
                totals[k] += dt
    return totals[0], totals[1], totals[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp())
    build_qwen2(str(root / "model"), "cpu")
    build_reward_model(str(root / "model"), str(root / "rm"))
    print("| layout | forward s | backward s | optimizer s |\n|---|---|---|---|")
    for name, keys in LAYOUTS.items():
        keys = {"output_dir": str(root / "out"), "max_length": 512, "torch_dtype": "float32", **keys}
        f, b, o = phases(str(root / "rm"), keys, args.steps, args.batch)
        print(f"| {name} | {f:.2f} | {b:.2f} | {o:.2f} |", flush=True)


if __name__ == "__main__":
    main()
