"""How faithful a written GGUF file is: read back by transformers' GGUF reader (always) and loaded by llama.cpp
(when `llama-cpp-python` is installed), both against the Hugging Face export it was made from."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

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
    logit_scale,
    max_diff,
    probe_logits,
    probe_prompts,
)

TOLERANCE = {"f32": FP32_RTOL, "f16": RTOL["fp16"]}
# settings transformers' GGUF reader does not read back for a family (it keeps its config class's defaults):
# taken from the export's config, so that the check compares weights and the settings the reader does read
UNREAD = {
    "llama": ("head_dim",),
    "qwen2": ("head_dim",),
    "qwen3": ("head_dim",),
    "gemma2": ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "layer_types"),
    "gemma3": ("query_pre_attn_scalar", "layer_types", "rope_parameters", "final_logit_softcapping"),
}


@dataclass
class GGUFExport:
    """What `export --format gguf` wrote and how faithful it is."""

    file: str
    modelfile: str
    gguf_type: str
    architecture: str
    source: ExportResult  # the Hugging Face export it was made from (checked against the unmerged model)
    # f32 / f16: against the Hugging Face export, read back by transformers
    max_logit_diff: float | None = None
    tolerance: float | None = None
    greedy_exact: float | None = None  # quantized: share of probes whose greedy answers match the HF export's
    greedy_tokens: float | None = None  # share of greedy tokens that agree
    probes: int = 0
    llama_cpp: dict[str, float] | None = None  # llama.cpp's tokens and greedy answers against the export's
    note: str | None = None  # what llama.cpp's quantizer said
    llama_cpp_error: str | None = None  # why llama.cpp could not run the file, when it could not

    def summary(self) -> str:
        size = os.path.getsize(self.file) / 1e6
        lines = [
            f"wrote {self.file} ({self.gguf_type}, {self.architecture}, {size:.1f} MB) and {self.modelfile}"
        ]
        if self.note:
            lines.append(self.note)
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
        if self.llama_cpp is not None:
            c = self.llama_cpp
            greedy = ""
            if "greedy_exact" in c:
                greedy = f"{c['greedy_exact']:.3f} of greedy answers identical, {c['greedy_tokens']:.3f} of their tokens; "
            lines.append(
                f"llama.cpp loads it: largest logit difference {c['max_logit_diff']:.3g} (logit scale "
                f"{c['logit_scale']:.3g}); {greedy}{c['tokens']:.3f} of probe prompts tokenized as the Hugging Face "
                "tokenizer does"
            )
        if self.llama_cpp_error is not None:
            lines.append(self.llama_cpp_error)
        lines.append(f"ollama create NAME -f {self.modelfile}")
        return "\n".join(lines)


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def check_gguf(result: GGUFExport, hf_dir: str) -> None:
    """Read the GGUF back (transformers' reader) and compare it with the Hugging Face export on the probes; then
    the same in llama.cpp where it is installed."""
    hf, tokenizer = load_causal_lm(hf_dir, "float32")
    back = read_back(result.file, result.architecture, hf.config)
    prompts = probe_prompts(tokenizer, len(PROBES))
    with_llama_cpp = llama_cpp_installed()
    ids = encode_prompts(tokenizer, probe_prompts(tokenizer, LOGIT_PROBES))
    # the export's logits on the probes: for the f32 / f16 check and for llama.cpp's, only when one runs
    ours = probe_logits(hf, ids) if result.gguf_type in TOLERANCE or with_llama_cpp else []
    args = {"max_new_tokens": QUANT_MAX_NEW_TOKENS, "temperature": 0.0}
    expected = None  # greedy answers: compared for the quantized types only (f32 / f16 compare logits)
    if result.gguf_type in TOLERANCE:
        result.max_logit_diff = max_diff(ours, probe_logits(back, ids))
        result.tolerance = TOLERANCE[result.gguf_type] * logit_scale(ours)
        if not result.max_logit_diff <= result.tolerance:
            raise UserError(
                f"{result.file} is not faithful: read back, its logits differ from the Hugging Face export's by "
                f"{result.max_logit_diff:.3g} > {result.tolerance:.3g}; the file is left for inspection"
            )
    else:
        expected = complete(hf, tokenizer, prompts, **args).completion_ids
        theirs = complete(back, tokenizer, prompts, **args).completion_ids
        result.greedy_exact, result.greedy_tokens = agreement(expected, theirs)
        result.probes = len(prompts)
    if with_llama_cpp:
        try:
            result.llama_cpp = llama_cpp_check(result.file, tokenizer, prompts, expected, (ids, ours))
        except LlamaCppFailed as e:
            result.llama_cpp_error = f"{e}; the file is written and transformers' reader checked it"
            return
        result.llama_cpp["logit_scale"] = logit_scale(ours)


def read_back(path: str, arch: str, config: Any) -> torch.nn.Module:
    """The GGUF file as transformers' GGUF reader gives it, with the settings it does not read from the
    export's config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory, name = os.path.split(path)
    read = AutoConfig.from_pretrained(directory, gguf_file=name)
    for key in UNREAD.get(arch, ()):
        if hasattr(config, key):
            setattr(read, key, getattr(config, key))
    return AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, config=read, dtype=torch.float32
    ).eval()


