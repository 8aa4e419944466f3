"""Launching: the accelerate `Accelerator` a run trains under (precision, CPU process groups, FSDP, DeepSpeed),
and what to run instead when a launcher started fewer processes than asked for."""

from __future__ import annotations

import atexit
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


def make_accelerator(cfg: BaseConfig) -> Any:
    from accelerate import Accelerator

    hint = single_process_launch_hint(os.environ)
    if hint:
        log.warning(hint)

    precision = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no"
    from accelerate.state import AcceleratorState

    # Several runs in one Python process (the quickstart, notebooks, tests) may differ in precision; the
    # process group (PartialState) is kept.
    AcceleratorState._reset_state()
    cpu = not torch.cuda.is_available()
    _forget_fsdp(cpu)
    # Without a GPU, processes started by torchrun / `accelerate launch --multi_gpu` join a gloo group
    # only when accelerate is told it runs on CPU.
    plugin = _deepspeed(cfg)
    accelerator = Accelerator(mixed_precision=precision, cpu=cpu, deepspeed_plugin=plugin)
    if cpu and _env_flag("ACCELERATE_USE_FSDP"):
        _fsdp_on_cpu(accelerator, precision)
    if cpu and (cfg.deepspeed or _env_flag("ACCELERATE_USE_DEEPSPEED")):
        _deepspeed_on_cpu(accelerator, plugin, precision)
    _fit_deepspeed(accelerator, cfg)
    _destroy_group_at_exit()
    return accelerator


def _destroy_group_at_exit() -> None:
    """Where runs joined a process group: destroy it when Python exits, before the interpreter's teardown
    (registered once however many runs a process makes). Left to the C++ destructors, a rank of a
    2-CPU-process ZeRO-3 run was seen aborting after its work was done ("terminate called without an active
    exception", SIGABRT), once in a full test suite."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        atexit.unregister(_destroy_group)
        atexit.register(_destroy_group)


def _destroy_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _forget_fsdp(cpu: bool) -> None:
    """Give the kept process group its own type back after an FSDP run in this process.

    An FSDP Accelerator writes DistributedType.FSDP into PartialState, which outlives `_reset_state`; the
    next Accelerator would start from it and enable FSDP only from MULTI_CPU / MULTI_GPU, so a second run
    (the quickstart, `compare`, tests) would fail in `prepare` without an FSDP plugin.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if PartialState._shared_state.get("distributed_type") in (
        DistributedType.FSDP,
        DistributedType.DEEPSPEED,
    ):
        kind = DistributedType.MULTI_CPU if cpu else DistributedType.MULTI_GPU
        PartialState._shared_state["distributed_type"] = kind


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("true", "1", "yes")


