"""`alignkit eval`, `alignkit sxs` (a blind side-by-side page, and its tally) and `alignkit compare`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from alignkit.cli.common import add_command

EPILOG_EVAL = """examples:
  alignkit eval --model out/dpo --baseline out/sft --dataset ../shared/data/gsm8k/test.jsonl --max-samples 200
  alignkit eval configs/eval_tiny.yaml
  alignkit eval configs/eval_tiny.yaml num_samples=4 temperature=0.7 output_dir=out/eval
"""
EPILOG_SXS = """examples:
  alignkit sxs --model out/dpo --baseline out/sft --dataset prompts.jsonl --max-samples 50
  alignkit sxs tally ~/Downloads/votes.json --key sxs/sxs_key.json
"""
EPILOG_COMPARE = """examples:
  alignkit compare configs/compare_tiny.yaml
  alignkit compare configs/compare_tiny.yaml max_steps=40 eval.max_samples=50 methods.dpo.beta=0.2
"""
EVAL_FLAGS = ("model", "baseline", "dataset", "max_samples", "output_dir")


def register(subparsers: Any) -> None:
    e = add_command(
        subparsers,
        "eval",
        "evaluate a model (and a baseline): accuracy, judge, reward model, KL, length, refusals, ...",
        EPILOG_EVAL,
    )
    e.add_argument("config", nargs="?", help="YAML file of eval keys (optional with --model/--dataset)")
    e.add_argument("overrides", nargs="*", help="key=value pairs; they win over the file and the flags")
    e.add_argument("--model", help="model folder, LoRA adapter folder or hub id")
    e.add_argument("--baseline", help="the model to compare against (win rates, length ratio, KL reference)")
    e.add_argument("--dataset", help="prompts (any format `train` reads), with an answer column for accuracy")
    e.add_argument("--max-samples", type=int, help="evaluate the first N rows")
    e.add_argument("--output-dir", help="where eval.json, eval.md and samples.jsonl go (default: eval)")
    e.set_defaults(run=evaluate)
    _register_sxs(subparsers)
    c = add_command(
        subparsers,
        "compare",
        "train several methods on the same data and budget, evaluate each the same way, report",
        EPILOG_COMPARE,
    )
    c.add_argument("config", help="YAML file: shared keys, `methods:` and `eval:` (see examples)")
    c.add_argument("overrides", nargs="*", help="key=value pairs for the shared keys")
    c.set_defaults(run=compare)


def _register_sxs(subparsers: Any) -> None:
    s = add_command(
        subparsers,
        "sxs",
        "a blind side-by-side review page for people (one HTML file), and its tally",
        EPILOG_SXS,
    )
    s.add_argument("--model", help="model A (hidden on the page)")
    s.add_argument("--baseline", help="model B (hidden on the page)")
    s.add_argument("--dataset", help="prompts (any format `train` reads)")
    s.add_argument("--max-samples", type=int, default=100)
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--output-dir", default="sxs", help="where sxs.html and sxs_key.json go")
    s.add_argument("--seed", type=int, default=None, help="seed of the left/right order (default: random)")
    s.set_defaults(run=sxs)
    sub = s.add_subparsers(dest="sxs_command", metavar="COMMAND")
    t = add_command(sub, "tally", "un-blind a votes file: the win rate with its 95%% interval")
    t.add_argument("votes", help="votes.json saved from the page")
    t.add_argument("--key", help="the page's sxs_key.json (default: beside the votes file)")
    t.add_argument("--json", action="store_true", help="print the tally as JSON")
    t.set_defaults(run=run_tally)


def evaluate(args: argparse.Namespace) -> int:
    """The config file (if any), then the flags, then key=value overrides: later wins."""
    from alignkit import api
    from alignkit.config import read_yaml
    from alignkit.config.coerce import parse_overrides

    config, overrides = args.config, list(args.overrides or [])
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]  # `alignkit eval key=value ...`
    keys = read_yaml(config) if config else {}
    keys.update({k: v for k, v in ((f, getattr(args, f)) for f in EVAL_FLAGS) if v is not None})
    keys.update(parse_overrides(overrides))
    result = api.evaluate(api.Source(keys, config or "command line"))
    print(result.table)
    print(f"\nwritten: {result.output_dir}/eval.json, eval.md, samples.jsonl")
    return 0


def sxs(args: argparse.Namespace) -> int:
    from alignkit import api

    out = api.sxs(
        args.model,
        args.baseline,
        args.dataset,
        max_samples=args.max_samples,
        max_new_tokens=args.max_new_tokens,
        output_dir=args.output_dir,
        seed=args.seed,
    )
    print(f"wrote {out['page']} ({out['items']} items; model names hidden, sides shuffled)")
    print(f"wrote {out['key']}: keep it, it un-blinds the votes; send reviewers only the page")
    print(f"then: alignkit sxs tally votes.json --key {out['key']}")
    return 0


def run_tally(args: argparse.Namespace) -> int:
    from alignkit.evaluation.sxs import render_tally, tally

    result = tally(args.votes, args.key)
    print(json.dumps(result, indent=2) if args.json else render_tally(result))
    return 0


def compare(args: argparse.Namespace) -> int:
    from alignkit import api
    from alignkit.comparison.config import load_compare_config

    result = api.compare(load_compare_config(args.config, list(args.overrides or [])))
    print(result.table)
    for name, reasons in result.reward_hacking.items():
        print(f"reward hacking? {name}: {'; '.join(reasons)}")
    print(f"\nwritten: {result.output_dir}/report.md, report.json, {', '.join(result.plots)}")
    return 0
