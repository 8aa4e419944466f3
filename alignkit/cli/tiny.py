"""`alignkit tiny DIR`: a tiny random Llama with a real tokenizer, for trying things offline."""

from __future__ import annotations

import argparse
from typing import Any

from alignkit.cli.common import add_command

EPILOG = """examples:
  alignkit tiny models/tiny
  alignkit tiny models/tiny-wide --hidden-size 128 --layers 3
"""


def register(subparsers: Any) -> None:
    p = add_command(subparsers, "tiny", "write a tiny random Llama model with a real tokenizer", EPILOG)
    p.add_argument("output_dir")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from alignkit import api

    api.tiny(
        args.output_dir,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        layers=args.layers,
        seed=args.seed,
    )
    print(f"tiny model written to {args.output_dir}")
    return 0
