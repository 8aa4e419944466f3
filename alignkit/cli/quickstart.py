"""`alignkit quickstart`: every method at work on a task built in place."""

from __future__ import annotations

import argparse
from typing import Any

from alignkit.cli.common import add_command
from alignkit.errors import UserError

EPILOG = """examples:
  alignkit quickstart
  alignkit quickstart --output-dir /tmp/qs
  alignkit quickstart --methods sft,dpo --no-controls
"""


def register(subparsers: Any) -> None:
    q = add_command(
        subparsers,
        "quickstart",
        "show the methods at work on a task built in place (240-307 s measured on 2 CPU cores)",
        EPILOG,
    )
    q.add_argument("--output-dir", default="./alignkit-quickstart")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument(
        "--methods",
        default=None,
        help="comma-separated, e.g. sft,dpo (default: all but the tool rows sft_tools,grpo_tools)",
    )
    q.add_argument(
        "--no-controls", action="store_true", help="skip the control runs (SFT on chosen, DPO without NLL)"
    )
    q.add_argument("--controls", default=None, help="comma-separated subset of the controls (default: all)")
    q.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="rows trained side by side after SFT (default: one per core, up to 4)",
    )
    q.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:

    from alignkit.quickstart.run import CONTROLS, METHODS, run_quickstart

    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else None
    unknown = [m for m in methods or () if m not in METHODS]
    if unknown:
        raise UserError(f"--methods: unknown method `{unknown[0]}`; choose from {', '.join(METHODS)}")
    controls: bool | tuple[str, ...] = not args.no_controls
    if args.controls and controls:
        controls = tuple(c.strip() for c in args.controls.split(","))
        wrong = [c for c in controls if c not in CONTROLS]
        if wrong:
            raise UserError(f"--controls: unknown control `{wrong[0]}`; choose from {', '.join(CONTROLS)}")
    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: give 1 or more")
    report = run_quickstart(
        args.output_dir, seed=args.seed, methods=methods, controls=controls, jobs=args.jobs
    )
    print(report["table"])
    return 0
