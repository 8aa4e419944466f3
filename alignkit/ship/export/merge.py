"""`alignkit export`: merge a LoRA adapter into its base and write a Hugging Face model folder (sharded
safetensors, the tokenizer with its chat template, the generation config, a model card); reload what was
written with plain transformers and compare its logits with the unmerged model's; optionally quantize the
result with bitsandbytes (int8, or int4 nf4) and measure how often its greedy answers agree with the full
model's. Settings come from flags or from LLaMA-Factory's merge YAML keys (flags win)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

import torch
from torch import nn

from alignkit.errors import UserError
from alignkit.generation.rollout import complete, encode_prompts
from alignkit.modeling.load import TOKENIZER_FILES, checkpoint_dtype, load_causal_lm, load_tokenizer
from alignkit.modeling.resolve import adapter_base
from alignkit.ship.export.card import ExportResult, QuantReport, agreement, write_card
from alignkit.ship.export.settings import ExportSettings

log = logging.getLogger("alignkit")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_FROM_TORCH_NAME = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp32"}
# The check compares logits on probe prompts with those of the unmerged model run in float32, relative to
# their largest |logit| (at least 1). The merge itself (in float32) and the write/reload round trip (the same
# weights in the same dtype) must agree within FP32_RTOL: only summation order differs (1e-6 relative
# measured). The reloaded export as a whole is also held to RTOL[dtype]: bf16 / fp16 round every weight to
# 8 / 11 significant bits (relative error up to 2^-9 / 2^-12) and compute in that dtype; on tiny models that
# cost measured up to 0.045 (bf16) and 0.0052 (fp16) of the logit scale, about half and a quarter of these.
FP32_RTOL = 1e-4
RTOL = {"fp32": FP32_RTOL, "bf16": 0.1, "fp16": 0.02}
# chat turns (through the tokenizer's chat template), or plain text when there is no template
PROBES = ("What is 12 + 7?", "Write one sentence about the sea.", "Name three colours.", "Say hello.")
PROBES += ("Give a synonym of 'happy'.", "How many legs does a spider have?", "2, 4, 8, ...", "Why?")
LOGIT_PROBES = 3
QUANT_MAX_NEW_TOKENS = 32
# --- checks before anything is written --------------------------------------------------------------------


def _resolve_device(settings: ExportSettings) -> str:
    device = settings.device
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"{settings.name('device')}: `{device}`; choose cpu, cuda or auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{settings.name('device')}: {device} but no CUDA GPU is visible; use cpu")
    return device


def _check_dtype_runs(dtype: str, device: str, flag: str) -> None:
    """The check runs the export in its dtype: refuse one this device cannot compute in."""
    x = torch.ones(2, 8, dtype=DTYPES[dtype], device=device)
    try:
        torch.nn.functional.linear(x, x).softmax(-1)
    except RuntimeError as exc:
        raise UserError(
            f"{flag}: {dtype} does not run on {device} here ({str(exc).splitlines()[0]}); "
            "choose another --dtype (fp32 runs everywhere) or --device"
        ) from exc


def _base_of(settings: ExportSettings) -> str:

    adapter = settings.adapter
    if adapter is not None:
        if not os.path.isdir(adapter):
            raise UserError(f"{settings.name('adapter')}: adapter folder {adapter} does not exist")
        if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            raise UserError(
                f"{settings.name('adapter')}: {adapter} is not a LoRA adapter folder (no adapter_config.json); "
                "a full model needs no merge: give it as --model without --adapter to re-save it"
            )
    if settings.model:
        return settings.model
    base = adapter_base(adapter) if adapter else None
    if base is None:
        raise UserError("nothing to export: give --adapter DIR (and --model BASE), or --model alone")
    if not os.path.exists(base) and base.startswith((".", "/", "~")):
        raise UserError(
            f"{settings.name('adapter')}: the adapter was trained on {base}, which does not exist here; give "
            f"the base with --model, or edit `base_model_name_or_path` in {adapter}/adapter_config.json"
        )
    return base


def _preflight(settings: ExportSettings) -> tuple[str, str, str]:
    """(base, dtype, device), or a UserError before anything is loaded or written."""

    out = settings.output
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(
            f"{settings.name('output')}: {out} already exists and is not empty; nothing was written: "
            "choose another folder (or remove this one)"
        )
    base = _base_of(settings)
    if settings.quantize:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise UserError(
                f"{settings.name('quantize')} {settings.quantize} needs bitsandbytes: "
                "pip install 'alignkit[quantize]'"
            ) from exc
        if settings.legacy_format:
            raise UserError(
                f"{settings.name('legacy_format')}: quantized weights are written as safetensors only; "
                "set it to false"
            )
    if settings.shard_size_gb <= 0:
        raise UserError(f"{settings.name('shard_size_gb')}: {settings.shard_size_gb}; give GB > 0")
    device = _resolve_device(settings)
    dtype = settings.dtype or _FROM_TORCH_NAME.get(str(checkpoint_dtype(base)), "fp32")
    _check_dtype_runs(dtype, device, settings.name("dtype"))
    return base, dtype, device


# --- merge, save, check, quantize --------------------------------------------------------------------------


def _load(settings: ExportSettings, base: str, device: str) -> tuple[nn.Module, Any]:
    """The model to export in float32 (the merge adds the adapter's delta before one rounding to the export
    dtype), and the tokenizer: the adapter folder's when it has one (alignkit saves it there), else the base's."""

    model, tokenizer = load_causal_lm(base, "float32", settings.trust_remote_code)
    adapter = settings.adapter
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
        if any(os.path.isfile(os.path.join(adapter, f)) for f in TOKENIZER_FILES):
            tokenizer = load_tokenizer(adapter, settings.trust_remote_code)
    return model.to(device), tokenizer


def probe_prompts(tokenizer: Any, n: int) -> list[Any]:
    """The first `n` probes: chat turns when the tokenizer has a chat template, else plain text."""
    texts = list(PROBES[:n])
    if getattr(tokenizer, "chat_template", None):
        return [[{"role": "user", "content": t}] for t in texts]
    return texts


@torch.no_grad()
def probe_logits(model: nn.Module, ids: list[list[int]]) -> list[torch.Tensor]:
    """(T, V) float32 logits of each probe, run one at a time (no padding to get in the way)."""
    device = next(model.parameters()).device
    return [model(torch.tensor([row], device=device)).logits[0].float().cpu() for row in ids]


def _save(model: nn.Module, tokenizer: Any, out: str, shard_bytes: int, legacy: bool) -> None:
    os.makedirs(out, exist_ok=True)
    if legacy:  # transformers 5 writes safetensors only; huggingface_hub still writes torch .bin shards
        from huggingface_hub import save_torch_state_dict

        save_torch_state_dict(model.state_dict(), out, max_shard_size=shard_bytes, safe_serialization=False)
        model.config.save_pretrained(out)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out)
    else:
        model.save_pretrained(out, max_shard_size=shard_bytes)
    tokenizer.save_pretrained(out)


def weight_files(folder: str) -> list[str]:
    return sorted(
        f
        for f in os.listdir(folder)
        if (f.startswith("model") and f.endswith(".safetensors"))
        or (f.startswith("pytorch_model") and f.endswith(".bin"))
    )


def _reload(folder: str, device: str, trust_remote_code: bool, **kwargs: Any) -> nn.Module:
    """What a user gets: plain transformers, the dtype the files hold."""
    from transformers import AutoModelForCausalLM

    if "quantization_config" not in kwargs and "device_map" not in kwargs:
        kwargs["dtype"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust_remote_code, **kwargs)
    if "device_map" not in kwargs:
        model.to(device)
    return model.eval().requires_grad_(False)


def max_diff(reference: list[torch.Tensor], logits: list[torch.Tensor]) -> float:
    """The largest |logit difference| over the probes."""
    return max((a - b).abs().max().item() for a, b in zip(reference, logits))


def logit_scale(reference: list[torch.Tensor]) -> float:
    """What tolerances are relative to: the probes' largest |logit|, at least 1."""
    return max(1.0, max(r.abs().max().item() for r in reference))


