"""A transformers cache whose layers grow in place, for the continuous batch (`generation.continuous`).

transformers' `DynamicLayer` concatenates each step's keys and values to the cache, which copies the whole
cache at every token: on the tiny model at 16 rows that was a quarter of a decoding step, and it grows with the
answers' length. A `GrowingLayer` keeps its keys and values in buffers with room at the end (`ROOM` columns),
writes each step's token into that room, and copies only when the room runs out. The continuous batch cuts rows
out (`select`) and stacks joining rows under the running ones (`stack`) through it, keeping the room.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

ROOM = 64  # columns left free at the end of a layer's buffers whenever they are made


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` over (B, H, capacity, D) buffers, `n` columns of them used; `keys` and `values` are
    views of the used columns (setting them, as transformers' own methods do, replaces the buffers)."""

    def __init__(self) -> None:
        self._k = self._v = None
        self.n = 0
        super().__init__()

    @property
    def keys(self) -> torch.Tensor | None:
        return self._k if self._k is None or self._k.dim() < 4 else self._k[:, :, : self.n]

    @keys.setter
    def keys(self, t: torch.Tensor | None) -> None:
        self._k, self.n = t, 0 if t is None or t.dim() < 4 else t.shape[-2]

    @property
    def values(self) -> torch.Tensor | None:
        return self._v if self._v is None or self._v.dim() < 4 else self._v[:, :, : self.n]

    @values.setter
    def values(self, t: torch.Tensor | None) -> None:
        self._v = t

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.n + key_states.shape[-2]
        if self.n == 0 or end > self._k.shape[-2]:
            self._k, self._v = _with_room(self.keys, key_states), _with_room(self.values, value_states)
        else:
            self._k[:, :, self.n : end] = key_states
            self._v[:, :, self.n : end] = value_states
        self.n = end
        return self.keys, self.values

    def select(self, rows: torch.Tensor, start: int) -> None:
        """Keep `rows` (indices) and the columns from `start` on; the room stays."""
        self._k, self._v = self._k[rows, :, start:], self._v[rows, :, start:]
        self.n -= start

    def stack(self, keys: torch.Tensor, values: torch.Tensor, pad: int, pad_new: int) -> None:
        """Rows joining under these: the running rows left-padded by `pad` columns and the new ones by
        `pad_new`, so that both end at the same column (padding is zeros, masked by the caller)."""
        width = self.n + pad
        self._k = _stacked(self.keys, keys, pad, pad_new, width)
        self._v = _stacked(self.values, values, pad, pad_new, width)
        self.n = width


class GrowingCache(DynamicCache):
    """A `DynamicCache` of `GrowingLayer`s, made as the model's layers first write to it."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)


def _with_room(used: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """A buffer holding `used` (None or empty: nothing) then `new`, with `ROOM` free columns after them."""
    old = 0 if used is None or used.dim() < 4 else used.shape[-2]
    b, h, n, d = new.shape
    out = new.new_empty(b, h, old + n + ROOM, d)
    if old:
        out[:, :, :old] = used
    out[:, :, old : old + n] = new
    return out


def _stacked(old: torch.Tensor, new: torch.Tensor, pad: int, pad_new: int, width: int) -> torch.Tensor:
    b, h, _, d = old.shape
    out = old.new_zeros(b + new.shape[0], h, width + ROOM, d)
    out[:b, :, pad:width] = old
    out[b:, :, pad_new:width] = new
    return out
