"""What a stage gives the training loop.

A stage builds what it needs from the config (`build`), makes each optimizer step's micro-batches
(`micro_batches`: by default slices of the epoch's row order, `collate`d), says over how many items its loss
is averaged (`count`), and turns a batch into a summed loss plus metrics (`step`). The loop owns everything
else: devices, accumulation, clipping, schedules, logging, checkpoints, resume.

Batching follows a `Plan`, not a sampler, so that the update is a function of the *global* batch alone:
each global batch takes G = per_device_batch x processes x accumulation rows of the epoch's order, so
batch 1 x accumulation 8 == batch 8 x accumulation 1, 2 processes x batch 2 == 1 process x batch 4, and the
data position after a resume is the global step alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from alignkit.config import BaseConfig
from alignkit.config.coerce import split_sources
from alignkit.data.formats import load_examples
from alignkit.errors import UserError
from alignkit.modeling.chat_templates import require_chat_template, set_chat_template
from alignkit.modeling.load import load_tokenizer
from alignkit.modeling.save import load_weights, save_model

log = logging.getLogger("alignkit")


class Examples(list):
    """Examples already read (and split by `val_size`): `Stage.rows` takes these as well as data set names."""


# A metric is kept as (sum, count) so that micro-batches and processes combine exactly.
Metrics = dict[str, tuple[torch.Tensor, torch.Tensor | float]]


@dataclass
class StepOutput:
    loss_sum: torch.Tensor  # sum of per-item losses in this micro-batch
    metrics: Metrics


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(n))
    gen = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=gen).tolist()


def micro_batches(
    order: list[int], step_in_epoch: int, bs: int, world: int, accum: int, rank: int
) -> list[list[int]]:
    """Row indices of this process's micro-batches for one global batch.

    The global batch is order[k*G:(k+1)*G]; micro-batch j of process p is its slice j*world + p, so a short
    last global batch is dealt over the processes with each row once (some micro-batches shorter). With
    several processes every one of them returns `accum` micro-batches, since DDP needs the same number of
    backward passes everywhere: a micro-batch left without a row is an empty list, which the loop runs as a
    filler at weight 0. A single process just has fewer micro-batches.
    """
    size = bs * world * accum
    rows = order[step_in_epoch * size : (step_in_epoch + 1) * size]
    chunks = [rows[(j * world + rank) * bs : (j * world + rank + 1) * bs] for j in range(accum)]
    return chunks if world > 1 else [c for c in chunks if c]


@dataclass(frozen=True)
class Plan:
    """How optimizer steps map onto the train rows: each global batch of G = bs x world x accum rows of the
    epoch's order serves `updates_per_batch` consecutive steps (1 offline; an online stage's rollout is reused)."""

    world: int
    rank: int
    bs: int
    accum: int
    seed: int
    shuffle: bool
    num_rows: int
    updates_per_batch: int
    max_steps: int  # > 0 overrides num_train_epochs
    num_train_epochs: float

    @property
    def global_batch(self) -> int:
        return self.bs * self.world * self.accum

    @property
    def batches_per_epoch(self) -> int:
        return max(1, math.ceil(self.num_rows / self.global_batch))

    @property
    def steps_per_epoch(self) -> int:
        return self.batches_per_epoch * self.updates_per_batch

    @property
    def total_steps(self) -> int:
        if self.max_steps > 0:
            return self.max_steps
        return max(1, math.ceil(self.num_train_epochs * self.steps_per_epoch))

    def update_index(self, step: int) -> int:
        """Which of its global batch's `updates_per_batch` steps `step` is (0: the first on a fresh batch)."""
        return step % self.updates_per_batch

    def row_chunks(self, step: int) -> tuple[list[list[int]], int]:
        """This process's micro-batches of row indices for `step`'s global batch (see `micro_batches`), and
        the row a filler runs on (the epoch's first)."""
        epoch, k = divmod(step // self.updates_per_batch, self.batches_per_epoch)
        order = epoch_order(self.num_rows, epoch, self.seed, self.shuffle)
        return micro_batches(order, k, self.bs, self.world, self.accum, self.rank), order[0]


@dataclass
class MicroBatch:
    """One forward/backward of a step. Weight 0 marks a filler, run only so that every process makes the same
    number of backward passes: it adds nothing to the loss, the gradient, the item count or the metrics."""

    batch: dict[str, torch.Tensor]
    weight: float = 1.0


@dataclass
class StepContext:
    """What a stage needs from the loop to make a step's micro-batches."""

    plan: Plan
    model: nn.Module  # as prepared by accelerate (DDP-wrapped under several processes)
    device: torch.device
    autocast: Callable[[], AbstractContextManager[Any]]  # the steps' autocast (bf16 / fp16 or none)


class Stage:
    """The contract between a stage and the loop, and the facts about a stage the rest of alignkit reads
    (`name`, `config_class`, `batch_unit`, `online`) instead of branching on its name."""

    name = "base"  # the `stage:` key
    config_class: type[BaseConfig] = BaseConfig  # its keys (alignkit.config.stages)
    batch_unit = "rows"  # what one row of its global batch is (compare's budgets, the console's forms)
    online = False  # samples its own batches (a rollout per global batch of prompts)
    kinds: tuple[str, ...] = ()  # Example kinds this stage trains on

    def __init__(self, cfg: BaseConfig) -> None:
        self.cfg = cfg
        self.model: nn.Module
        self.tokenizer: Any
        self.train_rows: list[dict] = []
        self.eval_rows: list[dict] | None = None

    # -- built by the stage
    def build(self) -> None:
        """Tokenizer, then data (so bad rows fail fast, before a model is loaded), then the model."""

        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code)
        set_chat_template(self.tokenizer, cfg.template, "config")
        train, held = self.split_examples()
        self.train_rows = self.rows(train)
        if held is not None:
            self.eval_rows = self.rows(held)
        self.model = self.load_model()

    def split_examples(self) -> tuple[Examples, Examples | None]:
        """(train, eval) examples: `eval_dataset`, or `val_size` rows held out of `dataset` (seeded)."""
        cfg = self.cfg
        train = self.read_examples(cfg.dataset)
        held = self.read_examples(cfg.eval_dataset) if cfg.eval_dataset else None
        if cfg.val_size:
            n = int(cfg.val_size) if cfg.val_size >= 1 else math.ceil(cfg.val_size * len(train))
            if not 0 < n < len(train):
                raise UserError(
                    f"`val_size: {cfg.val_size}` holds out {n} of {len(train)} rows; leave some for both"
                )
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
            held = Examples(train[i] for i in sorted(order[:n]))
            train = Examples(train[i] for i in sorted(order[n:]))
            log.info("val_size %s: %d rows held out for evaluation, %d train", cfg.val_size, n, len(train))
        return train, held

    def read_examples(self, sources: str | list[str]) -> Examples:
        """Every data set named (paths, hub ids, dataset_info.json names; a comma list), each cut to
        `max_samples`, converted to Examples; conversations need a chat template."""

        cfg = self.cfg
        examples = Examples()
        for name in split_sources(sources):
            found = load_examples(name, cfg.dataset_format, cfg.dataset_split, cfg.dataset_dir, cfg.stage)
            examples += found[: cfg.max_samples] if cfg.max_samples else found
        if any(ex.conversational for ex in examples):
            require_chat_template(self.tokenizer, cfg.model_name_or_path, "config")
        return examples

    def rows(self, sources: str | list[str]) -> list[dict]:
        """Read, convert and tokenise one data source into the rows `collate` takes."""
        raise NotImplementedError

    def load_model(self) -> nn.Module:
        raise NotImplementedError

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def updates_per_batch(self) -> int:
        """Optimizer steps taken on each global batch (see `Plan`)."""
        return 1

    def micro_batches(self, step: int, ctx: StepContext) -> list[MicroBatch]:
        """This process's micro-batches for `step`: its slices of the global batch, collated; a slice left
        empty (a short last batch under several processes) is a filler on the epoch's first row."""
        chunks, filler = ctx.plan.row_chunks(step)
        return [
            MicroBatch(self.collate([self.train_rows[i] for i in chunk or [filler]]), 1.0 if chunk else 0.0)
            for chunk in chunks
        ]

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Number of items the loss is averaged over (tokens for SFT, pairs for a reward model)."""
        raise NotImplementedError

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(sum(v.sum() for k, v in batch.items() if k.endswith("attention_mask")))

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        raise NotImplementedError

    def filler_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        """`step` on a filler: a micro-batch that a process runs at weight 0 only so that every process makes
        the same number of backward passes (a short last batch, a small rollout buffer). The loop discards
        its loss and metrics; a stage that reduces over processes inside `step` (KTO's z0) overrides this to
        keep the filler out of that reduction too."""
        return self.step(model, batch)

    def save(self, model: nn.Module, output_dir: str, merged: bool = False) -> None:
        """Write the (unwrapped) model in Hugging Face format with the tokenizer."""

        save_model(model, self.tokenizer, output_dir, merged=merged)

    def load_weights(self, model: nn.Module, path: str) -> None:
        """Restore the weights `save` wrote (checkpoints)."""

        load_weights(model, path)

    def finalize_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics derived from the reduced ones (e.g. a margin of two means); identity by default."""
        return metrics

    @property
    def resolved(self) -> dict[str, Any]:
        """Values this stage derived at build time for config keys the user left to it (KTO's `auto`
        weights); config.yaml records them, the config itself is never written."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The stage's own training state beyond the weights (e.g. PPO's adaptive KL coefficient), saved in
        each checkpoint's trainer_state.json (JSON values only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned, on resume."""

    # -- shared helpers
    def load_examples(self, sources: str | list[str] | Examples) -> Examples:
        """The Examples of `sources` (already read ones pass through), all of a kind this stage trains on."""
        examples = sources if isinstance(sources, Examples) else self.read_examples(sources)
        wrong = [ex for ex in examples if ex.kind not in self.kinds]
        if wrong:
            raise UserError(
                f"{wrong[0].where}: stage `{self.name}` trains on {' or '.join(self.kinds)} data, but this row is "
                f"{wrong[0].kind} data; check `dataset` or set `dataset_format`"
            )
        return examples

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]
