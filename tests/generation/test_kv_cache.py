"""The continuous batch's cache (`generation.kv_cache`): a layer that grows in place holds exactly what
transformers' concatenating `DynamicLayer` would, through steps, rows leaving and rows joining, and a step
inside its room writes in place instead of copying the cache."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from alignkit.generation.kv_cache import GrowingCache, GrowingLayer


def _kv(b: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, n, 4, generator=g), torch.randn(b, 2, n, 4, generator=g)


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3]), t], dim=2)


@pytest.mark.parametrize("room", [64, 3])
def test_a_growing_layer_holds_what_concatenation_would(room: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("alignkit.generation.kv_cache.ROOM", room)
    layer, plain = GrowingLayer(), DynamicLayer()
    for step in range(70):  # a 5-token prefill, then one token a step: past the room when it is 3 (or 64)
        k, v = _kv(3, 5 if step == 0 else 1, step)
        got, want = layer.update(k, v), plain.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    rows = torch.tensor([0, 2])
    layer.select(rows, 4)  # row 1 leaves; the first 4 columns are no row's any more
    plain.keys, plain.values = plain.keys[rows, :, 4:], plain.values[rows, :, 4:]
    k_new, v_new = _kv(2, 10, 99)  # two rows join: 10 columns against the batch's 70
    layer.stack(k_new, v_new, 0, layer.n - 10)
    plain.keys = torch.cat([plain.keys, _left_pad(k_new, plain.keys.shape[2] - 10)])
    plain.values = torch.cat([plain.values, _left_pad(v_new, plain.values.shape[2] - 10)])
    for step in range(5):
        k, v = _kv(4, 1, 200 + step)
        got, want = layer.update(k, v), plain.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert layer.get_seq_length() == plain.get_seq_length() == 75  # 5 + 69 steps - 4 cut + 5


def test_a_step_inside_the_room_writes_in_place() -> None:
    cache = GrowingCache()
    cache.update(*_kv(2, 6, 0), layer_idx=0)
    buffer = cache.layers[0]._k.data_ptr()
    for step in range(10):
        cache.update(*_kv(2, 1, step + 1), layer_idx=0)
    assert cache.layers[0]._k.data_ptr() == buffer and cache.get_seq_length(0) == 16  # no copy of the cache