def _quantize(
    full: nn.Module, tokenizer: Any, full_dir: str, settings: ExportSettings, device: str, dtype: str
) -> QuantReport:
    """Load the merged folder quantized, save it as the export, reload it and compare greedy answers."""
    from transformers import BitsAndBytesConfig

    if settings.quantize == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:  # compute in float32 on CPU (its half-precision kernels are slow or missing), the export's on GPU
        compute = torch.float32 if device == "cpu" else DTYPES[dtype]
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
        )
    place = {"": device}
    quantized = _reload(
        full_dir, device, settings.trust_remote_code, quantization_config=config, device_map=place
    )
    _save(quantized, tokenizer, settings.output, _shard_bytes(settings), legacy=False)
    del quantized
    quantized = _reload(settings.output, device, settings.trust_remote_code, device_map=place)
    prompts = probe_prompts(tokenizer, len(PROBES))
    args = {"max_new_tokens": QUANT_MAX_NEW_TOKENS, "temperature": 0.0}
    full_ids = complete(full, tokenizer, prompts, **args).completion_ids
    quant_ids = complete(quantized, tokenizer, prompts, **args).completion_ids
    exact, tokens = agreement(full_ids, quant_ids)
    return QuantReport(settings.quantize or "", len(prompts), QUANT_MAX_NEW_TOKENS, exact, tokens)


