"""The tokenizer half of a GGUF file, and the Ollama Modelfile beside it.

Two kinds of Hugging Face tokenizer are written, both from the folder's `tokenizer.json` (the one file every
fast tokenizer saves; `tokenizer.model` is often gone after a fine-tune):

- byte-level BPE (Llama 3, Qwen, SmolLM, the tiny model) as llama.cpp's `gpt2` model: tokens, types, merges,
  and `tokenizer.ggml.pre`, the name of the rule llama.cpp splits text with before BPE. The name is read off
  the tokenizer's own pre-tokenizer: GPT-2's rule (`gpt-2`), digits one by one then GPT-2's (`smollm`), or a
  split pattern that transformers' GGUF reader knows by name (`llama3`, `qwen2`, `tekken`, ...). An unknown
  pattern is written as `default` with a warning: llama.cpp then splits text its own way.
- sentencepiece-style BPE with byte fallback (Llama 2, Mistral, Gemma) as llama.cpp's `llama` model: tokens,
  scores, types (`<0xNN>` byte pieces as BYTE) and whether a space is put in front of the text. A piece's
  score is minus the rank of the merge that makes it, so llama.cpp's highest-score-first merging replays the
  BPE merges in their order.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

from alignkit.errors import UserError

log = logging.getLogger("alignkit")
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def write_tokenizer(writer: Any, folder: str, vocab_size: int) -> str:
    """Write the folder's tokenizer into `writer`; return llama.cpp's model name for it (`gpt2` / `llama`)."""
    import gguf

    path = os.path.join(folder, "tokenizer.json")
    spec = _read_json(path) if os.path.isfile(path) else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(
            f"--format gguf: alignkit writes BPE tokenizers from tokenizer.json (byte-level, or sentencepiece-style "
            f"with byte fallback); {folder} has {model.get('type') or 'no tokenizer.json'}"
        )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    kind = "llama" if model.get("byte_fallback") else "gpt2"
    tokens, types = _tokens(tok, vocab_size, sentencepiece=kind == "llama")
    writer.add_tokenizer_model(kind)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if kind == "llama":
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(_scores(tokens, model.get("merges", [])))
        writer.add_add_space_prefix(_space_prefix(spec))
    else:
        writer.add_tokenizer_pre(pre_tokenizer_name(spec))
    gguf.SpecialVocab(folder, load_merges=kind == "gpt2", n_vocab=vocab_size).add_to_gguf(writer)
    return kind


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _tokens(tok: Any, vocab_size: int, sentencepiece: bool) -> tuple[list[str], list[int]]:
    """Every id's token text and llama.cpp token type; ids past the tokenizer are padding."""
    import gguf

    special, added = set(tok.all_special_ids), set(tok.added_tokens_decoder)
    unk = tok.unk_token_id
    tokens, types = [], []
    for i in range(vocab_size):
        if i >= len(tok):
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        text = tok.convert_ids_to_tokens(i)
        tokens.append(text)
        if i == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in special:
            types.append(gguf.TokenType.CONTROL)
        elif i in added:
            types.append(gguf.TokenType.USER_DEFINED)
        elif sentencepiece and _BYTE_PIECE.match(text):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _scores(tokens: list[str], merges: list) -> list[float]:
    """Minus the rank of the merge that makes each piece (the first merge is best); pieces no merge makes
    (characters, bytes, special tokens) score 0: they are where merging starts, never a merge's result."""
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    return [-float(rank[t] + 1) if t in rank else 0.0 for t in tokens]


def _space_prefix(spec: dict) -> bool:
    """Whether the tokenizer puts '▁' in front of the text (Llama 2, Mistral) or not (Gemma)."""
    parts = _flatten(spec.get("normalizer")) + _flatten(spec.get("pre_tokenizer"))
    for part in parts:
        if part.get("type") == "Prepend" and part.get("prepend") == "▁":
            return True
        if part.get("type") == "Metaspace":
            return part.get("prepend_scheme", "always") != "never" and part.get("add_prefix_space", True)
    return False


def _flatten(part: dict | None) -> list[dict]:
    if not part:
        return []
    if part.get("type") == "Sequence":
        inner = part.get("normalizers") or part.get("pretokenizers") or []
        return [p for child in inner for p in _flatten(child)]
    return [part]


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for how a byte-level tokenizer splits text before BPE (`tokenizer.ggml.pre`)."""
    parts = _flatten(spec.get("pre_tokenizer"))
    shape = [(p.get("type"), p.get("use_regex", p.get("individual_digits"))) for p in parts]
    if shape == [("ByteLevel", True)]:
        return "gpt-2"
    if shape == [("Digits", True), ("ByteLevel", True)]:
        return "smollm"
    if len(parts) == 2 and shape[0][0] == "Split" and shape[1] == ("ByteLevel", False):
        pattern = parts[0].get("pattern", {}).get("Regex")
        for name, known in _known_splits().items():
            if pattern == known:
                return name
    log.warning(
        "--format gguf: this tokenizer's pre-tokenizer is not one llama.cpp knows by name; the file says "
        "`default`, and llama.cpp may split text differently from the Hugging Face tokenizer"
    )
    return "default"


def _known_splits() -> dict[str, str]:
    """Split patterns by their llama.cpp name, as transformers' GGUF reader maps them (empty if it moved)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        return {}
    return dict(GGUF_PRE_TOKENIZER_SPLITS)


# --- Ollama -------------------------------------------------------------------------------------------------

# chat formats Ollama's Go templates can say, by a marker found in the Jinja chat template
OLLAMA_TEMPLATES = {
    "<|im_start|>": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        ("<|im_end|>",),
    ),
    "<start_of_turn>": (
        '{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
        "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
        ("<end_of_turn>",),
    ),
    "<|start_header_id|>": (
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|eot_id|>",),
    ),
}


def write_modelfile(folder: str, gguf_path: str) -> str:
    """An Ollama Modelfile beside the GGUF: FROM the file, the chat format as an Ollama (Go) template for the
    formats in OLLAMA_TEMPLATES (ChatML, Gemma's turns, Llama 3's headers), and every end-of-turn token as a
    stop. For another format Ollama uses the template the GGUF file carries (`tokenizer.chat_template`)."""
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(folder)
    lines = [f"FROM ./{os.path.basename(gguf_path)}"]
    stops = {tok.eos_token} if tok.eos_token else set()
    template = tok.chat_template or ""
    for marker, (go_template, ends) in OLLAMA_TEMPLATES.items():
        if marker in template:
            lines.append(f'TEMPLATE """{go_template}"""')
            stops.update(ends)
            break
    try:
        eos = GenerationConfig.from_pretrained(folder).eos_token_id
    except OSError:
        eos = None
    for i in [eos] if isinstance(eos, int) else eos or []:
        stops.add(tok.convert_ids_to_tokens(i))
    lines += [f'PARAMETER stop "{s}"' for s in sorted(stops)]
    path = os.path.join(os.path.dirname(gguf_path), "Modelfile")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path
