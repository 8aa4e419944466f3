"""`alignkit` command line. User mistakes print one message and exit with code 2 (`--debug` shows the traceback)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
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
EPILOG_SERVE = """examples:
  alignkit serve --model out/sft
  alignkit serve --model models/base --adapter dpo=out/dpo-lora --adapter kto=out/kto-lora --port 8000
  alignkit serve --model out/dpo --api-key secret --log-db feedback.db
  then: OpenAI clients at http://127.0.0.1:8000/v1 (model ids from GET /v1/models)
"""
EPILOG_CHAT = """examples:
  alignkit chat --model out/sft --system "You are a helpful assistant."
  alignkit chat --model models/base --adapter out/dpo-lora
  alignkit chat examples/inference/llama3_lora_sft.yaml      # LLaMA-Factory's inference config keys
  in the chat: /reset clears the history, /system TEXT sets the system prompt, /exit leaves
"""
EPILOG_EXPORT = """examples:
  alignkit export --model models/base --adapter out/dpo-lora --output out/dpo-merged
  alignkit export --model models/base --adapter out/dpo-lora --output out/dpo-int8 --quantize int8
  alignkit export examples/merge_lora/llama3_lora_sft.yaml   # LLaMA-Factory's merge config keys
"""
EPILOG_FROM_FEEDBACK = """examples:
  alignkit data from-feedback feedback.db --output data/kto.jsonl
  alignkit data from-feedback postgresql://user@host/db --output data/kto.jsonl --model dpo
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
    _add_ship_parsers(sub, dsub)
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


def _add_ship_parsers(sub: argparse._SubParsersAction, dsub: argparse._SubParsersAction) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    v = sub.add_parser(
        "serve", help="an OpenAI-compatible API server", epilog=EPILOG_SERVE, formatter_class=raw
    )
    v.add_argument("--model", required=True, help="model folder, LoRA adapter folder or hub id")
    v.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a LoRA adapter on --model, served as model id NAME (repeatable)",
    )
    v.add_argument("--served-model-name", help="model id of --model (default: --model as given)")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="sampling engine (vllm: GPU)")
    v.add_argument("--api-key", help="bearer token clients must send (default: $ALIGNKIT_API_KEY, else none)")
    v.add_argument("--max-batch-size", type=int, default=32, help="sequences generated together in one pass")
    v.add_argument(
        "--max-queue", type=int, default=256, help="waiting requests beyond which the answer is 503"
    )
    v.add_argument(
        "--max-input-tokens", type=int, help="longest prompt accepted (default: the model's context)"
    )
    v.add_argument("--max-n", type=int, default=16, help="largest `n` (choices per request) accepted")
    v.add_argument(
        "--log-db", help="store every completion and its feedback: a SQLite path or postgresql:// URL"
    )
    v.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    v.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when there is one)")
    v.add_argument("--trust-remote-code", action="store_true")
    v.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    c = sub.add_parser(
        "chat", help="chat with a model in the terminal", epilog=EPILOG_CHAT, formatter_class=raw
    )
    c.add_argument("config", nargs="?", help="LLaMA-Factory inference YAML (model_name_or_path, ...)")
    c.add_argument("--model", help="model folder, LoRA adapter folder or hub id")
    c.add_argument("--adapter", help="a LoRA adapter folder on --model")
    c.add_argument("--system", help="system prompt")
    c.add_argument("--max-new-tokens", type=int, help="default 512")
    c.add_argument("--temperature", type=float, help="0 is greedy (default 0.7)")
    c.add_argument("--top-p", type=float, help="default 0.9")
    c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    x = sub.add_parser(
        "export",
        help="merge a LoRA adapter into its base and write a Hugging Face folder",
        epilog=EPILOG_EXPORT,
        formatter_class=raw,
    )
    x.add_argument("config", nargs="?", help="LLaMA-Factory merge YAML (model_name_or_path, export_dir, ...)")
    x.add_argument("--model", help="base model folder or hub id (default: the adapter's base)")
    x.add_argument("--adapter", help="LoRA adapter folder")
    x.add_argument("--output", help="folder to write")
    x.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="weights' dtype (default: the base's)")
    x.add_argument("--shard-size", type=float, help="GB per safetensors shard (default 5)")
    x.add_argument("--quantize", choices=["int8", "int4"], help="also quantize (bitsandbytes, CPU or GPU)")
    x.add_argument("--device", help="where to merge: cpu or cuda (default cpu)")
    x.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    f = dsub.add_parser(
        "from-feedback",
        help="turn thumbs-up/down feedback stored by `serve` into KTO rows",
        epilog=EPILOG_FROM_FEEDBACK,
        formatter_class=raw,
    )
    f.add_argument("db", help="the --log-db of `alignkit serve`: a SQLite path or postgresql:// URL")
    f.add_argument("--output", required=True, help="KTO rows to write (.jsonl)")
    f.add_argument("--model", help="only completions of this model id")
    f.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # peft's adapter loading asks transformers for a renamed attribute (transformers 5.x): not the user's concern
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
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
        from alignkit.stages import get_stage
        from alignkit.training.loop import train

        cfg = load_config(args.config, args.overrides)
        record = train(cfg, get_stage(cfg.stage)(cfg))
        if record:
            logging.getLogger("alignkit").info(
                "done: loss %.4f; model in %s", record.get("loss", float("nan")), cfg.output_dir
            )
        return 0
    if args.command == "tiny":
        from alignkit.modeling.tiny import build_tiny

        build_tiny(args.output_dir, args.vocab_size, args.hidden_size, args.layers, args.seed)
        print(f"tiny model written to {args.output_dir}")
        return 0
    if args.command == "data" and getattr(args, "data_command", None) == "inspect":
        from alignkit.data.report import inspect_data, render_report

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
    if args.command in ("serve", "chat", "export") or getattr(args, "data_command", None) == "from-feedback":
        return _run_ship_command(args)
    if args.command == "quickstart":
        from alignkit.quickstart.run import METHODS, run_quickstart

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
        from alignkit.evaluation.run import eval_command

        return eval_command(args)
    if args.command == "sxs":
        from alignkit.evaluation.sxs import sxs_command

        return sxs_command(args)
    if args.command == "compare":
        from alignkit.comparison import compare_command

        return compare_command(args)
    from alignkit.evaluation.sxs import from_votes_command

    return from_votes_command(args)


def _run_ship_command(args: argparse.Namespace) -> int:
    if args.command == "serve":
        from alignkit.ship.serve.command import serve_command

        return serve_command(args)
    if args.command == "chat":
        from alignkit.ship.chat import chat_command

        return chat_command(args)
    if args.command == "export":
        from alignkit.ship.export.merge import export_command

        return export_command(args)
    from alignkit.ship.serve.feedback import from_feedback_command

    return from_feedback_command(args)


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
