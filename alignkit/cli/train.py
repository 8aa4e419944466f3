"""`alignkit train CONFIG [key=value ...]`."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from alignkit.cli.common import add_command

EPILOG = """examples:
  alignkit train configs/sft_tiny.yaml
  alignkit train configs/sft_tiny.yaml learning_rate=1e-4 max_steps=50 output_dir=out/sft
  torchrun --nproc_per_node 2 -m alignkit train configs/sft_tiny.yaml    # 2 processes, CPU or GPU
  accelerate launch --multi_gpu --num_processes 2 -m alignkit train configs/sft_tiny.yaml
  (not `accelerate launch --cpu --num_processes 2`: without --mpirun_hostfile it starts one process)
"""


def register(subparsers: Any) -> None:
    p = add_command(subparsers, "train", "run the stage a YAML config names", EPILOG)
    p.add_argument("config", help="YAML file (stage, model_name_or_path, dataset, ...)")
    p.add_argument("overrides", nargs="*", help="key=value pairs; they win over the file")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from alignkit import api
    from alignkit.config import read_yaml

    # every override is a config key (never one of train()'s own arguments: `reward_funcs=a` stays a name)
    result = api.train(api.Source(read_yaml(args.config, args.overrides), args.config))
    if result.metrics:
        logging.getLogger("alignkit").info(
            "done: loss %.4f; model in %s", result.metrics.get("loss", float("nan")), result.output_dir
        )
    return 0
