"""`alignkit` command line. User mistakes print one message and exit with code 2 (`--debug` shows the traceback)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from alignkit import __version__
from alignkit.errors import UserError

EPILOG_TRAIN = """examples:
  alignkit train configs/sft_tiny.yaml
  alignkit train configs/sft_tiny.yaml learning_rate=1e-4 max_steps=50 output_dir=out/sft
  torchrun --nproc_per_node 2 -m alignkit train configs/sft_tiny.yaml    # 2 processes, CPU or GPU
  accelerate launch --multi_gpu --num_processes 2 -m alignkit train configs/sft_tiny.yaml
  (not `accelerate launch --cpu --num_processes 2`: without --mpirun_hostfile it starts one process)
"""
EPILOG_TINY = """examples:
  alignkit tiny models/tiny
  alignkit tiny models/tiny-wide --hidden-size 128 --layers 3
"""
EPILOG_DATA = """examples:
  alignkit data inspect ../shared/data/llamafactory/dpo_en_demo.json --model models/tiny
  alignkit data inspect data.jsonl --max-length 512
"""
EPILOG_FROM_VOTES = """examples:
  alignkit data from-votes ~/Downloads/votes.json --key sxs/sxs_key.json --output-dir data/round2
"""
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
"""
EPILOG_QS = """examples:
  alignkit quickstart
  alignkit quickstart --output-dir /tmp/qs
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alignkit",
        description="Post-training for causal language models: SFT, reward models, PPO, DPO family, KTO, GRPO.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"alignkit {__version__}")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="run the stage a YAML config names",
        epilog=EPILOG_TRAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("config", help="YAML file (stage, model_name_or_path, dataset, ...)")
    t.add_argument("overrides", nargs="*", help="key=value pairs; they win over the file")
    t.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    y = sub.add_parser(
        "tiny",
        help="write a tiny random Llama model with a real tokenizer",
        epilog=EPILOG_TINY,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    y.add_argument("output_dir")
    y.add_argument("--vocab-size", type=int, default=512)
    y.add_argument("--hidden-size", type=int, default=64)
    y.add_argument("--layers", type=int, default=2)
    y.add_argument("--seed", type=int, default=0)
    y.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(dest="data_command", metavar="COMMAND")
    di = dsub.add_parser(
        "inspect",
        help="detect the format and report lengths, truncation, duplicates, balance",
        epilog=EPILOG_DATA,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    di.add_argument("source", help="a .json/.jsonl/.csv/.parquet file, a folder, or a hub id")
    di.add_argument("--model", help="tokenizer to count tokens with (default: whitespace words)")
    di.add_argument("--max-length", type=int, default=1024)
    di.add_argument("--split", default="train")
    di.add_argument("--format", default="auto", help="dataset_format (default: detect)")
    di.add_argument("--json", action="store_true", help="print the report as JSON")
    di.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    dv = dsub.add_parser(
        "from-votes",
        help="turn a side-by-side review's votes into DPO pairs and KTO rows",
        epilog=EPILOG_FROM_VOTES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dv.add_argument("votes", help="votes.json saved from the page `alignkit sxs` wrote")
    dv.add_argument("--key", help="the page's sxs_key.json (default: sxs_key.json beside the votes file)")
    dv.add_argument("--output-dir", default=".", help="where dpo.jsonl and kto.jsonl go")
    dv.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    q = sub.add_parser(
        "quickstart",
        help="show the methods at work on a task built in place (a few minutes on CPU)",
        epilog=EPILOG_QS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("--output-dir", default="./alignkit-quickstart")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--methods", default=None, help="comma-separated subset, e.g. sft,dpo (default: all)")
    q.add_argument(
        "--no-controls", action="store_true", help="skip the control runs (SFT on chosen, DPO without NLL)"
    )
    q.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    _add_eval_parsers(sub)
    return p


def _add_eval_parsers(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "eval",
        help="evaluate a model (and a baseline): accuracy, judge, reward model, KL, length, refusals, ...",
        epilog=EPILOG_EVAL,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("config", nargs="?", help="YAML file of eval keys (optional with --model/--dataset)")
    e.add_argument("overrides", nargs="*", help="key=value pairs; they win over the file and the flags")
    e.add_argument("--model", help="model folder, LoRA adapter folder or hub id")
    e.add_argument("--baseline", help="the model to compare against (win rates, length ratio, KL reference)")
    e.add_argument("--dataset", help="prompts (any format `train` reads), with an answer column for accuracy")
    e.add_argument("--max-samples", type=int, help="evaluate the first N rows")
    e.add_argument("--output-dir", help="where eval.json, eval.md and samples.jsonl go (default: eval)")
    e.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    s = sub.add_parser(
        "sxs",
        help="a blind side-by-side review page for people (one HTML file), and its tally",
        epilog=EPILOG_SXS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--model", help="model A (hidden on the page)")
    s.add_argument("--baseline", help="model B (hidden on the page)")
    s.add_argument("--dataset", help="prompts (any format `train` reads)")
    s.add_argument("--max-samples", type=int, default=100)
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--output-dir", default="sxs", help="where sxs.html and sxs_key.json go")
    s.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the left/right order (default: random, kept in the key)",
    )
    s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    ssub = s.add_subparsers(dest="sxs_command", metavar="COMMAND")
    st = ssub.add_parser("tally", help="un-blind a votes file: the win rate with its 95%% interval")
    st.add_argument("votes", help="votes.json saved from the page")
    st.add_argument("--key", help="the page's sxs_key.json (default: beside the votes file)")
    st.add_argument("--json", action="store_true", help="print the tally as JSON")
    st.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    c = sub.add_parser(
        "compare",
        help="train several methods on the same data and budget, evaluate each the same way, report",
        epilog=EPILOG_COMPARE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("config", help="YAML file: shared keys, `methods:` and `eval:` (see examples)")
    c.add_argument("overrides", nargs="*", help="key=value pairs for the shared keys")
    c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
        # its readers log a failure and then raise it: the raised error is reported once, below
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    except ImportError:  # pragma: no cover
        pass


def run(args: argparse.Namespace) -> int:
    if args.command == "train":
        from alignkit.config import load_config
        from alignkit.loop import train
        from alignkit.stages import get_stage

        cfg = load_config(args.config, args.overrides)
        record = train(cfg, get_stage(cfg.stage)(cfg))
        if record:
            logging.getLogger("alignkit").info(
                "done: loss %.4f; model in %s", record.get("loss", float("nan")), cfg.output_dir
            )
        return 0
    if args.command == "tiny":
        from alignkit.tiny import build_tiny

        build_tiny(args.output_dir, args.vocab_size, args.hidden_size, args.layers, args.seed)
        print(f"tiny model written to {args.output_dir}")
        return 0
    if args.command == "data" and getattr(args, "data_command", None) == "inspect":
        from alignkit.data.inspect import inspect_data, render_report

        report = inspect_data(
            args.source,
            model=args.model,
            max_length=args.max_length,
            split=args.split,
            dataset_format=args.format,
        )
        if args.json:
            import json

            print(json.dumps(report, indent=2))
        else:
            print(render_report(report))
        return 0
    if args.command in ("eval", "sxs", "compare") or getattr(args, "data_command", None) == "from-votes":
        return _run_eval_command(args)
    if args.command == "quickstart":
        from alignkit.quickstart import METHODS, run_quickstart

        methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else None
        unknown = [m for m in methods or () if m not in METHODS]
        if unknown:
            raise UserError(f"--methods: unknown method `{unknown[0]}`; choose from {', '.join(METHODS)}")
        run_quickstart(args.output_dir, seed=args.seed, methods=methods, controls=not args.no_controls)
        return 0
    _parser().parse_args([args.command or "--help", "--help"] if args.command else ["--help"])
    return 2


def _run_eval_command(args: argparse.Namespace) -> int:
    if args.command == "eval":
        from alignkit.evaluate.run import eval_command

        return eval_command(args)
    if args.command == "sxs":
        from alignkit.sxs import sxs_command

        return sxs_command(args)
    if args.command == "compare":
        from alignkit.compare import compare_command

        return compare_command(args)
    from alignkit.sxs import from_votes_command

    return from_votes_command(args)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.INFO, format="[alignkit] %(message)s", stream=sys.stderr)
    _quiet_libraries()
    try:
        code = run(args)
    except UserError as exc:
        if debug:
            raise
        print(f"alignkit: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # output piped into `head`
        code = 0
    sys.exit(code)
