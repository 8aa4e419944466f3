"""The quickstart over several seeds: each method's accuracy and lift over SFT, with mean and spread.

A lift that flips sign with the seed (or with floating-point rounding on another machine) is not a result:
this script is how the README's seed table is made and how a recipe change is judged. Recipes are chosen on
the validation columns; the test columns are reported.

    python benchmarks/quickstart_seeds.py --seeds 0 1 2 --output-dir /tmp/qs-seeds

    python benchmarks/quickstart_seeds.py --seeds 0 1 -- --methods sft,ppo --no-controls
    python benchmarks/quickstart_seeds.py --seeds 0 1 2 3 4 5 6 7 --check   # every promise, every seed

Each seed runs `alignkit quickstart --seed N` in its own process (about 11 minutes each on a 2-core machine);
a seed whose report.json was made by the same commit with the same arguments is read, not re-run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from alignkit.quickstart.promises import broken_promises
from alignkit.quickstart.run import CONTROLS, DEFAULT_METHODS


def _commit() -> str:
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "alignkit"], capture_output=True, text=True
    )
    return done.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def run_seed(out: Path, seed: int, extra: list[str]) -> dict:
    """One seed's report.json; made again unless an earlier one came from this commit and these arguments."""
    report = out / f"seed-{seed}" / "report.json"
    stamp = out / f"seed-{seed}" / "made-by.json"
    made_by = {"commit": _commit(), "args": extra}
    if not report.exists() or not stamp.exists() or json.loads(stamp.read_text()) != made_by:
        cmd = [
            sys.executable,
            "-m",
            "alignkit",
            "quickstart",
            "--seed",
            str(seed),
            "--output-dir",
            str(report.parent),
        ]
        subprocess.run(cmd + extra, check=True)
        stamp.write_text(json.dumps(made_by))
    return json.loads(report.read_text())


def rows(report: dict) -> dict[str, dict]:
    return {**report["methods"], **{f"control: {k}": v for k, v in report.get("controls", {}).items()}}


def summarise(reports: dict[int, dict]) -> dict[str, dict]:
    """Per method: test and validation accuracy per seed, lift over SFT per seed, mean and sd."""
    out: dict[str, dict] = {}
    for name in rows(next(iter(reports.values()))):
        test = [rows(r)[name]["accuracy"] for r in reports.values()]
        val = [rows(r)[name]["validation"]["accuracy"] for r in reports.values()]
        lift = [rows(r)[name]["accuracy"] - r["methods"]["sft"]["accuracy"] for r in reports.values()]
        val_lift = [
            rows(r)[name]["validation"]["accuracy"] - r["methods"]["sft"]["validation"]["accuracy"]
            for r in reports.values()
        ]
        out[name] = {"test": test, "validation": val, "test_lift": lift, "validation_lift": val_lift}
        if all("hacking_flags" in rows(r)[name] for r in reports.values()):  # the monitor's verdict per seed
            out[name]["hacking"] = [
                [f"{f['rule']}@{f['step']}" for f in rows(r)[name]["hacking_flags"]] for r in reports.values()
            ]
    for key in ("train_pair_accuracy", "test_pair_accuracy", "test_carry_prefers_answer_plus_one"):
        values = [r["reward_model"][key] for r in reports.values() if "reward_model" in r]
        if values:
            out.setdefault("reward_model", {})[key] = values
    return out


def _mean_sd(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.3f} +- {sd:.3f}"


def render(summary: dict[str, dict], seeds: list[int]) -> str:
    lines = [
        f"| method | test acc. (mean +- sd) | test lift per seed ({', '.join(map(str, seeds))}) | min test lift "
        "| validation lift per seed |",
        "|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        if name == "reward_model":
            continue
        lift = " / ".join(f"{x:+.3f}" for x in s["test_lift"])
        val = " / ".join(f"{x:+.3f}" for x in s["validation_lift"])
        lines.append(f"| {name} | {_mean_sd(s['test'])} | {lift} | {min(s['test_lift']):+.3f} | {val} |")
    for name, s in summary.items():
        if "hacking" in s:
            verdicts = " / ".join(",".join(f) or "-" for f in s["hacking"])
            lines.append(f"\nhacking monitor, {name}, flags per seed: {verdicts}")
    for key, values in summary.get("reward_model", {}).items():
        lines.append(f"\nreward model {key} per seed: " + " / ".join(f"{v:.3f}" for v in values))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--output-dir", default="quickstart-seeds")
    ap.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when a seed's report breaks one of the quickstart's promises (alignkit/quickstart/promises.py)",
    )
    ap.add_argument("extra", nargs="*", help="passed to `alignkit quickstart` (e.g. --methods sft,ppo)")
    args = ap.parse_args()
    out = Path(args.output_dir)
    reports = {seed: run_seed(out, seed, args.extra) for seed in args.seeds}
    summary = summarise(reports)
    (out / "seeds.json").write_text(json.dumps(summary, indent=2))
    print(render(summary, args.seeds))
    if args.check:
        # the whole table unless the run was asked for less (`-- --methods ...`, `-- --no-controls`)
        methods = None if "--methods" in args.extra else list(DEFAULT_METHODS)
        controls = None if {"--no-controls", "--controls"} & set(args.extra) else list(CONTROLS)
        broken = [f"seed {s}: {b}" for s, r in reports.items() for b in broken_promises(r, methods, controls)]
        print("\n".join(broken) or f"every promise kept on seeds {', '.join(map(str, args.seeds))}")
        sys.exit(1 if broken else 0)


if __name__ == "__main__":
    main()
