"""What an export reports: its result record, the command's summary lines, and the model card (`README.md`
in the Hugging Face format): YAML front matter, what was trained and how (from the run's config.yaml, which
alignkit writes into each output_dir), the eval results when an eval.json lies in the adapter folder (or its
`eval/`), and what the export itself measured."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from alignkit.evaluation.report import render_table
from alignkit.ship.export.settings import ExportSettings


@dataclass
class QuantReport:
    """Greedy answers of the quantized model against the full one's on the same probe prompts."""

    mode: str  # int8 | int4
    n_prompts: int
    max_new_tokens: int
    exact_match: float  # share of prompts whose answers are token for token the same
    token_agreement: float  # share of answer positions (up to the longer answer) holding the same token


@dataclass
class ExportResult:
    """Where the export went and what its check measured (largest |logit difference| on the probes)."""

    output: str
    base: str
    adapter: str | None
    dtype: str  # fp32 | bf16 | fp16
    weight_files: list[str] = field(default_factory=list)
    max_logit_diff: float = float("nan")  # reloaded export vs the unmerged model in float32
    tolerance: float = float("nan")  # for max_logit_diff
    merge_diff: float = float("nan")  # the merged model in float32 vs the unmerged one
    reload_diff: float = float("nan")  # reloaded export vs the merged model in the export dtype, in memory
    quantized: QuantReport | None = None
    card: str = ""


def agreement(full: list[list[int]], quant: list[list[int]]) -> tuple[float, float]:
    """(exact-match rate, token agreement) of paired answers: token agreement counts positions up to the
    longer answer of each pair, a position agreeing when both answers hold the same token there."""
    exact = sum(a == b for a, b in zip(full, quant)) / max(len(full), 1)
    same = sum(sum(x == y for x, y in zip(a, b)) for a, b in zip(full, quant))
    total = sum(max(len(a), len(b)) for a, b in zip(full, quant))
    return exact, same / total if total else 1.0


def render_summary(result: ExportResult, probes: int) -> str:
    """The command's output: where, what, and the check's figures."""
    files = result.weight_files
    more = f" ... {files[-1]}" if len(files) > 1 else ""
    lines = [f"exported to {result.output}"]
    quantized = f", linear layers {result.quantized.mode}" if result.quantized else ""
    lines.append(f"  weights: {len(files)} file(s) ({files[0]}{more}), {result.dtype}{quantized}")
    lines.append(
        f"  largest |logit difference| vs the unmerged model on {probes} probes: {result.max_logit_diff:.3g} "
        f"(tolerance {result.tolerance:.3g}; the float32 merge alone: {result.merge_diff:.3g})"
    )
    q = result.quantized
    if q is not None:
        lines.append(
            f"  quantized {q.mode} with bitsandbytes (loading it needs bitsandbytes): greedy answers on "
            f"{q.n_prompts} probes match the full model's exactly on {q.exact_match:.3f} of them; token "
            f"agreement {q.token_agreement:.3f}"
        )
    lines.append(f"  model card: {result.card}")
    return "\n".join(lines)


_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _read_yaml(path: str) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        loaded = yaml.safe_load(fh)
    return loaded if isinstance(loaded, dict) else None


def _read_json(path: str) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        try:
            loaded = json.load(fh)
        except json.JSONDecodeError:
            return None
    return loaded if isinstance(loaded, dict) else None


def find_eval(folder: str) -> tuple[str, dict[str, Any]] | None:
    """(path, eval.json's dict) in the folder or its `eval/` subfolder (`alignkit eval --output-dir`)."""
    for path in (os.path.join(folder, "eval.json"), os.path.join(folder, "eval", "eval.json")):
        report = _read_json(path)
        if report is not None and isinstance(report.get("metrics"), dict):
            return path, report
    return None


def data_files(train_config: dict[str, Any] | None) -> list[str]:
    """The run's `dataset` and `eval_dataset` entries, in order."""
    files: list[str] = []
    for key in ("dataset", "eval_dataset"):
        value = (train_config or {}).get(key)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and item and item not in files:
                files.append(item)
    return files


def hub_datasets(files: list[str]) -> list[str]:
    """The entries that are hub data set ids (`owner/name`, not a local path or a data file)."""
    return [
        f
        for f in files
        if _HUB_ID.match(f)
        and not f.startswith(".")
        and not f.endswith(_DATA_SUFFIXES)
        and not os.path.exists(f)
    ]


def front_matter(
    base: str, train_config: dict[str, Any] | None, quantize: str | None, adapter: dict[str, Any] | None
) -> dict[str, Any]:
    tags = ["alignkit"]
    stage = (train_config or {}).get("stage")
    loss = (train_config or {}).get("loss_type")
    for tag in [stage, *(loss if isinstance(loss, list) else [loss])]:
        if isinstance(tag, str) and tag and tag not in tags:
            tags.append(tag)
    if adapter is not None:
        tags += ["lora", "merged"]
    if quantize:
        tags += ["bitsandbytes", "8-bit" if quantize == "int8" else "4-bit"]
    meta: dict[str, Any] = {
        "base_model": base,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
    }
    meta["tags"] = tags
    datasets = hub_datasets(data_files(train_config))
    if datasets:
        meta["datasets"] = datasets
    return meta


