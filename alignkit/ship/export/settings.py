"""What `alignkit export` exports: settings from flags, a mapping, or LLaMA-Factory's merge YAML keys (flags
win), each remembered with how the user named it so that errors name what the user wrote."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from alignkit.config import load_yaml_mapping
from alignkit.config.coerce import coerce
from alignkit.errors import UserError, did_you_mean

log = logging.getLogger("alignkit")

DEFAULT_SHARD_GB = 5.0
DEFAULT_DEVICE = "cpu"
FLAGS = {s: f"--{s}" for s in ("model", "adapter", "output", "dtype", "quantize", "device", "format")}
FORMATS = ("hf", "gguf")
HF_QUANTIZE = ("int8", "int4")  # bitsandbytes; GGUF's types are alignkit.ship.export.gguf_out.GGUF_TYPES
FLAGS["shard_size_gb"] = "--shard-size"
GGUF_FOR_BITS = {"int8": "q8_0", "int4": "q4_k_m"}  # export_quantization_bit: 8 / 4 with --format gguf


@dataclass
class ExportSettings:
    """What to export. `names` says how the user called each setting (a flag, or a YAML key and its file),
    so that error messages name what the user wrote."""

    output: str
    adapter: str | None = None
    model: str | None = None  # None: the base named in the adapter's adapter_config.json
    dtype: str | None = None  # fp32 | bf16 | fp16; None: the base checkpoint's
    shard_size_gb: float = DEFAULT_SHARD_GB
    quantize: str | None = None  # int8 | int4 (hf); f32 | f16 | q8_0 (gguf)
    format: str = "hf"  # hf: a Hugging Face folder | gguf: one GGUF file and an Ollama Modelfile
    device: str = DEFAULT_DEVICE
    legacy_format: bool = False  # pytorch .bin shards instead of safetensors
    trust_remote_code: bool = False
    template: str | None = None  # LLaMA-Factory's template name: recorded in the card
    names: dict[str, str] = field(default_factory=dict)

    def name(self, setting: str) -> str:
        return self.names.get(setting, FLAGS.get(setting, setting))


# --- settings from flags and LLaMA-Factory's merge YAML -------------------------------------------------

# LLaMA-Factory key -> (setting, type); see its examples/merge_lora/*.yaml
YAML_KEYS: dict[str, tuple[str, Any]] = {
    "model_name_or_path": ("model", str),
    "adapter_name_or_path": ("adapter", str),
    "export_dir": ("output", str),
    "export_size": ("shard_size_gb", float),
    "export_device": ("device", str),
    "export_legacy_format": ("legacy_format", bool),
    "export_quantization_bit": ("quantize", int),
    "infer_dtype": ("dtype", str),
    "trust_remote_code": ("trust_remote_code", bool),
    "template": ("template", str),
    "finetuning_type": ("finetuning_type", str),
}
# GPTQ calibration keys: bitsandbytes quantizes without calibration data, so they are read and not used
CALIBRATION_KEYS = (
    "export_quantization_dataset",
    "export_quantization_nsamples",
    "export_quantization_maxlen",
)
NOT_SUPPORTED = {
    "export_hub_model_id": "alignkit does not upload; push the folder with `hf upload NAME EXPORT_DIR`",
    "quantization_bit": "merging needs the full-precision base; use export_quantization_bit to quantize "
    "the merged model",
}
_INFER_DTYPES = {"auto": None, "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _check_keys(raw: dict[str, Any], path: str) -> None:
    """One error for every unknown or unsupported key of the file, each with its suggestion or reason."""
    known = [*YAML_KEYS, *CALIBRATION_KEYS]
    problems = [f"`{k}`: {NOT_SUPPORTED[k]}" for k in raw if k in NOT_SUPPORTED]
    problems += [
        f"unknown key `{k}`{did_you_mean(k, known)}" for k in raw if k not in known and k not in NOT_SUPPORTED
    ]
    if problems:
        raise UserError(
            f"{path}: {len(problems)} key(s) alignkit export cannot use:\n  "
            + "\n  ".join(problems)
            + f"\nvalid keys: {', '.join(YAML_KEYS)}"
        )


def _yaml_settings(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Settings from a LLaMA-Factory merge config, and the key each came from."""
    raw = load_yaml_mapping(path)
    _check_keys(raw, path)
    values: dict[str, Any] = {}
    names: dict[str, str] = {}
    for key, value in raw.items():
        if key in CALIBRATION_KEYS or value is None:
            if key in CALIBRATION_KEYS:
                log.info("%s: `%s` is not used (bitsandbytes needs no calibration data)", path, key)
            continue
        setting, tp = YAML_KEYS[key]
        try:
            values[setting] = coerce(key, value, tp)
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from exc
        names[setting] = f"`{key}` in {path}"
    _translate(values, names)
    return values, names


def _translate(values: dict[str, Any], names: dict[str, str]) -> None:
    """LLaMA-Factory's values -> alignkit's: finetuning_type must be lora, one adapter, dtype and bits names."""
    kind = values.pop("finetuning_type", "lora")
    if kind != "lora":
        raise UserError(f"{names['finetuning_type']}: `{kind}`; only LoRA adapters are merged (use `lora`)")
    adapter = values.get("adapter")
    if adapter and "," in adapter:
        raise UserError(
            f"{names['adapter']}: several adapters ({adapter}); export merges one: export the first, then "
            "give its export_dir as model_name_or_path for the next"
        )
    if "dtype" in values:
        if values["dtype"] not in _INFER_DTYPES:
            raise UserError(f"{names['dtype']}: `{values['dtype']}`; choose from {', '.join(_INFER_DTYPES)}")
        values["dtype"] = _INFER_DTYPES[values["dtype"]]
    if "quantize" in values:
        bits = values["quantize"]
        if bits not in (4, 8):
            raise UserError(f"{names['quantize']}: {bits} bits; bitsandbytes export takes 8 or 4")
        values["quantize"] = f"int{bits}"


def export_settings(config: str | None = None, **given: Any) -> ExportSettings:
    """Settings given by keyword (model, adapter, output, dtype, quantize, shard_size_gb, device; None: not
    given) over the YAML file's keys over the defaults, so a flag given with the default's value still wins
    over the file."""
    values, names = _yaml_settings(config) if config else ({}, {})
    unknown = [key for key in given if key not in FLAGS]
    if unknown:
        raise UserError(f"export: unknown setting `{unknown[0]}`{did_you_mean(unknown[0], FLAGS)}")
    for setting, value in given.items():
        if value is not None:
            values[setting] = value
            names[setting] = FLAGS[setting]
    if not values.get("output"):
        where = f"`export_dir` in {config} or " if config else ""
        raise UserError(f"no output folder: give {where}--output OUT")
    settings = ExportSettings(**values, names=names)
    if settings.format not in FORMATS:
        raise UserError(f"--format {settings.format}: choose hf or gguf")
    if settings.format == "gguf" and settings.quantize in GGUF_FOR_BITS and "quantize" in names:
        if names["quantize"] != FLAGS["quantize"]:  # LLaMA-Factory's export_quantization_bit, for a GGUF file
            log.info("%s: %s for a GGUF file", names["quantize"], GGUF_FOR_BITS[settings.quantize])
            settings.quantize = GGUF_FOR_BITS[settings.quantize]
    if settings.format == "hf" and settings.quantize not in (None, *HF_QUANTIZE):
        raise UserError(
            f"{settings.name('quantize')} {settings.quantize}: a Hugging Face export quantizes to int8 or int4 "
            "(bitsandbytes); for a GGUF file add --format gguf"
        )
    return settings
