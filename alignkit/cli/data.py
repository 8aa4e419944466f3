"""`alignkit data inspect | sample | from-votes | from-feedback`: the data tools."""

from __future__ import annotations

import argparse
import json
from typing import Any

from alignkit.cli.common import add_command

EPILOG_INSPECT = """examples:
  alignkit data inspect ../shared/data/llamafactory/dpo_en_demo.json --model models/tiny
  alignkit data inspect data.jsonl --max-length 512
  alignkit data inspect alpaca_en_demo --dataset-dir ../shared/data/llamafactory
"""
EPILOG_SAMPLE = """examples:
  alignkit data sample prompts.jsonl --model out/sft --n 8 --reward-funcs exact_match --output data/bon.jsonl
  alignkit data sample prompts.jsonl --model out/sft --n 4 --reward-model out/rm --keep pairs --output data/pairs.jsonl
  alignkit data sample gsm8k.jsonl --model out/sft --reward-funcs math_accuracy --keep above --threshold 1 --output data/rs.jsonl
"""
EPILOG_FROM_VOTES = """examples:
  alignkit data from-votes ~/Downloads/votes.json --key sxs/sxs_key.json --output-dir data/round2
"""
EPILOG_FROM_FEEDBACK = """examples:
  alignkit data from-feedback feedback.db --output data/kto.jsonl
  alignkit data from-feedback postgresql://user@host/db --output data/kto.jsonl --model dpo
"""