def _shard_bytes(settings: ExportSettings) -> int:
    return max(int(settings.shard_size_gb * 10**9), 1)


def _cast_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters only, as loading in a dtype does: `model.to(dtype)` would also round buffers such
    as rotary inv_freq, which a reloaded model keeps in float32 (0.08 apart in bf16 logits on a tiny model)."""
    for param in model.parameters():  # tied weights are one parameter
        param.data = param.data.to(dtype)
    model.config.dtype = dtype  # config.json's dtype: what `dtype="auto"` loads


def _verify(result: ExportResult, scale: float, folder: str) -> None:
    """The three parts of the check (see FP32_RTOL): an unfaithful export is an error that leaves the folder."""
    parts = [
        ("the merge (float32)", result.merge_diff, FP32_RTOL * scale),
        ("the files reloaded (same dtype)", result.reload_diff, FP32_RTOL * scale),
        (f"the export in {result.dtype}", result.max_logit_diff, result.tolerance),
    ]
    failed = [f"{what}: {diff:.3g} > {tol:.3g}" for what, diff, tol in parts if not diff <= tol]
    if failed:
        raise UserError(
            f"the export in {folder} is not faithful: its logits on the probe prompts differ from the unmerged "
            f"model's beyond tolerance ({'; '.join(failed)}); the folder is left for inspection "
            "(check that the adapter matches the base; try --dtype fp32)"
        )


def export_model(settings: ExportSettings) -> ExportResult:
    """Merge, write, check and (optionally) quantize. Every user mistake is found before anything is written;
    an export that does not reproduce the unmerged model's logits is a UserError that leaves the folder."""

    base, dtype, device = _preflight(settings)
    model, tokenizer = _load(settings, base, device)
    ids = encode_prompts(tokenizer, probe_prompts(tokenizer, LOGIT_PROBES))
    reference = probe_logits(model, ids)  # the unmerged model, float32
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    merged = probe_logits(model, ids)
    _cast_weights(model, DTYPES[dtype])
    written = probe_logits(model, ids)  # what the files must give back
    out = settings.output
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    # with --quantize the export is the quantized model; the full one is built beside it and removed after
    full_dir = tempfile.mkdtemp(prefix=".export-full-", dir=parent) if settings.quantize else out
    _save(model, tokenizer, full_dir, _shard_bytes(settings), settings.legacy_format)
    del model
    full = _reload(full_dir, device, settings.trust_remote_code)
    reloaded = probe_logits(full, ids)
    scale = logit_scale(reference)
    result = ExportResult(out, base, settings.adapter, dtype, weight_files(full_dir))
    result.max_logit_diff, result.tolerance = max_diff(reference, reloaded), RTOL[dtype] * scale
    result.merge_diff, result.reload_diff = max_diff(reference, merged), max_diff(written, reloaded)
    _verify(result, scale, full_dir)
    if settings.quantize:
        try:
            result.quantized = _quantize(full, tokenizer, full_dir, settings, device, dtype)
        finally:
            shutil.rmtree(full_dir, ignore_errors=True)
        result.weight_files = weight_files(out)
    result.card = write_card(result, settings)
    return result
