"""Continuous batching over a transformers model: rows join a running batch at the next token and leave it the
moment they end, each keeping its KV cache.

The batch is one left-padded cache (`kv_cache.GrowingCache`: each step writes into room kept at the end of its
buffers instead of copying the whole cache). A joining group of prompts is prefilled together (left-padded to
its longest), its cache padded on the left to the batch's length and stacked under the running rows'; a row
that ends is dropped from the cache, and the columns no row uses any more are cut. Each step feeds every row
its last drawn token at its own position (padding never shifts a row's positions), so a row's logits are those
of the row run alone, to float rounding. Rows sample with their own settings (temperature, top_p, a seed of
their own), and under peft each row runs its own LoRA adapter in the same forward (peft's `adapter_names`).

This is the concatenate-and-filter scheme of TGI's first router, on transformers' cache classes; vLLM
(`--backend vllm`, GPU) pages the cache instead and copies nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from alignkit.generation.rollout import warpers

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


@dataclass(frozen=True)
class Sampling:
    """How one row draws its tokens: temperature 0 is greedy; `seed` gives the row a generator of its own, so
    its draws do not depend on the rows beside it; `adapter` is a peft adapter name (None: as the model is)."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    adapter: str | None = None


def supports(model: nn.Module) -> str | None:
    """Why `model` cannot be batched continuously (None: it can): the cache is cut and stacked by position, so
    every layer must keep a plain full-length cache (no sliding window, no recurrent state)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return "its attention has a sliding window"
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    if kinds - {"full_attention"}:
        return f"its layers are {', '.join(sorted(kinds))}"
    return None


class ContinuousBatch:
    """The rows in flight. `add` prefills new rows and draws their first token, `step` draws the next token of
    every row, `keep` drops the rows that ended. Both return the tokens (in row order) and the raw logits they
    were drawn from (log-probs are read from those). Not thread-safe: one worker thread drives it."""

    def __init__(self, model: nn.Module, pad_id: int) -> None:
        self.model, self.pad_id = model, pad_id
        self.device = next(model.parameters()).device
        self.settings: list[Sampling] = []
        self.generators: list[torch.Generator | None] = []
        self.cache = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # (B, L): 1 = a real token
        self.pending = torch.zeros(0, dtype=torch.long, device=self.device)  # (B,): drawn, not yet fed

    def __len__(self) -> int:
        return len(self.settings)

    @torch.no_grad()
    def add(self, prompts: list[list[int]], settings: list[Sampling]) -> tuple[list[int], torch.Tensor]:
        """Prefill `prompts` as new rows at the end of the batch; their first tokens and (n, V) logits."""
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=growing_cache(),
            use_cache=True,
            **self._adapters(settings),
        )
        logits = out.logits[:, -1].float()
        generators = [_generator(s.seed, self.device) for s in settings]
        tokens = sample(logits, settings, generators)
        self._stack(out.past_key_values, mask)
        self.settings += settings
        self.generators += generators
        self.pending = torch.cat([self.pending, tokens])
        return tokens.tolist(), logits

    @torch.no_grad()
    def step(self) -> tuple[list[int], torch.Tensor]:
        """Feed every row its pending token; the next token of each and the (B, V) logits."""
        positions = self.mask.sum(-1, keepdim=True)  # the fed token's position: after the row's real tokens
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        out = self.model(
            input_ids=self.pending[:, None],
            attention_mask=self.mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            **self._adapters(self.settings),
        )
        self.cache = out.past_key_values
        logits = out.logits[:, -1].float()
        self.pending = sample(logits, self.settings, self.generators)
        return self.pending.tolist(), logits

    def keep(self, alive: list[bool]) -> None:
        """Drop the rows whose flag is False (and every cache column no kept row uses any more)."""
        if all(alive):
            return
        index = torch.tensor([i for i, a in enumerate(alive) if a], dtype=torch.long, device=self.device)
        self.settings = [s for s, a in zip(self.settings, alive) if a]
        self.generators = [g for g, a in zip(self.generators, alive) if a]
        self.pending = self.pending[index]
        mask = self.mask[index]
        used = mask.any(0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1]
        self.mask = mask[:, start:]
        if not len(index):
            self.cache = None
            return
        for layer in self.cache.layers:
            layer.select(index, start)

    def _stack(self, cache: object, mask: torch.Tensor) -> None:
        """The new rows' cache (and mask) under the running rows', both left-padded to the longer length."""
        if self.cache is None or not len(self):
            self.cache, self.mask = cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        old, new = width - self.mask.shape[1], width - mask.shape[1]
        for layer, (k, v) in zip(self.cache.layers, _layers(cache)):
            layer.stack(k, v, old, new)
        self.mask = torch.cat([_left_pad(self.mask, old, dim=1), _left_pad(mask, new, dim=1)])

    def _adapters(self, settings: list[Sampling]) -> dict:
        """Under peft, each row's adapter (peft runs each adapter's rows through its own LoRA weights)."""
        if not hasattr(self.model, "peft_config"):
            return {}
        return {"adapter_names": [s.adapter or BASE for s in settings]}


def sample(
    logits: torch.Tensor, settings: list[Sampling], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """(B,) tokens: greedy rows take the argmax; the others go through transformers' warpers in groups of
    equal settings and draw by the inverse CDF: one uniform number per row (from the row's own generator
    where it has one) against the cumulative probabilities. On a CPU this is ~40x cheaper than `multinomial`
    or an exponential race at a 152k vocabulary, which draw a random number per vocabulary entry."""
    tokens = logits.argmax(-1)
    groups: dict[tuple[float, float], list[int]] = {}
    for i, s in enumerate(settings):
        if s.temperature > 0:
            groups.setdefault((s.temperature, s.top_p), []).append(i)
    for (temperature, top_p), rows in groups.items():
        index = torch.tensor(rows, device=logits.device)
        probs = torch.softmax(warpers(temperature, top_p, 0)(None, logits[index]), dim=-1)
        # a GPU's float32 scan can give a filtered-out token a sliver: it sums in float64 (a CPU's sums in double)
        cdf = probs.cumsum(-1, dtype=torch.float64) if probs.is_cuda else probs.cumsum_(-1)
        u = torch.rand(len(rows), 1, device=logits.device, dtype=cdf.dtype)
        for j, row in enumerate(rows):
            if generators[row] is not None:
                u[j] = torch.rand(1, generator=generators[row], device=logits.device, dtype=cdf.dtype)
        drawn = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
        tokens[index] = torch.where(drawn < cdf.shape[-1], drawn, tokens[index])  # u * total rounded up
    return tokens


def growing_cache() -> object:
    """An empty cache whose layers grow in place (`generation.kv_cache`; imports transformers)."""
    from alignkit.generation.kv_cache import GrowingCache

    return GrowingCache()


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def _left_pad(t: torch.Tensor, n: int, dim: int = 2) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _layers(cache: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]
