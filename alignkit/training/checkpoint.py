"""Atomic checkpoints and exact resume.

A checkpoint is written into `.tmp-checkpoint-N` and renamed to `checkpoint-N` only when complete, so
a crash (even `kill -9`) never leaves a half-written directory that looks valid. It holds the model (or
the LoRA adapter) in Hugging Face format, the optimizer, the scheduler, every process's RNG states and
`trainer_state.json` (the global step, which fixes the data position because the data order of each
epoch is a function of the seed alone). Under DeepSpeed the optimizer's state is DeepSpeed's own checkpoint
in `deepspeed/` (each process's ZeRO partition), which a resume under the same config and processes reads.

`output_dir` itself is guarded: a new run does not replace an earlier one unasked (`refuse_to_overwrite`),
and a run that fails before its first checkpoint takes back what it wrote (`undo_on_failure`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from alignkit.errors import UserError
from alignkit.modeling.save import read_weights

log = logging.getLogger("alignkit")

STATE_FILE = "trainer_state.json"
DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"  # DeepSpeed's checkpoint inside checkpoint-N
_CKPT = re.compile(r"^checkpoint-(\d+)$")
# what marks a folder as holding a run; the first two are rewritten in place by every run
RUN_MARKS = ("config.yaml", "metrics.jsonl", "model.safetensors", "adapter_model.safetensors")


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CKPT.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: str, resume_from_checkpoint: str | None) -> str | None:
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint in ("auto", "true"):
        found = list_checkpoints(output_dir)
        if not found and resume_from_checkpoint == "true":  # Trainer's `true`: there must be one
            raise UserError(
                f"resume_from_checkpoint: true, but {output_dir} has no checkpoint-N folder; use `auto` to "
                "start fresh when there is none"
            )
        return found[-1] if found else None
    if not os.path.isfile(os.path.join(resume_from_checkpoint, STATE_FILE)):
        raise UserError(
            f"resume_from_checkpoint: {resume_from_checkpoint} is not a complete checkpoint "
            f"(no {STATE_FILE} in it); use `auto` to pick the newest one"
        )
    return resume_from_checkpoint


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    accelerator: Any,
    model: nn.Module,
    save_fn: Any,
    optimizer: Any,
    scheduler: Any,
    output_dir: str,
    step: int,
    extra_state: dict[str, Any],
    save_total_limit: int | None,
) -> str:
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    with full_weights(accelerator, model) as unwrapped:  # a sharded model is gathered by every process
        optimizer_state = _optimizer_state(accelerator, model, optimizer)
        if accelerator.is_main_process:
            save_fn(unwrapped, tmp)  # the stage's own format: HF model (or adapter) + tokenizer
            if optimizer_state is not None:
                torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
            torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
    if _deepspeed(accelerator):  # every process writes its partition of the optimizer's state
        folder = os.path.join(tmp, DEEPSPEED_DIR)
        model.save_checkpoint(folder, tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True)
    torch.save(_rng_state(), os.path.join(tmp, f"rng_state_{accelerator.process_index}.pth"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as fh:
            json.dump({"global_step": step, **extra_state}, fh, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # atomic on POSIX: the checkpoint appears whole or not at all
        _prune(output_dir, save_total_limit)
    accelerator.wait_for_everyone()
    return final


def _sharded(accelerator: Any) -> bool:
    """Whether each process holds only part of the weights (FSDP, DeepSpeed)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


@contextlib.contextmanager
def full_weights(accelerator: Any, model: nn.Module) -> Iterator[nn.Module]:
    """The unwrapped model, for the main process to save with `save_pretrained` (or a stage's `save`).

    Under FSDP / DeepSpeed each process holds a shard of the weights, so the full state dict is gathered
    first (`accelerator.get_state_dict`: a collective, so *every* process must enter, the main one alone
    would hang or fail) and, inside the block, every module with `save_pretrained` (the model; a PEFT
    wrapper and its base; PPO's policy and value) returns its slice of it from `state_dict()` on the main
    process. Without sharding this is just the unwrapped model.
    """
    unwrapped = accelerator.unwrap_model(model)
    if not _sharded(accelerator):
        yield unwrapped
        return
    full = accelerator.get_state_dict(model)  # the full weights on the main process (on CPU)
    patched: list[nn.Module] = []
    if accelerator.is_main_process:
        for prefix, module in unwrapped.named_modules():
            if hasattr(module, "save_pretrained"):
                head = f"{prefix}." if prefix else ""
                part = {k[len(head) :]: v for k, v in full.items() if k.startswith(head)}
                module.state_dict = _returns(part)
                patched.append(module)
    try:
        yield unwrapped
    finally:
        for module in patched:
            del module.state_dict  # the instance attribute: the class's own method again