def llama_cpp_check(
    path: str, tokenizer: Any, prompts: list[Any], expected: list[list[int]] | None, logits: tuple[list, list]
) -> dict[str, float]:
    """Load the file in llama.cpp, in a child process (`llama_cpp_run`): the share of probe prompts it tokenizes
    as the Hugging Face tokenizer does; its largest logit difference from the export's `logits` (ids, logits)
    on the same ids; its greedy answers (from the Hugging Face prompt ids) against the export's `expected`, when
    given. Raises `LlamaCppFailed` when the child dies or fails."""
    import numpy as np

    texts = [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        if isinstance(p, list)
        else p
        for p in prompts
    ]
    stops = _stops(tokenizer)
    with tempfile.TemporaryDirectory(prefix="alignkit-llama-cpp-") as tmp:
        arrays = os.path.join(tmp, "logits.npz")
        np.savez(arrays, **{f"row{i}": row.float().numpy() for i, row in enumerate(logits[1])})
        request = {
            "path": path,
            "logits": arrays,
            "logit_ids": [list(map(int, row)) for row in logits[0]],
            "texts": texts,
            "ids": [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts],
            "greedy": expected is not None,
            "stops": sorted(stops),
            "max_new_tokens": QUANT_MAX_NEW_TOKENS,
            "out": os.path.join(tmp, "figures.json"),
        }
        request_file = os.path.join(tmp, "request.json")
        with open(request_file, "w", encoding="utf-8") as f:
            json.dump(request, f)
        proc = subprocess.run([*child_command(), request_file], capture_output=True, text=True)
        if proc.returncode != 0:
            raise LlamaCppFailed(_failure(proc))
        with open(request["out"], encoding="utf-8") as f:
            out = json.load(f)
    figures = {"tokens": sum(out["same_tokens"]) / len(prompts), "max_logit_diff": out["max_logit_diff"]}
    if expected is not None:
        exact, tokens = agreement([[t for t in a if t not in stops] for a in expected], out["answers"])
        figures.update(greedy_exact=exact, greedy_tokens=tokens)
    return figures


class LlamaCppFailed(Exception):
    """llama.cpp could not run the file: the export stands (transformers' reader checked it); the message says
    what happened."""


def child_command() -> list[str]:
    return [sys.executable, "-m", "alignkit.ship.export.llama_cpp_run"]


def _failure(proc: subprocess.CompletedProcess) -> str:
    if proc.returncode < 0:
        try:
            how = f"died of {signal.Signals(-proc.returncode).name}"
        except ValueError:
            how = f"died of signal {-proc.returncode}"
    else:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        how = f"failed ({lines[-1] if lines else f'exit {proc.returncode}'})"
    hint = ""
    if "AMX_INT8 = 1" in proc.stderr:
        hint = (
            "; this llama.cpp was built with AMX kernels, which are known to crash on some Xeons "
            "(ggml-org/llama.cpp#20824): a build without them is "
            'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" '
            "pip install --force-reinstall --no-cache-dir llama-cpp-python"
        )
    return f"llama.cpp could not run the file: it {how}{hint}"


def _stops(tokenizer: Any) -> set[int]:
    eos = tokenizer.eos_token_id
    return {eos} if eos is not None else set()