def register(subparsers: Any) -> None:
    data = add_command(subparsers, "data", "data tools: inspect, sample, from-votes, from-feedback")
    sub = data.add_subparsers(dest="data_command", metavar="COMMAND")
    data.set_defaults(run=lambda args: _help(data))
    p = add_command(
        sub,
        "inspect",
        "detect the format and report lengths, truncation, duplicates, balance",
        EPILOG_INSPECT,
    )
    p.add_argument(
        "source", help="a .json/.jsonl/.csv/.parquet file, a folder, a hub id, or a name of dataset_info.json"
    )
    p.add_argument("--model", help="tokenizer to count tokens with (default: whitespace words)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--split", default="train")
    p.add_argument("--format", default="auto", help="dataset_format (default: detect)")
    p.add_argument("--dataset-dir", help="where LLaMA-Factory's dataset_info.json is (default: ./data)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=inspect)
    _register_sample(sub)
    v = add_command(
        sub, "from-votes", "turn a side-by-side review's votes into DPO pairs and KTO rows", EPILOG_FROM_VOTES
    )
    v.add_argument("votes", help="votes.json saved from the page `alignkit sxs` wrote")
    v.add_argument("--key", help="the page's sxs_key.json (default: sxs_key.json beside the votes file)")
    v.add_argument("--output-dir", default=".", help="where dpo.jsonl and kto.jsonl go")
    v.set_defaults(run=from_votes)
    f = add_command(
        sub,
        "from-feedback",
        "turn thumbs-up/down feedback stored by `serve` into KTO rows",
        EPILOG_FROM_FEEDBACK,
    )
    f.add_argument("db", help="the --log-db of `alignkit serve`: a SQLite path or postgresql:// URL")
    f.add_argument("--output", required=True, help="KTO rows to write (.jsonl)")
    f.add_argument("--model", help="only completions of this model id")
    f.set_defaults(run=from_feedback)


def _register_sample(sub: Any) -> None:
    s = add_command(
        sub,
        "sample",
        "best-of-n / rejection sampling: n completions per prompt, scored, kept as SFT rows or DPO pairs",
        EPILOG_SAMPLE,
    )
    s.add_argument(
        "dataset", help="prompts (any format with a prompt), a path or a name of dataset_info.json"
    )
    s.add_argument(
        "--model", required=True, help="the policy to sample from (a folder, an adapter, a hub id)"
    )
    s.add_argument("--output", required=True, help="the rows to write (.jsonl)")
    s.add_argument("--n", type=int, default=8, help="completions per prompt (default 8)")
    s.add_argument(
        "--keep", default="best", help="best (default) | above (every sample >= --threshold) | pairs"
    )
    s.add_argument("--threshold", type=float, help="the lowest score kept")
    s.add_argument(
        "--reward-funcs", default="", help="comma-separated: exact_match, math_accuracy, module:fn"
    )
    s.add_argument(
        "--reward-weights", help="comma-separated, one per scorer (then the reward model, then the judge)"
    )
    s.add_argument("--reward-model", help="a reward model (e.g. from `stage: rm`)")
    s.add_argument(
        "--judge-reward",
        help="the LLM judge as a scorer: grade (1-10 -> [0, 1]) | pairwise (win share among a prompt's samples)",
    )
    s.add_argument("--judge-base-url", help="an OpenAI-compatible endpoint (an `alignkit serve` works)")
    s.add_argument("--judge-model", help="the judge's model id at that endpoint")
    s.add_argument("--judge-mode", default="verdict", help="verdict (default) | logprobs (any local model)")
    s.add_argument(
        "--judge-api-key-env", default="OPENAI_API_KEY", help="the variable holding the endpoint's key"
    )
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--batch-size", type=int, default=8, help="prompts per sampling pass")
    s.add_argument("--max-samples", type=int, help="the first N prompts only")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dataset-dir", help="where LLaMA-Factory's dataset_info.json is (default: ./data)")
    s.set_defaults(run=sample)


def _floats(text: str | None, flag: str) -> list[float] | None:
    from alignkit.errors import UserError

    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError as exc:
        raise UserError(f"{flag} {text}: give comma-separated numbers, e.g. 1,0.5") from exc


def sample(args: argparse.Namespace) -> int:
    from alignkit import api

    report = api.sample(
        args.model,
        args.dataset,
        args.output,
        n=args.n,
        keep=args.keep,
        threshold=args.threshold,
        reward_funcs=[f for f in args.reward_funcs.split(",") if f],
        reward_weights=_floats(args.reward_weights, "--reward-weights"),
        reward_model=args.reward_model,
        judge_reward=args.judge_reward,
        judge_base_url=args.judge_base_url,
        judge_model=args.judge_model,
        judge_mode=args.judge_mode,
        judge_api_key_env=args.judge_api_key_env,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        seed=args.seed,
        dataset_dir=args.dataset_dir,
    )
    kept = report["mean_kept_score"]
    lift = f"; mean score {report['mean_score']:.3f} over all samples" + (
        f", {kept:.3f} over the kept rows" if kept is not None else ""
    )
    print(
        f"wrote {report['rows']} {report['format']} rows to {report['output']} from {report['prompts']} prompts x "
        f"{args.n} samples; {report['prompts_without_acceptable_sample']} prompts had no acceptable sample{lift}"
        + (f"; {report['unscored']} samples no scorer could score (left out)" if report["unscored"] else "")
        + "; "
        f"train on it: stage: {'dpo' if report['format'] == 'pair' else 'sft'}, dataset: {report['output']}"
    )
    return 0


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def inspect(args: argparse.Namespace) -> int:
    from alignkit import api
    from alignkit.data.report import render_report

    report = api.inspect(
        args.source,
        model=args.model,
        max_length=args.max_length,
        split=args.split,
        dataset_format=args.format,
        dataset_dir=args.dataset_dir,
    )
    print(json.dumps(report, indent=2) if args.json else render_report(report))
    return 0


def from_votes(args: argparse.Namespace) -> int:
    from alignkit import api

    print(api.from_votes(args.votes, key=args.key, output_dir=args.output_dir)["summary"])
    return 0


def from_feedback(args: argparse.Namespace) -> int:
    from alignkit import api
    from alignkit.losses.unpaired import kto_weights

    counts = api.from_feedback(args.db, args.output, model=args.model)
    w_d, w_u, why = kto_weights(counts["up"], counts["down"])
    left_out = f"{counts['no_feedback']} answers without feedback"
    if counts["empty"]:
        left_out += f" and {counts['empty']} empty answers"
    print(
        f"wrote {counts['rows']} KTO rows to {args.output} ({counts['up']} up, {counts['down']} down; "
        f"{left_out} left out); recommended desirable_weight {w_d}, undesirable_weight {w_u} ({why}); "
        f"check them: alignkit data inspect {args.output}"
    )
    return 0