def _training_section(
    train_config: dict[str, Any] | None, adapter: dict[str, Any] | None, template: str | None
) -> list[str]:
    lines = ["## Training", ""]
    if train_config is None:
        lines.append(
            "No alignkit config.yaml was found beside the weights: the training settings are unknown."
        )
    else:
        method = train_config.get("loss_type")
        method = " + ".join(map(str, method)) if isinstance(method, list) else method
        method_text = f", method `{method}`" if method else ""
        lines.append(f"- stage: `{train_config.get('stage', 'sft')}`{method_text}")
        lines.append(f"- data files: {', '.join(f'`{f}`' for f in data_files(train_config)) or 'unknown'}")
    if adapter is not None:
        targets = adapter.get("target_modules")
        targets = ", ".join(sorted(targets)) if isinstance(targets, list) else targets
        lines.append(
            f"- LoRA: r {adapter.get('r')}, alpha {adapter.get('lora_alpha')}, target modules {targets}; "
            "merged into the base weights (`merge_and_unload`)"
        )
    if template:
        lines.append(
            f"- template (LLaMA-Factory name): `{template}`; the chat template ships in the tokenizer"
        )
    if train_config is not None:
        dumped = yaml.safe_dump(train_config, sort_keys=False).rstrip()
        lines += ["", "<details><summary>Resolved training config (config.yaml)</summary>", ""]
        lines += ["```yaml", dumped, "```", "", "</details>"]
    return lines


def _eval_section(found: tuple[str, dict[str, Any]] | None) -> list[str]:
    if found is None:
        return []

    path, report = found
    baseline = report.get("baseline_metrics") if isinstance(report.get("baseline_metrics"), dict) else None
    lines = ["## Evaluation", ""]
    lines.append(
        f"From `{os.path.basename(os.path.dirname(path)) or '.'}/eval.json` (alignkit eval): model "
        f"`{report.get('model')}`, baseline `{report.get('baseline') or 'none'}`, data `{report.get('dataset')}`, "
        f"{report.get('n_prompts', '?')} prompts. Rates carry a Wilson interval, means a bootstrap one."
    )
    return [*lines, "", render_table(report["metrics"], baseline)]


def _export_section(result: ExportResult, settings: ExportSettings) -> list[str]:
    files = result.weight_files
    legacy = any(f.endswith(".bin") for f in files)
    lines = ["## Export", ""]
    lines.append(
        f"- weights: {len(files)} {'pytorch .bin' if legacy else 'safetensors'} file(s), {result.dtype}"
        + (f", quantized {result.quantized.mode} with bitsandbytes" if result.quantized else "")
    )
    lines.append(
        f"- check: reloaded with `AutoModelForCausalLM.from_pretrained`, the largest |logit difference| from "
        f"the unmerged model (float32) on the probe prompts is {result.max_logit_diff:.3g} "
        f"(tolerance {result.tolerance:.3g})"
    )
    q = result.quantized
    if q is not None:
        lines.append(
            f"- loading this model needs `bitsandbytes` (`pip install bitsandbytes`). Greedy answers "
            f"({q.n_prompts} probe prompts, up to {q.max_new_tokens} new tokens) agree with the full-precision merge's: exact "
            f"match {q.exact_match:.3f}, token agreement {q.token_agreement:.3f}"
        )
    return lines


def render_card(result: ExportResult, settings: ExportSettings) -> str:
    source = settings.adapter or (
        settings.model if settings.model and os.path.isdir(settings.model) else None
    )
    train_config = _read_yaml(os.path.join(source, "config.yaml")) if source else None
    adapter = _read_json(os.path.join(settings.adapter, "adapter_config.json")) if settings.adapter else None
    meta = front_matter(result.base, train_config, settings.quantize, adapter)
    name = os.path.basename(os.path.normpath(result.output))
    what = f"the LoRA adapter `{settings.adapter}` merged into" if settings.adapter else "a re-save of"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {name}", ""]
    lines += [f"This model is {what} `{result.base}`, exported by alignkit.", ""]
    lines += _training_section(train_config, adapter, settings.template)
    evaluation = _eval_section(find_eval(source) if source else None)
    lines += [""] + evaluation if evaluation else []
    lines += [""] + _export_section(result, settings)
    usage = [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
    ]
    lines += ["", "## Usage", "", "```python", *usage, "```", ""]
    return "\n".join(lines)


def write_card(result: ExportResult, settings: ExportSettings) -> str:
    path = os.path.join(result.output, "README.md")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(render_card(result, settings))
    return path