def _returns(state: dict[str, torch.Tensor]) -> Any:
    def state_dict(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return dict(state)

    return state_dict


def _optimizer_state(accelerator: Any, model: nn.Module, optimizer: Any) -> dict[str, Any] | None:
    """The optimizer's state to save; under FSDP2 gathered in full (keyed by parameter name) on the main
    process, a collective that every process enters; under DeepSpeed none (DeepSpeed's checkpoint holds it)."""
    if _deepspeed(accelerator):
        return None
    if not getattr(accelerator, "is_fsdp2", False):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer.optimizer, options=options)


def _load_sharded(accelerator: Any, model: nn.Module, optimizer: Any, path: str) -> None:
    """Resume under FSDP2: the main process reads the full weights and optimizer state of the checkpoint
    and each process takes its shards from the broadcast. Under DeepSpeed, DeepSpeed's own checkpoint."""
    if _deepspeed(accelerator):
        _load_deepspeed(model, path)
        return
    if not getattr(accelerator, "is_fsdp2", False):
        raise UserError(
            f"resuming {path} under FSDP1 is not supported; resume with FSDP2 "
            "(configs/accelerate/fsdp2.yaml), DeepSpeed or without sharding"
        )
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    weights: dict[str, torch.Tensor] = {}
    optim: dict[str, Any] = {}
    optimizer_file = _optimizer_file(path)  # on every process: none is left waiting in a broadcast
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        weights = (
            _adapter_weights(unwrapped, path) if hasattr(unwrapped, "peft_config") else read_weights(path)
        )
        optim = torch.load(optimizer_file, weights_only=False)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer.optimizer, optim, options=options)


