"""Where a model's weights come from: a model folder, a hub id, or a LoRA adapter folder (its base read from
adapter_config.json) with the adapters it was trained on; which of them are merged and which one training
continues."""

from __future__ import annotations

import functools
import json
import os
from typing import Any, NamedTuple

from alignkit.config import BaseConfig
from alignkit.config.coerce import split_sources
from alignkit.errors import UserError
from alignkit.modeling.gguf import gguf_file, local_model


def looks_like_hub_id(path: str) -> bool:
    """`org/name` (one slash, no leading `.`, `/` or `~`): a name the Hugging Face hub may hold."""
    return not path.startswith((".", "/", "~")) and len(path.split("/")) == 2 and all(path.split("/"))


def check_model_path(path: str, adapter_ok: bool = True) -> None:
    """A model folder, hub id or (with `adapter_ok`) LoRA adapter folder whose base is there; else UserError.
    A name that is not a folder here is tried on the hub only when it looks like `org/name`, once, without
    retries, and the error says both were tried."""
    if not path:
        raise UserError("`model_name_or_path` is empty")
    if gguf_file(path):  # a GGUF file (or a folder holding one): converted where it is loaded
        return
    if adapter_ok and is_adapter(path):
        return check_model_path(existing_base(path), adapter_ok=False)
    if os.path.exists(path):
        if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(
                f"model path {path} is not a Hugging Face model folder (no config.json in it); "
                "make one with `alignkit tiny DIR` or give a hub id"
            )
        return
    if not looks_like_hub_id(path):
        where = "" if os.path.isabs(os.path.expanduser(path)) else f" (looked in {os.getcwd()})"
        raise UserError(
            f"there is no model folder {path}{where}; give a local model folder or a hub id such as "
            "`Qwen/Qwen2.5-0.5B-Instruct`"
        )
    why = hub_problem(path)
    if why:
        raise UserError(f"there is no model folder {path} here (looked in {os.getcwd()}), and {why}")


@functools.lru_cache(maxsize=64)
def _hub_has(repo_id: str) -> None:
    """Ask the hub once whether `repo_id` exists (no retries); `_Missing` says why not. A found model is
    remembered for the process; a failure is not (lru_cache keeps no exceptions), so it is asked again."""
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        model_info(repo_id, timeout=10)
    except GatedRepoError:
        return ""  # it exists; loading it says what access it needs
    except RepositoryNotFoundError:
        why = f"the Hugging Face hub has no model {repo_id} (or it is private: log in with `hf auth login`)"
        raise _Missing(why) from None
    except Exception as exc:  # no network, DNS, proxy, TLS: whatever the HTTP client raises
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise _Missing(f"the Hugging Face hub could not be reached to look for {repo_id} ({reason})") from exc


class _Missing(Exception):
    """Why a hub id cannot be loaded (raised so that lru_cache does not remember failures)."""


def hub_problem(repo_id: str) -> str:
    """'' when `repo_id` can be loaded from the hub (or the hub is switched off and transformers' cache may
    hold it), else why it cannot, for an error message."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if try_to_load_from_cache(repo_id, "config.json") is None:
            return f"HF_HUB_OFFLINE is set and the local hub cache has no {repo_id}"
        return ""
    try:
        _hub_has(repo_id)
    except _Missing as exc:
        return str(exc)
    return ""


# --- LoRA adapter folders: where a model is asked for, an adapter folder (adapter_config.json) works too ------

ADAPTER_CONFIG = "adapter_config.json"
# Beside an adapter trained on a base with adapters merged into it: those, in order (its adapter_config.json
# names the bare base); `resolve_model` merges them first wherever the adapter is loaded.
MERGED_ADAPTERS = "merged_adapters.json"


class ModelSpec(NamedTuple):
    """The weights a model is made of: a full model, adapters merged into it in order, one adapter on top that
    training continues (None: a fresh LoRA, or no LoRA)."""

    base: str
    merge: tuple[str, ...]
    resume: str | None

    @property
    def adapters(self) -> tuple[str, ...]:
        return self.merge + ((self.resume,) if self.resume else ())


def is_peft(model: Any) -> bool:
    """Whether `model` carries peft (LoRA) adapters."""
    return hasattr(model, "peft_config")


def is_adapter(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def _adapter_config(path: str) -> dict[str, Any]:
    config = os.path.join(path, ADAPTER_CONFIG)
    with open(config, encoding="utf-8") as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise UserError(f"{config} is not a JSON object ({exc}); re-save the adapter with peft") from exc
    if not isinstance(data, dict):
        raise UserError(f"{config} is not a JSON object; re-save the adapter with peft")
    return data


def adapter_base(path: str) -> str | None:
    """The base model an adapter folder names, or None when `path` is not an adapter folder."""
    if not is_adapter(path):
        return None
    base = _adapter_config(path).get("base_model_name_or_path")
    if not base:
        raise UserError(
            f"{os.path.join(path, ADAPTER_CONFIG)}: no `base_model_name_or_path`; set it to the base model "
            "the adapter was trained on"
        )
    return base


def adapter_task_type(path: str) -> str | None:
    """peft's task_type of an adapter folder (CAUSAL_LM, SEQ_CLS, ...); None when unknown (a hub id)."""
    return _adapter_config(path).get("task_type") if is_adapter(path) else None


