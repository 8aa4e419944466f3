"""KTO: unpaired desirable / undesirable labels, loss-averse weighting, the KL reference point z0.

`prefix_sharing` runs each row's KL completion in its prompt's pass (prompt + completion + KL completion, see
`alignkit.data.shared_prefix`); `padding_free` the micro-batch as one row. Same numbers as the plain layout.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from alignkit.config import KTOConfig
from alignkit.data.batches import build_unpaired_rows, collate_unpaired
from alignkit.data.formats import Example
from alignkit.data.shared_prefix import check_layout_support, collate_shared_unpaired, model_mask
from alignkit.errors import UserError
from alignkit.losses.tokens import per_row_sum
from alignkit.losses.unpaired import KTO_LOSSES, KTO_RATIO_RANGE, kto_weights
from alignkit.modeling.load import load_policy
from alignkit.modeling.logprobs import TokenStats, completion_token_stats, head_stats, hidden_states
from alignkit.modeling.reference import Reference, precompute_splits
from alignkit.stages.base import Metrics, Stage, StepOutput

log = logging.getLogger("alignkit")


def _logps(model: nn.Module, batch: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    stats = completion_token_stats(
        model,
        batch[f"{prefix}input_ids"],
        batch[f"{prefix}attention_mask"],
        batch[f"{prefix}completion_mask"],
    )
    return per_row_sum(stats.logps, stats.rows, batch[f"{prefix}input_ids"].shape[0])


def _shared_stats(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[TokenStats, torch.Tensor | None]:
    """A shared-prefix / padding-free batch in one pass: the main rows' stats (differentiable) and, when the
    batch holds KL completions (logical rows B..2B-1), their summed log-probs, computed without a graph."""
    n = batch["label"].shape[0]
    hidden = hidden_states(
        model, batch["input_ids"], model_mask(model, batch), position_ids=batch["position_ids"]
    ).flatten(0, 1)
    main = batch["label_rows"] < n
    at, labels, rows = batch["predict_at"], batch["labels"], batch["label_rows"]
    stats = head_stats(model, hidden[at[main]], labels[main], rows[main])
    if int(batch["logical_rows"]) == n:
        return stats, None
    with torch.no_grad():
        kl = head_stats(model, hidden.detach()[at[~main]], labels[~main], rows[~main] - n)
    return stats, per_row_sum(kl.logps, kl.rows, n)


def reference_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "predict_at" in batch:
        stats, kl = _shared_stats(model, batch)
        logps = per_row_sum(stats.logps, stats.rows, batch["label"].shape[0])
        return {"ref_logps": logps} if kl is None else {"ref_logps": logps, "ref_kl_logps": kl}
    return {"ref_logps": _logps(model, batch), "ref_kl_logps": _logps(model, batch, "kl_")}


def unpair(examples: list[Example]) -> list[Example]:
    """Pairs become two rows each, chosen desirable and rejected undesirable, kept next to each other."""
    out = []
    for ex in examples:
        if ex.kind == "pair":
            out += [
                replace(ex, completion=ex.chosen, chosen=None, rejected=None, label=True),
                replace(ex, completion=ex.rejected, chosen=None, rejected=None, label=False),
            ]
        else:
            out.append(ex)
    return out


def _mean_over_processes(value: torch.Tensor, real: bool = True) -> torch.Tensor:
    """z0 is averaged over processes (the mean of per-process means, as TRL), leaving out a process whose
    micro-batch is a filler (`real=False`, weight 0 in the loop)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        pair = torch.stack([value * real, torch.tensor(float(real), device=value.device, dtype=value.dtype)])
        dist.all_reduce(pair)
        value = pair[0] / pair[1].clamp(min=1)
    return value


