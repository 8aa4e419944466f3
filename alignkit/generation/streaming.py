"""Answers as they are drawn: each decoding step's tokens (`StepStreamer`, for transformers' generate) and the
text a row adds with each token (`TextStream`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


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
    """Incremental detokenization of one sequence: `push(ids)` returns the text the new ids add. The whole
    sequence is decoded each time (a token's text can depend on its neighbours), and a trailing U+FFFD (a
    multi-byte character cut between tokens) is held back until the next token completes it."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = 0  # characters already returned

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.sent = text[self.sent :], len(text)
        return new