def _fsdp_on_cpu(accelerator: Any, precision: str) -> None:
    """Shard with FSDP2 over a CPU (gloo) process group, as `accelerate launch` with an FSDP config asked.

    accelerate 1.15 turns ACCELERATE_USE_FSDP into `DistributedType.FSDP` only for GPU-like process groups
    (AcceleratorState: MULTI_GPU, MULTI_NPU, MULTI_XPU, ...), never for MULTI_CPU, so without a GPU the run
    would silently be plain DDP. torch's `fully_shard` works on gloo, so the state is switched here, before
    anything is prepared; accelerate's FSDP2 path (prepare, clipping, `get_state_dict`) then runs unchanged.
    """
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return  # one process: nothing to shard over
    plugin = FullyShardedDataParallelPlugin()  # read from the launcher's FSDP_* variables
    if plugin.fsdp_version != 2:
        raise UserError(
            f"`fsdp_version: {plugin.fsdp_version}` in the accelerate config: without a GPU alignkit shards "
            "with FSDP2 only; set `fsdp_version: 2` (configs/accelerate/fsdp2.yaml) or launch on GPUs"
        )
    if precision != "no":
        plugin.set_mixed_precision(precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    from accelerate.state import PartialState

    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    log.info("FSDP2 over %d CPU processes (gloo)", accelerator.num_processes)


def _deepspeed(cfg: BaseConfig) -> Any:
    """`deepspeed: CONFIG.json` (LLaMA-Factory's key) handed to accelerate's DeepSpeed plugin; a launch with
    a DeepSpeed accelerate config (configs/accelerate/zero*.yaml) is checked the same way."""
    launched = _env_flag("ACCELERATE_USE_DEEPSPEED")
    if not cfg.deepspeed and not launched:
        return None
    import importlib.util

    asked = f"`deepspeed: {cfg.deepspeed}`" if cfg.deepspeed else "an accelerate DeepSpeed config (zero2/3)"
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(
            f"{asked} needs DeepSpeed, which is not installed (`pip install deepspeed`); "
            "or leave the key out: alignkit runs on one device, or on several with "
            "`accelerate launch` (DDP / FSDP: configs/accelerate/fsdp2.yaml)"
        )
    if not cfg.deepspeed:
        return None  # accelerate builds the plugin from the launcher's variables
    from accelerate import DeepSpeedPlugin

    return DeepSpeedPlugin(hf_ds_config=cfg.deepspeed)


def _deepspeed_on_cpu(accelerator: Any, plugin: Any, precision: str) -> None:
    """ZeRO over a CPU (gloo) process group, as `accelerate launch` with a DeepSpeed config asked.

    accelerate 1.15 turns ACCELERATE_USE_DEEPSPEED into `DistributedType.DEEPSPEED` only for GPU-like process
    groups, so without a GPU the run would silently be plain DDP; DeepSpeed itself has a CPU accelerator
    (gloo). The state is switched here, before anything is prepared, as for FSDP2 (`_fsdp_on_cpu`)."""
    from accelerate import DeepSpeedPlugin
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        log.warning("DeepSpeed asked on one CPU process: nothing to shard over; training without it")
        return
    plugin = plugin or DeepSpeedPlugin()  # read from the launcher's ACCELERATE_DEEPSPEED_* variables
    plugin.set_mixed_precision(precision)
    plugin.select(_from_accelerator_state=True)
    accelerator.state.deepspeed_plugins = plugin
    accelerator.state.distributed_type = DistributedType.DEEPSPEED
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    log.info("DeepSpeed ZeRO-%s over %d CPU processes (gloo)", plugin.zero_stage, accelerator.num_processes)


def _fit_deepspeed(accelerator: Any, cfg: BaseConfig) -> None:
    """Give DeepSpeed the loop's batch and clipping.

    accelerate reads `train_micro_batch_size_per_gpu: auto` from a prepared dataloader, which the loop does
    not use (it batches itself), so prepare() would stop; it is the per-device batch. The loop marks each
    step's last micro-batch as the accumulation boundary itself (`micro_backward`) and already divides the
    loss by the global item count, so the engine's own accumulation count stays 1 (it would scale the loss
    by 1 / count again).
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    if cfg.auto_find_batch_size:
        raise UserError(
            "`auto_find_batch_size: true` under DeepSpeed is not supported (its probe's backward would step "
            "the engine's optimizer); set `per_device_train_batch_size` and `gradient_accumulation_steps`"
        )
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.per_device_train_batch_size
    ds["train_batch_size"] = cfg.per_device_train_batch_size * accelerator.num_processes
    ds["gradient_accumulation_steps"] = 1
    ds["gradient_clipping"] = cfg.max_grad_norm or 0.0  # the engine clips; 0 turns clipping off


def micro_backward(accelerator: Any, model: Any, loss: Any, last: bool) -> None:
    """One micro-batch's backward (`last`: the step's last one). `accelerator.backward` but under DeepSpeed
    before the last micro-batch, where accelerate would step the engine's optimizer: the engine is told the
    micro-batch is no accumulation boundary and runs the backward itself."""
    from accelerate.utils import DistributedType

    if last or accelerator.distributed_type != DistributedType.DEEPSPEED:
        accelerator.backward(loss)
        return
    model.set_gradient_accumulation_boundary(False)
    model.backward(loss)
