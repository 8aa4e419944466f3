"""How faithful a written GGUF file is: read back by transformers' GGUF reader (always) and loaded by llama.cpp
(when `llama-cpp-python` is installed), both against the Hugging Face export it was made from."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
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
        lines.append(f"ollama create NAME -f {self.modelfile}")
        return "\n".join(lines)


def check_gguf(result: GGUFExport, hf_dir: str) -> None:
    """Read the GGUF back (transformers' reader) and compare it with the Hugging Face export on the probes; then
    the same in llama.cpp where it is installed."""
    hf, tokenizer = load_causal_lm(hf_dir, "float32")
    back = read_back(result.file, result.architecture, hf.config)
    prompts = probe_prompts(tokenizer, len(PROBES))
    with_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
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
        result.llama_cpp = llama_cpp_check(result.file, tokenizer, prompts, expected, (ids, ours))
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
    """Load the file in llama.cpp: the share of probe prompts it tokenizes as the Hugging Face tokenizer does;
    its largest logit difference from the export's `logits` (ids, logits) on the same ids; its greedy answers
    (from the Hugging Face prompt ids) against the export's `expected`, when given."""
    import numpy as np
    from llama_cpp import Llama

    with contextlib.redirect_stderr(io.StringIO()):  # llama.cpp's load log, handed to Python's stderr
        llm = Llama(model_path=path, n_ctx=512, n_threads=os.cpu_count() or 1, logits_all=True, verbose=False)
    try:
        diff = 0.0
        for row, ours in zip(*logits):
            llm.reset()
            llm.eval(row)
            diff = max(diff, float(np.abs(np.asarray(llm.scores[: len(row)]) - ours.numpy()).max()))
        same, answers, stops = 0, [], _stops(tokenizer)
        for prompt in prompts:
            text = prompt
            if isinstance(prompt, list):
                text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            same += llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids
            if expected is None:
                continue
            answer: list[int] = []
            for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                if token in stops or len(answer) >= QUANT_MAX_NEW_TOKENS:
                    break
                answer.append(token)
            answers.append(answer)
    finally:
        llm.close()
    figures = {"tokens": same / len(prompts), "max_logit_diff": diff}
    if expected is not None:
        exact, tokens = agreement([[t for t in a if t not in stops] for a in expected], answers)
        figures.update(greedy_exact=exact, greedy_tokens=tokens)
    return figures


def _stops(tokenizer: Any) -> set[int]:
    eos = tokenizer.eos_token_id
    return {eos} if eos is not None else set()