class KTOStage(Stage):
    name = "kto"
    config_class = KTOConfig
    batch_unit = "unpaired rows (a pair gives two)"
    kinds = ("unpaired", "pair")

    @property
    def spec(self):  # noqa: ANN201
        return KTO_LOSSES[self.cfg.loss_type]

    def load_model(self) -> nn.Module:
        return load_policy(self.cfg)

    def build(self) -> None:
        super().build()
        check_layout_support(self.cfg, self.model)
        self._resolve_weights()
        self.reference = Reference(self.cfg, self.model)
        if self.cfg.precompute_ref_log_probs:
            # the cache is keyed on the tokens, not the loss: it always holds the KL log-probs too
            self._collate_kl = True
            precompute_splits(self, reference_logps, ("prompt_ids", "completion_ids", "kl_completion_ids"))
            self._collate_kl = False

    def rows(self, sources: str | list[str]) -> list[dict]:
        cfg = self.cfg
        examples = unpair(self.load_examples(sources))
        rows, stats = build_unpaired_rows(
            examples, self.tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.per_device_train_batch_size
        )
        log.info("%s", stats.message().replace("no completion token left", "prompt fills max_length"))
        return rows

    def _resolve_weights(self) -> None:
        cfg = self.cfg
        n_d = sum(r["label"] for r in self.train_rows)
        n_u = len(self.train_rows) - n_d
        if (n_d == 0 or n_u == 0) and not cfg.allow_single_label:
            which = "desirable" if n_u == 0 else "undesirable"
            raise UserError(
                f"every training row is {which} ({len(self.train_rows)} rows): KTO learns from the "
                "contrast of both labels; add rows of the other label, or set `allow_single_label: true`"
            )
        auto_d, auto_u, why = kto_weights(n_d, n_u) if cfg.auto_weights else (1.0, 1.0, "")
        self.weights: tuple[float, float] = cfg.resolved_weights(auto_d, auto_u)  # cfg keeps `auto`
        if cfg.auto_weights:
            log.info(
                "KTO weights: desirable_weight=%s undesirable_weight=%s (%d desirable, %d undesirable; %s)",
                *self.weights,
                n_d,
                n_u,
                why,
            )
        if n_d and n_u:
            ratio = self.weights[0] * n_d / (self.weights[1] * n_u)
            lo, hi = KTO_RATIO_RANGE
            if not lo - 1e-3 <= ratio <= hi + 1e-3:  # weights are rounded to 4 decimals
                w_d, w_u, _ = kto_weights(n_d, n_u)
                log.warning(
                    "KTO: desirable_weight*n_D / (undesirable_weight*n_U) = %.3f is outside the paper's "
                    "recommended [1, 4/3]; for %d/%d rows try desirable_weight=%s, undesirable_weight=%s "
                    "(or `auto`)",
                    ratio,
                    n_d,
                    n_u,
                    w_d,
                    w_u,
                )

    @property
    def resolved(self) -> dict[str, Any]:
        """The weights as trained (`auto` resolved from the label counts), recorded in config.yaml."""
        return dict(zip(("desirable_weight", "undesirable_weight"), self.weights))

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        if cfg.prefix_sharing or cfg.padding_free:
            # a shared layout runs only what the step uses: the KL completions when the loss needs z0
            with_kl = self.spec.uses_kl or getattr(self, "_collate_kl", False)
            return collate_shared_unpaired(
                rows,
                self.tokenizer.pad_token_id,
                cfg.max_length,
                cfg.prefix_sharing,
                cfg.padding_free,
                with_kl,
            )
        return collate_unpaired(rows, self.tokenizer.pad_token_id, cfg.max_length)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["label"].shape[0]

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        if "num_tokens" in batch:
            return int(batch["num_tokens"])
        return int(batch["attention_mask"].sum())  # the KL sequences are not counted (as TRL)

    def _reference(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if "ref_logps" in batch:
            return batch["ref_logps"], batch["ref_kl_logps"]
        with torch.no_grad(), self.reference.active(model, batch["input_ids"].device) as ref:
            if "predict_at" in batch or self.spec.uses_kl:
                out = reference_logps(ref, batch)
            else:
                out = {"ref_logps": _logps(ref, batch)}
        return out["ref_logps"], out.get("ref_kl_logps", torch.zeros_like(out["ref_logps"]))

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor], real: bool = True) -> StepOutput:
        cfg = self.cfg
        n = batch["label"].shape[0]
        if "predict_at" in batch:
            stats, kl_logps = _shared_stats(model, batch)
        else:
            stats = completion_token_stats(
                model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
            )
            kl_logps = None
        logps = per_row_sum(stats.logps, stats.rows, n)
        ref, ref_kl = self._reference(model, batch)
        kl = torch.zeros((), device=logps.device)
        if self.spec.uses_kl:
            with torch.no_grad():
                kl_logps = _logps(model, batch, "kl_") if kl_logps is None else kl_logps
                kl = _mean_over_processes((kl_logps - ref_kl.to(kl_logps.dtype)).mean(), real).clamp(min=0)
        logratios = logps - ref.to(logps.dtype)
        desirable = batch["label"]
        losses = self.spec.fn(
            logratios,
            desirable,
            kl,
            beta=cfg.beta,
            desirable_weight=self.weights[0],
            undesirable_weight=self.weights[1],
        )
        return StepOutput(
            loss_sum=losses.sum(), metrics=self._metrics(logps, logratios, desirable, kl, stats)
        )

    def filler_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        return self.step(model, batch, real=False)  # takes part in z0's all-reduce, adds nothing to it

    def _metrics(
        self, logps: torch.Tensor, logratios: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, stats
    ) -> Metrics:  # noqa: ANN001
        beta = self.cfg.beta
        with torch.no_grad():
            rewards = beta * logratios.detach()
            token_good = desirable[stats.rows]
            n_c, n_r = desirable.sum().float(), (~desirable).sum().float()
            one = torch.tensor(1.0)
            return {
                "kl": (kl.detach().float(), one),
                "entropy": (stats.entropy.sum(), float(stats.entropy.numel())),
                "logits/chosen": ((stats.mean_logits * token_good).sum(), token_good.sum().float()),
                "logits/rejected": ((stats.mean_logits * ~token_good).sum(), (~token_good).sum().float()),
                "rewards/chosen": (rewards[desirable].sum(), n_c),
                "rewards/rejected": (rewards[~desirable].sum(), n_r),
                "logps/chosen": (logps.detach()[desirable].sum(), n_c),
                "logps/rejected": (logps.detach()[~desirable].sum(), n_r),
                # the sums and counts of older TRL versions, for dashboards built on them
                "rewards/chosen_sum": (rewards[desirable].sum(), one),
                "rewards/rejected_sum": (rewards[~desirable].sum(), one),
                "logps/chosen_sum": (logps.detach()[desirable].sum(), one),
                "logps/rejected_sum": (logps.detach()[~desirable].sum(), one),
                "count/chosen": (n_c, one),
                "count/rejected": (n_r, one),
            }

    def finalize_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        c, r = metrics.get("rewards/chosen", float("nan")), metrics.get("rewards/rejected", float("nan"))
        if c == c and r == r:  # both groups present
            metrics["rewards/margins"] = c - r
        return metrics
