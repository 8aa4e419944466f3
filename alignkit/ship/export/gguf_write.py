"""Write a Hugging Face causal LM as a GGUF file with the `gguf` library (llama.cpp's own Python package: its
writer, its tensor-name map from Hugging Face names, its quantizers).

`ARCHITECTURES` is the registry of what alignkit converts: for each Hugging Face class, llama.cpp's
architecture name and the two ways the files differ from the Hugging Face weights — q/k rows permuted to
llama.cpp's rotary order (Llama, Mistral), and RMSNorm weights stored as 1 + w (Gemma's norms multiply by
1 + w; llama.cpp's by w) — plus the settings that family adds to the metadata.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from alignkit.errors import UserError
from alignkit.ship.export.gguf_vocab import write_tokenizer


def _gemma2(writer: Any, config: Any) -> None:
    writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    writer.add_final_logit_softcapping(config.final_logit_softcapping)
    writer.add_sliding_window(config.sliding_window)


def _gemma3(writer: Any, config: Any) -> None:
    import gguf

    writer.add_sliding_window(config.sliding_window)
    scaling = _rope_parameters(config, "full_attention")
    if scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))


@dataclass(frozen=True)
class GGUFArch:
    name: str  # llama.cpp's architecture
    permute_qk: bool = False  # Hugging Face's rotary halves -> llama.cpp's interleaved pairs
    norm_plus_one: bool = False  # RMSNorm weights written as 1 + w
    metadata: Callable[[Any, Any], None] | None = None  # the family's own keys (writer, config)


ARCHITECTURES = {
    "LlamaForCausalLM": GGUFArch("llama", permute_qk=True),
    "MistralForCausalLM": GGUFArch("llama", permute_qk=True),
    "Qwen2ForCausalLM": GGUFArch("qwen2"),
    "Qwen3ForCausalLM": GGUFArch("qwen3"),
    "Gemma2ForCausalLM": GGUFArch("gemma2", norm_plus_one=True, metadata=_gemma2),
    "Gemma3ForCausalLM": GGUFArch("gemma3", norm_plus_one=True, metadata=_gemma3),
}
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}


def architecture(config: Any) -> GGUFArch:
    hf_arch = (config.architectures or ["?"])[0]
    if hf_arch not in ARCHITECTURES:
        raise UserError(
            f"--format gguf: alignkit writes GGUF for {', '.join(ARCHITECTURES)}, not {hf_arch}; export the "
            "Hugging Face folder and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    return ARCHITECTURES[hf_arch]


def write_gguf(folder: str, path: str, kind: str) -> str:
    """Write the Hugging Face model in `folder` as a GGUF file at `path` (`kind`: f32, f16 or q8_0); return its
    llama.cpp architecture."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    arch = architecture(config)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer logs every setting it writes at INFO
    writer = gguf.GGUFWriter(path, arch.name)
    _write_metadata(writer, config, os.path.basename(path), kind)
    if arch.metadata is not None:
        arch.metadata(writer, config)
    write_tokenizer(writer, folder, config.vocab_size)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.name)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads a tied output layer from token_embd
        if "rotary_emb" in hf_name:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"--format gguf: no GGUF name for tensor {hf_name} of {config.architectures[0]}")
        data, raw = _tensor(_as_stored(tensor, hf_name, arch, config), kind)
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return arch.name


def _as_stored(tensor: torch.Tensor, hf_name: str, arch: GGUFArch, config: Any) -> torch.Tensor:
    """A Hugging Face tensor as llama.cpp stores it."""
    if arch.permute_qk and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
        return _permute(tensor, heads)
    if arch.norm_plus_one and hf_name.endswith("norm.weight"):
        return tensor + 1
    return tensor


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's rotary layout (two halves per head) -> llama.cpp's (interleaved pairs) for q / k rows."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _tensor(tensor: torch.Tensor, kind: str) -> tuple[np.ndarray, Any]:
    """(data, raw dtype or None) of one tensor in the file's type: 1-D tensors (norms, biases) stay f32."""
    import gguf

    data = tensor.detach().float().cpu().numpy()
    if kind == "f32" or data.ndim == 1:
        return data, None
    if kind == "f16":
        return data.astype(np.float16), None
    if data.shape[-1] % 32:  # q8_0 blocks are 32 wide; a row that does not fill them stays f16
        return data.astype(np.float16), None
    q8 = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(data, q8), q8


def _write_metadata(writer: Any, config: Any, name: str, kind: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(_rope_parameters(config, "full_attention").get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[kind]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _rope_parameters(config: Any, layer_type: str) -> dict:
    """The rotary settings (rope_theta, rope_type, factor) of one layer type: transformers keeps them per
    layer type for models that mix attention kinds (Gemma 3), flat for the rest."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type in params:
        params = params[layer_type]
    theta = getattr(config, "rope_theta", None)
    return {**params, "rope_theta": params.get("rope_theta", theta or 10000.0)}
