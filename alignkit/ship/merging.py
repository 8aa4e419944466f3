"""`alignkit merge CONFIG.yaml`: merge several fine-tunes of one base (full models, LoRA adapters, GGUF files)
into one Hugging Face folder, through mergekit (`pip install 'alignkit[merge]'`).

The config is mergekit's own YAML (`merge_method`: linear, slerp, ties, dare_ties, dare_linear,
task_arithmetic, ...; `models` with their `parameters`; `base_model`; `dtype`), so a mergekit user's file runs
as written, plus `output` (or `--output`). What alignkit adds: any model path alignkit reads works as an input
(a LoRA adapter folder becomes mergekit's `base+adapter`, a GGUF file its converted folder), errors name the
file and key, the merged folder is loaded back and checked (finite logits on a probe), and a model card names
the inputs, their parameters and the method.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from alignkit.config import load_yaml_mapping
from alignkit.config.cache import user_cache_dir
from alignkit.errors import UserError
from alignkit.modeling.gguf import local_model
from alignkit.modeling.resolve import check_model_path, existing_base, is_adapter

log = logging.getLogger("alignkit")


@dataclass
class MergeResult:
    output: str
    method: str
    inputs: list[dict[str, Any]] = field(default_factory=list)  # each model as given, with its parameters

    def summary(self) -> str:
        names = ", ".join(str(i["model"]) for i in self.inputs)
        return f"merged {len(self.inputs)} models ({names}) by {self.method} into {self.output}"


def _mergekit_path(path: str, where: str) -> str:
    """A model path as mergekit reads it: a LoRA adapter folder -> `base+adapter`, a GGUF file -> its folder."""
    if not isinstance(path, str) or not path:
        raise UserError(f"{where}: give a model folder, a LoRA adapter folder, a GGUF file or a hub id")
    try:
        check_model_path(path)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from exc
    if is_adapter(path):
        return f"{local_model(existing_base(path))}+{os.path.abspath(path)}"
    return local_model(path)


def _prepared(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """mergekit's configuration with every model path made readable by it."""
    cfg = copy.deepcopy(raw)
    models = cfg.get("models")
    if not isinstance(models, list) or not models:
        raise UserError(f"{source}: `models` must list the models to merge (each `- model: PATH`)")
    for i, entry in enumerate(models):
        if not isinstance(entry, dict) or "model" not in entry:
            raise UserError(f"{source}: `models[{i}]` needs a `model:` path")
        entry["model"] = _mergekit_path(entry["model"], f"{source}: models[{i}].model")
    if cfg.get("base_model"):
        cfg["base_model"] = _mergekit_path(cfg["base_model"], f"{source}: base_model")
    return cfg


def _check_method(method: Any, source: str) -> None:
    from mergekit import merge_methods

    try:
        merge_methods.get(str(method))
    except RuntimeError as exc:  # mergekit: "Unimplemented merge method X"
        raise UserError(
            f"{source}: `merge_method: {method}` is not one of mergekit's methods (linear, slerp, ties, dare_ties, "
            "dare_linear, task_arithmetic, della, model_stock, nuslerp, passthrough, ...)"
        ) from exc


def merge_models(config: str | dict[str, Any], output: str | None = None, seed: int = 0) -> MergeResult:
    """Merge as `config` (a mergekit YAML path or mapping) says into `output` (or the config's `output`)."""
    try:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge
    except ImportError as exc:
        raise UserError("alignkit merge runs mergekit: pip install 'alignkit[merge]'") from exc
    from pydantic import ValidationError

    source = config if isinstance(config, str) else "merge config"
    raw = load_yaml_mapping(config) if isinstance(config, str) else dict(config)
    output = output or raw.pop("output", None)  # alignkit's key, not mergekit's: never passed on
    raw.pop("output", None)
    if not output:
        raise UserError(f"{source}: no output folder: give `output:` or --output OUT")
    _check_method(raw.get("merge_method"), source)
    try:
        merge_config = MergeConfiguration.model_validate(_prepared(raw, source))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise UserError(f"{source}: `{where}`: {first.get('msg')} (mergekit's merge config)") from exc
    options = MergeOptions(
        copy_tokenizer=True,
        random_seed=seed,
        quiet=True,
        lazy_unpickle=False,
        lora_merge_cache=os.path.join(user_cache_dir(), "mergekit-lora"),  # adapters merged into their base
    )
    try:
        run_merge(merge_config, out_path=output, options=options)
    except (ValueError, KeyError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise UserError(f"{source}: mergekit could not merge these models ({reason})") from exc
    result = MergeResult(output, str(raw.get("merge_method")), list(raw["models"]))
    _check(output)
    _card(result, raw)
    return result


def _check(folder: str) -> None:
    """The merged folder loads in plain transformers and gives finite logits on a probe."""
    import torch

    from alignkit.modeling.load import load_causal_lm

    model, tok = load_causal_lm(folder, "float32")
    ids = tok("What is 12 + 7?", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    if not torch.isfinite(logits).all():
        raise UserError(f"the merged model in {folder} gives non-finite logits; check the merge's parameters")


def _card(result: MergeResult, raw: dict[str, Any]) -> None:
    """README.md: the method, the base, every input with its parameters (mergekit's own card is replaced)."""
    lines = ["---", "tags: [merge, alignkit]", "---", "", "# Merged model", ""]
    lines.append(f"Merged by `alignkit merge` (mergekit) with **{result.method}**.")
    if raw.get("base_model"):
        lines.append(f"Base: `{raw['base_model']}`.")
    lines += ["", "| model | parameters |", "|---|---|"]
    for entry in result.inputs:
        params = ", ".join(f"{k}={v}" for k, v in (entry.get("parameters") or {}).items()) or "-"
        lines.append(f"| `{entry['model']}` | {params} |")
    if raw.get("parameters"):
        lines += ["", "Method parameters: " + ", ".join(f"{k}={v}" for k, v in raw["parameters"].items())]
    with open(os.path.join(result.output, "README.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