def existing_base(path: str) -> str:
    """An adapter folder's base; one that is neither a folder here nor loadable from the hub is a UserError
    naming the adapter's adapter_config.json and its key."""
    base = adapter_base(path) or path
    config = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.exists(base):
        named = f"adapter {path} was trained on {base} (`base_model_name_or_path` in {config})"
        fix = "edit that key to where the base model is"
        if not looks_like_hub_id(base):
            raise UserError(f"{named}, which does not exist here; {fix}")
        why = hub_problem(base)
        if why:
            raise UserError(
                f"{named}, which is not a folder here (looked in {os.getcwd()}), and {why}; {fix}"
            )
    if is_adapter(base):
        raise UserError(
            f"{config}: `base_model_name_or_path` {base} is itself an adapter; name the full base model there"
        )
    return base


def weights_path(path: str) -> str:
    """Where a model's config.json is: the base of an adapter folder, a GGUF file's converted folder, else the
    path itself."""
    return local_model((adapter_base(path) or path) if os.path.isdir(path) else path)


def _merged_before(adapter: str) -> list[str]:
    """The adapters MERGED_ADAPTERS says were merged into the base under `adapter`."""
    record = os.path.join(adapter, MERGED_ADAPTERS)
    if not os.path.isfile(record):
        return []
    try:
        with open(record, encoding="utf-8") as fh:
            merged = list(json.load(fh)["merged_adapters"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{record}: not a list of `merged_adapters` ({exc}); fix or delete the file") from exc
    for path in merged:
        if not os.path.exists(path) and path.startswith((".", "/", "~")):
            raise UserError(
                f"adapter {adapter} was trained on its base with {path} merged in, which does not exist here; "
                f"edit `merged_adapters` in {record} to where that adapter is"
            )
    return merged


def resolve_model(
    path: str,
    adapters: str | list[str] | None = None,
    continue_last: bool = False,
    key: str = "model_name_or_path",
) -> ModelSpec:
    """The one place a model path plus adapters becomes weights to load (LLaMA-Factory's rule): `path` may be an
    adapter folder (its base read from adapter_config.json) and `adapters` (adapter_name_or_path) are applied on
    top; every adapter is merged except the last, which is continued when `continue_last`."""
    listed = ([path] if is_adapter(path) else []) + (split_sources(adapters) if adapters else [])
    chain: list[str] = []
    for i, adapter in enumerate(listed):
        where = key if i == 0 and listed[0] == path else "adapter_name_or_path"
        if (os.path.exists(adapter) or adapter.startswith((".", "/", "~"))) and not is_adapter(adapter):
            what = "is not a LoRA adapter folder" if os.path.exists(adapter) else "does not exist"
            raise UserError(
                f"`{where}`: {adapter} {what} (a folder with {ADAPTER_CONFIG}); give a folder a LoRA run "
                "saved, or a full model as `model_name_or_path`"
            )
        for item in [*_merged_before(adapter), adapter]:
            item = os.path.abspath(item) if os.path.exists(item) else item
            if item not in chain:
                chain.append(item)
    base = local_model(existing_base(path) if is_adapter(path) else path)  # a GGUF file: its converted folder
    resume = chain[-1] if continue_last and chain else None
    return ModelSpec(base, tuple(chain[:-1] if resume else chain), resume)


def training_spec(cfg: BaseConfig, task_type: str, path: str | None = None) -> ModelSpec:
    """The weights a trainable model starts from. Under lora / qlora the last adapter is continued (its weights
    trainable) unless `merge_adapter: true`, or it was trained for another head (an SFT adapter under a
    reward model: merged into the backbone, and a fresh LoRA trained); under full / freeze all are merged."""
    lora = cfg.finetuning_type in ("lora", "qlora")
    adapters = cfg.adapter_name_or_path if path is None else None
    spec = resolve_model(path or cfg.model_name_or_path, adapters, lora and not cfg.merge_adapter)
    if spec.resume and adapter_task_type(spec.resume) not in (None, task_type):
        spec = ModelSpec(spec.base, spec.adapters, None)
    heads = [a for a in spec.adapters if task_type == "CAUSAL_LM" and adapter_task_type(a) == "SEQ_CLS"]
    if heads:  # a reward model's adapter (a score head) cannot become part of a language model
        raise UserError(
            f"adapter {heads[0]} is a reward model's (task_type SEQ_CLS); a policy needs a causal LM: give a "
            "full model or an SFT adapter, and the reward model as `reward_model`"
        )
    if cfg.finetuning_type == "qlora" and spec.merge:
        raise UserError(
            f"finetuning_type: qlora cannot merge adapters into 4-bit weights ({', '.join(spec.merge)}); "
            "merge them first (`alignkit export`) and train on the merged model, or use `finetuning_type: lora`"
        )
    return spec
