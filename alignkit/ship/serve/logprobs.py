"""Token log-probabilities in OpenAI's two shapes: `logprobs: k` of /v1/completions and `logprobs: true,
top_logprobs: k` of /v1/chat/completions.

They are the model's own: the log-softmax of its logits at each step, before temperature and top_p (what
OpenAI returns, and vLLM's default `raw_logprobs`), so they do not move with the sampling settings; at
temperature 0 the drawn token is the first of the top ones. `StepLogprobs` reads them while the answer is
drawn, as the first logits processor of the pass, and only in a pass where some request asked for them.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

import torch

FLOOR = -9999.0  # stands for -inf (a token the model rules out), which JSON cannot carry; as vLLM does
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


@dataclass
class Step:
    """One drawn token: its id, log-prob, where its text starts in the answer, and the most likely tokens."""

    token: int
    logprob: float
    offset: int
    top: list[tuple[int, float]] = field(default_factory=list)


class StepLogprobs:
    """A logits processor, first in the chain, that keeps the step's log-softmax over the model's own logits;
    `take(tokens)`, called once the step's tokens are drawn, gives each row's (log-prob of its token, the `k`
    most likely (id, log-prob) in order)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.latest: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.latest = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def take(self, tokens: list[int]) -> list[tuple[float, list[tuple[int, float]]]]:
        lp = self.latest
        if lp is None:
            raise RuntimeError("StepLogprobs.take before any step was scored")
        index = torch.tensor(tokens, device=lp.device)[:, None]
        chosen = lp.gather(1, index).squeeze(1).tolist()
        if not self.k:
            return [(c, []) for c in chosen]
        values, ids = lp.topk(min(self.k, lp.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        return list(zip(chosen, tops))


class TokenNames:
    """Each token id's text (decoded alone, special tokens shown) and its exact UTF-8 bytes. A token that holds
    part of a character decodes alone to U+FFFD: it is named by its bytes, `bytes:\\xe2\\x80`, as OpenAI
    names it, so that two such tokens stay apart among the top ones."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        if token not in self.cache:
            text = self.tokenizer.decode([token], skip_special_tokens=False)
            raw = self._bytes(token) if "\ufffd" in text else None
            if raw is not None:
                text = "bytes:" + "".join(chr(b) if 32 <= b < 127 and b != 92 else f"\\x{b:02x}" for b in raw)
            self.cache[token] = (text, list(raw if raw is not None else text.encode("utf-8")))
        return self.cache[token]

    def _bytes(self, token: int) -> bytes | None:
        """The bytes of a token that is part of a character: byte-level BPE (GPT-2, Llama 3, Qwen) spells
        bytes as printable characters; SentencePiece has `<0xE2>` tokens. None: neither."""
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if not isinstance(piece, str):
            return None
        match = _BYTE_TOKEN.fullmatch(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        decoder = _unicode_to_byte()
        if all(ch in decoder for ch in piece):
            return bytes(decoder[ch] for ch in piece)
        return None


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-printable-character map, which byte-level BPE vocabularies use: printable
    bytes stand for themselves, the others for the characters from U+0100 on, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    rest = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(rest)}


def _finite(logprob: float) -> float:
    return max(logprob, FLOOR)


def completion_logprobs(steps: list[Step], k: int, text: str, names: TokenNames) -> dict[str, Any]:
    """/v1/completions' `logprobs`: per token its text, log-prob, the `k` most likely tokens as {text: log-prob}
    in order, with the drawn token added when it is not among them (OpenAI: "up to logprobs+1 elements"), and
    the character offset where it starts in the choice's `text`."""
    tops = []
    for step in steps:
        top: dict[str, float] = {}
        for token, logprob in step.top[:k]:
            top.setdefault(names(token)[0], _finite(logprob))  # two ids with one text: the likelier one
        top.setdefault(names(step.token)[0], _finite(step.logprob))
        tops.append(top)
    return {
        "tokens": [names(s.token)[0] for s in steps],
        "token_logprobs": [_finite(s.logprob) for s in steps],
        "top_logprobs": tops,
        "text_offset": [min(s.offset, len(text)) for s in steps],
    }


def chat_logprobs(steps: list[Step], k: int, names: TokenNames) -> dict[str, Any]:
    """/v1/chat/completions' `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: k of them}]}."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text, raw = names(token)
        return {"token": text, "logprob": _finite(logprob), "bytes": raw}

    return {
        "content": [
            {**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top[:k]]}
            for s in steps
        ]
    }
