"""Pairwise preference optimisation: DPO and its family, and the reference-free SimPO / CPO / ORPO.

The stage never branches on a loss's name: it reads each loss's `LossSpec` (does it need a reference?)
and calls the pure functions in `alignkit.losses.preference`.

`prefix_sharing` runs each pair as one sequence, prompt + chosen + rejected (the prompt once; see
`alignkit.data.shared_prefix`), `padding_free` the whole micro-batch as one row; the policy and the reference
passes (precomputed or not) take the same layout, and every number equals the plain layout's to rounding.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from alignkit.config import DPOConfig
from alignkit.data.batches import build_pair_rows, collate_pairs
from alignkit.data.shared_prefix import check_layout_support, collate_shared_pairs, model_mask
from alignkit.errors import UserError
from alignkit.losses.preference import DPO_LOSSES, PairLogps
from alignkit.losses.tokens import per_row_sum
from alignkit.modeling.load import load_policy
from alignkit.modeling.logprobs import TokenStats, completion_token_stats, token_stats_at
from alignkit.modeling.reference import Reference, precompute_splits
from alignkit.stages.base import Metrics, Stage, StepOutput

log = logging.getLogger("alignkit")


def logical_rows(batch: dict[str, torch.Tensor]) -> int:
    """2B: the chosen then the rejected rows, whatever the layout (a shared-prefix batch has fewer rows)."""
    return int(batch["logical_rows"]) if "logical_rows" in batch else batch["input_ids"].shape[0]


def pair_token_stats(model: nn.Module, batch: dict[str, torch.Tensor]) -> TokenStats:
    """Completion-token stats of a pair batch, plain (2B padded rows) or shared-prefix / padding-free (rows
    `alignkit.data.shared_prefix` built): the same entries, chosen rows 0..B-1 then rejected B..2B-1."""
    if "predict_at" in batch:
        return token_stats_at(
            model,
            batch["input_ids"],
            model_mask(model, batch),
            batch["predict_at"],
            batch["labels"],
            batch["label_rows"],
            position_ids=batch["position_ids"],
        )
    return completion_token_stats(
        model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    )


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Summed completion log-probs of each chosen and rejected row: {"ref_chosen_logps", "ref_rejected_logps"}."""
    stats = pair_token_stats(model, batch)
    logps = per_row_sum(stats.logps, stats.rows, logical_rows(batch))
    chosen, rejected = logps.chunk(2)
    return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}


