"""Atomic checkpoints and exact resume.

A checkpoint is written into `.tmp-checkpoint-N` and renamed to `checkpoint-N` only when complete, so
a crash (even `kill -9`) never leaves a half-written directory that looks valid. It holds the model (or
the LoRA adapter) in Hugging Face format, the optimizer, the scheduler, every process's RNG states and
`trainer_state.json` (the global step, which fixes the data position because the data order of each
epoch is a function of the seed alone).

`output_dir` itself is guarded: a new run does not replace an earlier one unasked (`refuse_to_overwrite`),
and a run that fails before its first checkpoint takes back what it wrote (`undo_on_failure`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from alignkit.errors import UserError

STATE_FILE = "trainer_state.json"
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
    if resume_from_checkpoint == "auto":
        found = list_checkpoints(output_dir)
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
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        save_fn(unwrapped, tmp)  # the stage's own format: HF model (or adapter) + tokenizer
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
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


def _prune(output_dir: str, save_total_limit: int | None) -> None:
    if not save_total_limit:
        return
    for path in list_checkpoints(output_dir)[:-save_total_limit]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(
    accelerator: Any, model: nn.Module, load_fn: Any, optimizer: Any, scheduler: Any, path: str
) -> dict:
    """Restore weights, optimizer, scheduler and RNG; return the saved trainer state."""
    load_fn(accelerator.unwrap_model(model), path)
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=False))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=False))
    rng = os.path.join(path, f"rng_state_{accelerator.process_index}.pth")
    if os.path.isfile(rng):
        _set_rng_state(torch.load(rng, weights_only=False))
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as fh:
        return json.load(fh)


def _load_weights(model: nn.Module, path: str) -> None:
    from safetensors.torch import load_file

    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(os.path.join(path, "adapter_model.safetensors")))
        return
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):  # sharded: load every shard the index names
        with open(index, encoding="utf-8") as fh:
            shards = sorted(set(json.load(fh)["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(os.path.join(path, shard)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied output embeddings are not saved separately
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and model.config.tie_word_embeddings)]
    if unexpected or missing:
        raise UserError(
            f"checkpoint {path} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


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


@contextlib.contextmanager
def undo_on_failure(output_dir: str, enabled: bool = True) -> Iterator[None]:
    """On an exception (Ctrl-C included) before this run completed a checkpoint, put `output_dir` back.

    Before the run, every path under it is listed and the files a run rewrites in place (`config.yaml`,
    `metrics.jsonl`: there under `overwrite_output_dir` or a resume) are read. On failure, each path the run
    added is removed (TensorBoard and W&B files, the reference log-prob cache; the folder itself and any
    parent the run made, if it was new) and those files are restored: what was there before stays. Once
    the run has a checkpoint of its own, everything is kept, for `resume_from_checkpoint: auto`. Called on
    the main process only (the others pass enabled=False).
    """
    if not enabled:
        yield
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
        yield
    except BaseException:
        if not any(os.path.basename(c) + os.sep not in before for c in list_checkpoints(output_dir)):
            _undo(output_dir, None if existed else made, before, saved)
        raise


def _undo(output_dir: str, made: str | None, before: set[str], saved: dict[str, bytes]) -> None:
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)
        return
    for rel in sorted(_listing(output_dir) - before):  # a folder sorts before what it holds
        path = os.path.join(output_dir, rel)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
    for path, data in saved.items():
        with open(path, "wb") as fh:
            fh.write(data)
