"""Answers as they are drawn: each decoding step's tokens (`StepStreamer`, for transformers' generate) and the
text a row adds with each token (`TextStream`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tokenizers.decoders import DecodeStream


class StepStreamer:
    """A transformers streamer that hands `on_step` the token drawn for every row at each decoding step (a list,
    one id per row; a finished row gets the pad token). `generate` first puts the prompt, which is skipped."""

    def __init__(self, on_step: Callable[[list[int]], None]) -> None:
        self.on_step = on_step
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.on_step(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class TextStream:
    """Incremental detokenization of one sequence: `push(ids)` returns the text the new ids add, and a character
    cut between tokens (a trailing U+FFFD) is held back until the next token completes it. A fast tokenizer
    without `clean_up_tokenization_spaces` is read through its own `tokenizers.decoders.DecodeStream` (a few
    tokens of context per step); any other is decoded whole each time (a token's text can depend on its
    neighbours), which costs a decode of the whole answer per token."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = 0  # characters already returned
        exact = _decodes_in_backend(tokenizer)
        self._backend = tokenizer.backend_tokenizer if exact else None
        self._stream = DecodeStream(skip_special_tokens=True) if exact else None

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        if self._stream is not None:
            try:
                new = "".join(t for i in ids if (t := self._stream.step(self._backend, i)) is not None)
                self.sent += len(new)
                return new
            except Exception:
                # a decoder that rewrites earlier text ("Invalid prefix"): decode whole from now on
                self._stream = None
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.sent = text[self.sent :], len(text)
        return new


def _decodes_in_backend(tokenizer: Any) -> bool:
    """Whether `decode` is the Rust backend's decode alone: a fast tokenizer that neither cleans up spaces
    after it nor overrides the decoding in Python (its incremental decoder then gives the same text)."""
    from transformers import PreTrainedTokenizerFast

    if getattr(tokenizer, "backend_tokenizer", None) is None or not isinstance(
        tokenizer, PreTrainedTokenizerFast
    ):
        return False
    own = all(
        getattr(type(tokenizer), m) is getattr(PreTrainedTokenizerFast, m) for m in ("decode", "_decode")
    )
    return own and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
