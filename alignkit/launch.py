"""Launching: the accelerate `Accelerator` a run trains under (precision, CPU process groups, DeepSpeed),
and what to run instead when a launcher started fewer processes than asked for."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from alignkit.config import BaseConfig
from alignkit.errors import UserError

log = logging.getLogger("alignkit")


def single_process_launch_hint(env: Mapping[str, str]) -> str | None:
    """What to run instead when `accelerate launch --cpu --num_processes N` started one process; else None.

    Without `--mpirun_hostfile`, accelerate's CPU launcher runs the script once, with ACCELERATE_USE_CPU=True
    and MASTER_ADDR / MASTER_PORT (set only when N > 1) but no world size: neither torchrun's WORLD_SIZE nor
    mpirun's PMI_SIZE / OMPI_COMM_WORLD_SIZE / MV2_COMM_WORLD_SIZE.
    """
    sizes = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    if env.get("ACCELERATE_USE_CPU", "").lower() != "true" or "MASTER_PORT" not in env:
        return None
    if any(key in env for key in sizes):
        return None
    return (
        "`accelerate launch --cpu --num_processes N` started a single process (its CPU launcher starts N "
        "only through mpirun, with --mpirun_hostfile); for N processes run "
        "`torchrun --nproc_per_node N -m alignkit train CONFIG` or "
        "`accelerate launch --multi_gpu --num_processes N -m alignkit train CONFIG` (both work without a GPU)"
    )


def _accelerator(cfg: BaseConfig) -> Any:
    from accelerate import Accelerator

    hint = single_process_launch_hint(os.environ)
    if hint:
        log.warning(hint)

    precision = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no"
    from accelerate.state import AcceleratorState

    # Several runs in one Python process (the quickstart, notebooks, tests) may differ in precision; the
    # process group (PartialState) is kept.
    AcceleratorState._reset_state()
    # Without a GPU, processes started by torchrun / `accelerate launch --multi_gpu` join a gloo group
    # only when accelerate is told it runs on CPU.
    return Accelerator(
        mixed_precision=precision, cpu=not torch.cuda.is_available(), deepspeed_plugin=_deepspeed(cfg)
    )


def _deepspeed(cfg: BaseConfig) -> Any:
    """`deepspeed: CONFIG.json` (LLaMA-Factory's key) handed to accelerate's DeepSpeed plugin."""
    if not cfg.deepspeed:
        return None
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(
            f"`deepspeed: {cfg.deepspeed}` needs DeepSpeed, which is not installed (`pip install deepspeed`, "
            "with a CUDA toolkit); or leave the key out: alignkit runs on one device, or on several with "
            "`accelerate launch` (DDP / FSDP)"
        )
    from accelerate import DeepSpeedPlugin

    return DeepSpeedPlugin(hf_ds_config=cfg.deepspeed)