class PreferenceStage(Stage):
    name = "dpo"
    config_class = DPOConfig
    batch_unit = "pairs"
    kinds = ("pair",)

    def load_model(self) -> nn.Module:
        return load_policy(self.cfg)

    @property
    def losses(self) -> list[tuple[str, float]]:
        weights = self.cfg.loss_weights or [1.0] * len(self.cfg.loss_type)
        return list(zip(self.cfg.loss_type, weights))

    @property
    def needs_reference(self) -> bool:
        return not self.cfg.reference_free and any(DPO_LOSSES[n].needs_reference for n, _ in self.losses)

    def build(self) -> None:
        super().build()
        check_layout_support(self.cfg, self.model)
        self.reference = Reference(self.cfg, self.model) if self.needs_reference else None
        if self.reference is not None and self.cfg.precompute_ref_log_probs:
            precompute_splits(self, sequence_logps, ("prompt_ids", "chosen_ids", "rejected_ids"))

    def rows(self, sources: str | list[str]) -> list[dict]:
        examples = self.load_examples(sources)
        rows, stats, identical = build_pair_rows(
            examples, self.tokenizer, self.cfg.max_length, self.cfg.max_prompt_length
        )
        if identical:
            log.warning("%d pairs have chosen identical to rejected: skipped (they teach nothing)", identical)
        log.info("%s", stats.message().replace("no completion token left", "prompt fills max_length"))
        return rows

    def load_examples(self, sources: str | list[str]):  # noqa: ANN201 - same as the base
        try:
            return super().load_examples(sources)
        except UserError as exc:
            if "trains on pair data" in str(exc):
                raise UserError(
                    f"{exc}. Pairwise losses ({', '.join(n for n, _ in self.losses)}) need pairs: "
                    "rows with `chosen` and `rejected`"
                ) from exc
            raise

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        if cfg.prefix_sharing or cfg.padding_free:
            pad_id = self.tokenizer.pad_token_id
            return collate_shared_pairs(rows, pad_id, cfg.max_length, cfg.prefix_sharing, cfg.padding_free)
        return collate_pairs(rows, self.tokenizer.pad_token_id, cfg.max_length)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return logical_rows(batch) // 2

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["num_tokens"] if "num_tokens" in batch else batch["attention_mask"].sum())

    def _reference_logps(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b = logical_rows(batch) // 2
        if self.reference is None:
            zero = torch.zeros(b, device=batch["input_ids"].device)
            return zero, zero
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        with torch.no_grad(), self.reference.active(model, batch["input_ids"].device) as ref:
            out = sequence_logps(ref, batch)
        return out["ref_chosen_logps"], out["ref_rejected_logps"]

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        cfg = self.cfg
        n_rows = logical_rows(batch)
        b = n_rows // 2
        stats = pair_token_stats(model, batch)
        logps = per_row_sum(stats.logps, stats.rows, n_rows)  # (2B,)
        lengths = per_row_sum(torch.ones_like(stats.logps), stats.rows, n_rows)
        ref_c, ref_r = self._reference_logps(model, batch)
        is_chosen = stats.rows < b
        nll_c = per_row_sum(-stats.logps * is_chosen, stats.rows, n_rows)[:b]
        pair = PairLogps(
            chosen=logps[:b],
            rejected=logps[b:],
            ref_chosen=ref_c.to(logps.dtype),
            ref_rejected=ref_r.to(logps.dtype),
            chosen_len=lengths[:b],
            rejected_len=lengths[b:],
            chosen_nll_tokens=nll_c,
            batch_chosen_tokens=is_chosen.sum().float(),
        )
        hyper = {
            "beta": cfg.beta,
            "label_smoothing": cfg.label_smoothing,
            "f_divergence_type": cfg.f_divergence_type,
            "f_alpha": cfg.f_alpha_divergence_coef,
            "discopop_tau": cfg.discopop_tau,
            "simpo_gamma": cfg.simpo_gamma,
            "cpo_alpha": cfg.cpo_alpha,
            "orpo_beta": cfg.orpo_beta,
        }
        loss = sum(w * DPO_LOSSES[name].fn(pair, **hyper) for name, w in self.losses)
        return StepOutput(loss_sum=loss.sum(), metrics=self._metrics(pair, stats, is_chosen, b))

    def _metrics(self, p: PairLogps, stats, is_chosen: torch.Tensor, b: int) -> Metrics:  # noqa: ANN001
        beta = self.cfg.beta
        with torch.no_grad():
            rc, rr = beta * (p.chosen - p.ref_chosen).detach(), beta * (p.rejected - p.ref_rejected).detach()
            n = torch.tensor(float(b))
            n_c, n_r = is_chosen.sum().float(), (~is_chosen).sum().float()
            return {
                "rewards/chosen": (rc.sum(), n),
                "rewards/rejected": (rr.sum(), n),
                "rewards/accuracies": ((rc > rr).float().sum(), n),
                "rewards/margins": ((rc - rr).sum(), n),
                "logps/chosen": (p.chosen.detach().sum(), n),
                "logps/rejected": (p.rejected.detach().sum(), n),
                "logits/chosen": ((stats.mean_logits * is_chosen).sum(), n_c),
                "logits/rejected": ((stats.mean_logits * ~is_chosen).sum(), n_r),
                "entropy": (stats.entropy.sum(), n_c + n_r),
                "mean_token_accuracy": ((stats.is_top1 & is_chosen).float().sum(), n_c),
            }
