"""The reference model, done once: a frozen copy, the adapter-disabled base under LoRA, or a disk cache.

`precompute_ref_log_probs: true` runs the reference over the data once and caches the per-row log-probs
under a key made of everything they depend on (the sha256 of every byte of the reference weights, the
token ids of every row, max_length, dtype). A later run with the same key loads them and never loads the
reference model; any change to the key recomputes, so a cache made with another model is never reused.
Each weight file is hashed once and its hash remembered by (path, size, mtime) in the user's cache
(`$ALIGNKIT_CACHE_DIR`, `$XDG_CACHE_HOME/alignkit` or `~/.cache/alignkit`), so a 15 GB model is not
reread every run; a copy that keeps the old size and mtime (`cp -p`, `rsync -t`) is not noticed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from alignkit.config import BaseConfig
from alignkit.config.cache import user_cache_dir
from alignkit.modeling.load import load_spec, torch_dtype
from alignkit.modeling.resolve import ModelSpec, resolve_model, training_spec

log = logging.getLogger("alignkit")


class Reference:
    """Computes reference log-probs for a batch with whatever reference the config asks for.

    The reference is the *starting* policy unless `ref_model_name_or_path` names another model:
    - `ref_model_name_or_path`: that model, frozen; an adapter folder is its base with the adapter merged.
    - lora / qlora training a new adapter (on a full model, or on one with adapters merged into it): the policy
      with its adapter off is exactly the starting policy, so no second copy of the weights is loaded.
    - lora / qlora continuing an adapter (`model_name_or_path` an adapter folder, or the last of
      `adapter_name_or_path`, without `merge_adapter`): adapter-off would be the base *without* that adapter
      (what LLaMA-Factory uses), not the starting policy; a frozen copy is loaded: base + every adapter merged.
    - full / freeze: a frozen copy of the starting policy (base + any adapters merged).
    """

    def __init__(
        self,
        cfg: BaseConfig,
        policy: nn.Module,
        model: str | None = None,
        key: str = "ref_model_name_or_path",
    ) -> None:
        """`model` (named by the config key `key`, for messages) replaces `ref_model_name_or_path`: a frozen model
        used beside the policy (distillation's teacher)."""
        self.cfg = cfg
        ref = model or getattr(cfg, "ref_model_name_or_path", None)
        if ref:
            self.spec = resolve_model(ref, key=key)  # every adapter merged
            continued = False
        else:
            start = training_spec(cfg, "CAUSAL_LM")
            self.spec = ModelSpec(start.base, start.adapters, None)
            continued = start.resume is not None
        self.use_adapter_off = cfg.finetuning_type in ("lora", "qlora") and not ref and not continued
        self.model: nn.Module | None = None

    def _load(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        model = load_spec(
            AutoModelForCausalLM,
            self.spec,
            dtype=torch_dtype(self.cfg),
            trust_remote_code=self.cfg.trust_remote_code,
        )
        return _gathered_by_zero3(model.eval().requires_grad_(False))

    @contextlib.contextmanager
    def active(self, policy: nn.Module, device: torch.device) -> Iterator[nn.Module]:
        """The module to run as the reference (the policy with its adapter off, or the frozen copy)."""
        if self.use_adapter_off:
            unwrapped = getattr(policy, "module", policy)
            with unwrapped.disable_adapter():
                yield unwrapped
            return
        if self.model is None:
            self.model = self._load()
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        yield self.model


def _gathered_by_zero3(model: nn.Module) -> nn.Module:
    """Under DeepSpeed ZeRO-3, transformers' from_pretrained partitions a model loaded beside the policy, which
    nothing would gather for its forward: it runs in an inference engine of its own (no optimizer), which
    gathers each layer for its call, as TRL prepares its reference model."""
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        return model
    import copy

    import deepspeed
    from accelerate.state import AcceleratorState

    config = copy.deepcopy(AcceleratorState().deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()  # the engine's eval() returns nothing
    return engine


_HASH_CHUNK = 8 << 20  # bytes read at a time: a 15 GB file is streamed, never held in memory


def _hash_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _load_index(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            index = json.load(fh)
        return index if isinstance(index, dict) else {}
    except (OSError, ValueError):  # none yet, or a torn / foreign file: rehashing is always correct
        return {}


def _save_index(path: str, index: dict[str, Any]) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"  # one temporary per process; the rename is atomic
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(index, fh)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home costs a rehash next run, not the run
        log.warning("could not remember weight hashes in %s: %s", path, exc)


def content_hash(path: str) -> str:
    """sha256 of the whole file, remembered in the user's cache by (absolute path, size, mtime_ns).

    Index shape: {abs_path: [size, mtime_ns, sha256]}. A file whose size and mtime are unchanged is not read
    again; any write to it moves its mtime, so it is rehashed.
    """
    full = os.path.abspath(path)
    stat = os.stat(full)
    index_path = os.path.join(user_cache_dir(), "weight_hashes.json")
    index = _load_index(index_path)
    entry = index.get(full)
    if isinstance(entry, list) and entry[:2] == [stat.st_size, stat.st_mtime_ns]:
        return entry[2]
    digest = _hash_file(full)
    index = _load_index(index_path)  # re-read: another run may have added files meanwhile
    index[full] = [stat.st_size, stat.st_mtime_ns, digest]
    _save_index(index_path, index)
    return digest


def _fingerprint_model(path: str) -> dict[str, Any]:
    """Path, config and the full-content hash of every weight file (a change anywhere in them counts)."""
    info: dict[str, Any] = {"path": os.path.abspath(path) if os.path.exists(path) else path}
    if not os.path.isdir(path):
        return info
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name in ("config.json", "adapter_config.json"):
            with open(full, encoding="utf-8") as fh:
                info["config"] = fh.read()
        elif name.endswith((".safetensors", ".bin")):
            info[name] = [os.path.getsize(full), content_hash(full)]
    return info


def cache_key(ref_path: str, rows: list[dict], keys: tuple[str, ...], extra: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(_fingerprint_model(ref_path), sort_keys=True).encode())
    h.update(json.dumps(extra, sort_keys=True).encode())
    for row in rows:
        h.update(json.dumps([row[k] for k in keys]).encode())
    return h.hexdigest()[:32]


def precompute(
    cfg: BaseConfig,
    reference: Reference,
    policy: nn.Module,
    rows: list[dict],
    collate: Callable[[list[dict]], dict[str, torch.Tensor]],
    logps_fn: Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    token_keys: tuple[str, ...],
    name: str = "train",
) -> None:
    """Fill `ref_*` fields of every row, from the cache when its key matches, else by one pass."""
    extra = {
        "max_length": cfg.max_length,
        "dtype": cfg.torch_dtype,
        "bf16": cfg.bf16,
        "stage": cfg.stage,
        "adapter_off": reference.use_adapter_off,
    }
    if reference.spec.merge:  # base + merged adapters: every adapter's weights are part of the key
        extra["adapters"] = [_fingerprint_model(a) for a in reference.spec.merge]
    key = cache_key(reference.spec.base, rows, token_keys, extra)
    folder = getattr(cfg, "ref_cache_dir", None) or os.path.join(cfg.output_dir, "ref_logps")
    path = os.path.join(folder, f"{name}-{key}.pt")
    if os.path.isfile(path):
        cached = torch.load(path, weights_only=True)
        log.info("reference log-probs: reusing %s (the reference model is not loaded)", path)
    else:
        stale = [f for f in os.listdir(folder) if f.startswith(f"{name}-")] if os.path.isdir(folder) else []
        if stale:
            log.info("reference log-probs: cache key changed (model, data or settings); recomputing")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if reference.use_adapter_off:
            policy.to(device)
        cached: dict[str, list[float]] = {}
        bs = cfg.per_device_eval_batch_size
        with torch.no_grad(), reference.active(policy, device) as ref:
            for i in range(0, len(rows), bs):
                batch = {k: v.to(device) for k, v in collate(rows[i : i + bs]).items()}
                for k, v in logps_fn(ref, batch).items():
                    # kept in float64 (exact for float32 values): a float64 run keeps every digit
                    cached.setdefault(k, []).extend(v.double().cpu().tolist())
        os.makedirs(folder, exist_ok=True)
        tmp = path + ".tmp"
        torch.save({k: torch.tensor(v, dtype=torch.float64) for k, v in cached.items()}, tmp)
        os.replace(tmp, path)
        reference.model = None  # free it: the run uses the cache from here on
        log.info("reference log-probs: computed for %d rows, cached in %s", len(rows), path)
        cached = {k: torch.tensor(v, dtype=torch.float64) for k, v in cached.items()}
    for k, values in cached.items():
        for row, v in zip(rows, values.tolist()):
            row[k] = v


def precompute_splits(
    stage: Any,
    logps_fn: Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    token_keys: tuple[str, ...],
) -> None:
    """`precompute` for the train rows and, when there are some, the eval rows of a stage."""
    for name, rows in (("train", stage.train_rows), ("eval", stage.eval_rows)):
        if rows:
            precompute(
                stage.cfg, stage.reference, stage.model, rows, stage.collate, logps_fn, token_keys, name
            )