def _adapter_weights(peft_model: nn.Module, path: str) -> dict[str, torch.Tensor]:
    """A LoRA checkpoint's adapter under the model's own parameter names; the frozen base is not in it. peft's
    own renaming (`get_peft_model_state_dict`, applied to the names themselves) says which saved key is which
    parameter: `q_proj.lora_A.weight` is `q_proj.lora_A.default.weight`, a reward model's `score.weight` is
    `score.modules_to_save.default.weight`."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(os.path.join(path, "adapter_model.safetensors"))
    names = get_peft_model_state_dict(peft_model, state_dict={k: k for k in peft_model.state_dict()})
    missing = sorted(set(saved) - set(names))
    if missing:
        raise UserError(
            f"{path}: adapter weights {missing[:3]} match no parameter of the model being resumed"
        )
    return {names[key]: value for key, value in saved.items()}


def _load_deepspeed(engine: Any, path: str) -> None:
    """Weights and each process's optimizer partition from the DeepSpeed checkpoint inside `path` (written
    under the same ZeRO stage and number of processes; DeepSpeed checks)."""
    folder = os.path.join(path, DEEPSPEED_DIR)
    if not os.path.isdir(os.path.join(folder, DEEPSPEED_TAG)):
        raise UserError(
            f"{path} was not written under DeepSpeed (no {DEEPSPEED_DIR}/{DEEPSPEED_TAG}/ in it): resume it "
            "the way it was written (without sharding, or under FSDP2)"
        )
    # frozen weights (LoRA's base, `freeze`'s layers) are not in the checkpoint: they stay as the model has them
    strict = all(p.requires_grad for p in engine.module.parameters())
    loaded, _ = engine.load_checkpoint(
        folder, tag=DEEPSPEED_TAG, load_module_strict=strict, load_lr_scheduler_states=False
    )
    if loaded is None:
        raise UserError(f"DeepSpeed could not read its checkpoint in {folder}")


def _optimizer_file(path: str) -> str:
    found = os.path.join(path, "optimizer.pt")
    if not os.path.isfile(found) and os.path.isdir(os.path.join(path, DEEPSPEED_DIR)):
        raise UserError(
            f"{path} was written under DeepSpeed (its optimizer state is DeepSpeed's, in {DEEPSPEED_DIR}/): "
            "resume it under the same DeepSpeed config and number of processes"
        )
    return found


def _prune(output_dir: str, save_total_limit: int | None) -> None:
    if not save_total_limit:
        return
    for path in list_checkpoints(output_dir)[:-save_total_limit]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(
    accelerator: Any, model: nn.Module, load_fn: Any, optimizer: Any, scheduler: Any, path: str
) -> dict:
    """Restore weights, optimizer, scheduler and RNG; return the saved trainer state."""
    if _sharded(accelerator):
        _load_sharded(accelerator, model, optimizer, path)
    else:
        optimizer_file = _optimizer_file(path)
        load_fn(accelerator.unwrap_model(model), path)
        optimizer.load_state_dict(torch.load(optimizer_file, weights_only=False))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=False))
    rng = os.path.join(path, f"rng_state_{accelerator.process_index}.pth")
    if os.path.isfile(rng):
        _set_rng_state(torch.load(rng, weights_only=False))
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as fh:
        return json.load(fh)


def refuse_to_overwrite(output_dir: str) -> None:
    """A new run never silently replaces the files of an earlier one."""
    if not os.path.isdir(output_dir):
        return
    found = [n for n in os.listdir(output_dir) if n in RUN_MARKS or n.startswith("checkpoint-")]
    if found:
        raise UserError(
            f"output_dir {output_dir} already holds a run ({', '.join(sorted(found)[:3])}); set "
            "`overwrite_output_dir: true` to replace it, `resume_from_checkpoint: auto` to continue it, "
            "or choose another output_dir"
        )


def _listing(root: str) -> set[str]:
    """Every path under `root`, relative to it; folders end with the separator."""
    out = set()
    for folder, dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        out.update(os.path.normpath(os.path.join(rel, d)) + os.sep for d in dirs)
        out.update(os.path.normpath(os.path.join(rel, f)) for f in files)
    return out


@dataclass
class RunProgress:
    """What a run has done so far, for `undo_on_failure` to decide what to keep."""

    steps: int = 0  # optimizer steps this run completed
    finished: bool = False  # the final model is written: nothing after this undoes the run


@contextlib.contextmanager
def undo_on_failure(output_dir: str, enabled: bool = True) -> Iterator[RunProgress]:
    """On an exception (Ctrl-C included) before this run wrote a checkpoint, put `output_dir` back.

    Before the run, every path under it is listed and the files a run rewrites in place (`config.yaml`,
    `metrics.jsonl`: there under `overwrite_output_dir` or a resume) are read. On a failure before the first
    optimizer step, each path the run added is removed (the folder itself and the empty parents it made, if
    it was new) and those files are restored: what was there before stays. A failure after some steps but
    before a checkpoint keeps what the run wrote for diagnosis, moved into `failed-<time>/`, so it does not
    block a re-run. Once the run has a checkpoint of its own or its final model, everything is kept. Called on
    the main process only (the others pass enabled=False).
    """
    progress = RunProgress()
    if not enabled:
        yield progress
        return
    existed = os.path.isdir(output_dir)
    before = _listing(output_dir) if existed else set()
    made = os.path.abspath(output_dir)  # the outermost folder the run will create on the way to output_dir
    while not os.path.exists(os.path.dirname(made)):
        made = os.path.dirname(made)
    saved = {}
    for name in RUN_MARKS[:2]:
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                saved[path] = fh.read()
    try:
        yield progress
    except BaseException:
        own_checkpoint = any(os.path.basename(c) + os.sep not in before for c in list_checkpoints(output_dir))
        if not (progress.finished or own_checkpoint):
            aside = None if progress.steps == 0 else f"failed-{time.strftime('%Y%m%d-%H%M%S')}"
            _undo(output_dir, before, saved, aside)
            if not existed and aside is None:
                _remove_empty_parents(output_dir, made)
        raise


def _remove_empty_parents(output_dir: str, made: str) -> None:
    """Remove `output_dir` if empty, then each parent up to `made` while it is empty (another run may share
    a parent made at the same time: it is never removed while it holds anything)."""
    path = os.path.abspath(output_dir)
    while True:
        try:
            os.rmdir(path)
        except OSError:
            return
        if path == made:
            return
        path = os.path.dirname(path)


def _undo(output_dir: str, before: set[str], saved: dict[str, bytes], aside: str | None) -> None:
    """Remove (or, with `aside`, move into that subfolder) every path the run added; restore `saved`."""
    added = sorted(_listing(output_dir) - before)  # a folder sorts before what it holds
    folders = [rel for rel in added if rel.endswith(os.sep)]
    tops = [rel for rel in added if not any(rel != f and rel.startswith(f) for f in folders)]
    if aside:
        os.makedirs(os.path.join(output_dir, aside))
    for rel in tops:
        path = os.path.join(output_dir, rel.rstrip(os.sep))
        if aside:
            dest = os.path.join(output_dir, aside, rel.rstrip(os.sep))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.move(path, dest)
        elif os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
    for path, data in saved.items():
        if aside and os.path.isfile(path):  # the failed run's version, before the earlier run's comes back
            shutil.copy2(path, os.path.join(output_dir, aside, os.path.basename(path)))
        with open(path, "wb") as fh:
            fh.write(data)
    if aside:
        log.warning("the failed run's files are kept in %s", os.path.join(output_dir, aside))
