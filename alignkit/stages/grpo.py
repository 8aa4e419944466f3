"""GRPO and its family: Dr. GRPO, DAPO, GSPO, RLOO. Group-relative advantages, no value model.

Each loss type is a spec in `alignkit.losses.rl.GRPO_LOSSES`: its advantage estimator, importance-ratio level
and aggregation (pure functions), and the facts this stage reads (what the loss is averaged over, whether the
KL goes into the reward, whether dynamic sampling is on by default). The stage never branches on the name.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from alignkit.config import GRPOConfig
from alignkit.generation.rollout import Samples
from alignkit.losses.rl import GRPO_LOSSES, GRPOLossSpec, grpo_policy_loss, sampler_correction
from alignkit.losses.tokens import per_row_sum
from alignkit.modeling.load import load_policy
from alignkit.modeling.logprobs import TokenStats
from alignkit.modeling.reference import Reference
from alignkit.stages.base import Metrics, StepOutput
from alignkit.stages.online import OnlineStage, episode_entries, gather_counts

log = logging.getLogger("alignkit")


@dataclass
class Groups:
    """Whole groups of a rollout: prompts, their samples (G each, grouped), total rewards and reward parts."""

    rows: list[dict]
    samples: Samples
    total: torch.Tensor  # (rows x G,)
    parts: dict[str, torch.Tensor]  # reward name -> (rows x G,)

    def select(self, groups: list[int], g: int) -> Groups:
        idx = [i * g + j for i in groups for j in range(g)]
        return Groups(
            [self.rows[i] for i in groups],
            self.samples.select(idx),
            self.total[idx],
            {k: v[idx] for k, v in self.parts.items()},
        )

    def informative(self, g: int) -> Groups:
        """The groups whose rewards are not all equal."""
        return self.select([i for i, sd in enumerate(self.total.view(-1, g).std(dim=1)) if sd > 0], g)

    def first(self, n: int, g: int) -> Groups:
        return self.select(list(range(n)), g)

    @staticmethod
    def concat(pieces: list[Groups]) -> Groups:
        return Groups(
            [r for p in pieces for r in p.rows],
            # the samples' own class joins them (episodes keep their completion masks)
            type(pieces[0].samples).concat([p.samples for p in pieces]),
            torch.cat([p.total for p in pieces]),
            {k: torch.cat([p.parts[k] for p in pieces]) for k in pieces[0].parts},
        )


def share_groups(targets: list[int], found: list[int]) -> list[int]:
    """How many of its informative groups each process keeps, so that together they keep
    min(sum(targets), sum(found)): first up to its own target, then, in rank order, the others' shortfall."""
    keep = [min(t, f) for t, f in zip(targets, found)]
    short = min(sum(targets), sum(found)) - sum(keep)
    for p, f in enumerate(found):
        extra = min(f - keep[p], short)
        keep[p] += extra
        short -= extra
    return keep


def sampler_metrics(old: torch.Tensor, sampler: torch.Tensor, weights: torch.Tensor) -> Metrics:
    """How far the sampler (vLLM) and the trainer disagree: `sampler/kl`, KL(sampler || trainer) by the k3
    estimator over the sampled tokens (r - 1 - log r, r = pi_trainer / pi_sampler); the importance weights'
    mean and max (`sampler/ratio_mean`, `sampler/ratio_max`, a max taken as the micro-batches' mean of maxima)."""
    with torch.no_grad():
        ok = ~torch.isnan(sampler)
        log_r = (old.detach() - sampler)[ok]
        n = float(max(log_r.numel(), 1))
        return {
            "sampler/kl": ((torch.exp(log_r) - 1 - log_r).sum(), n),
            "sampler/ratio_mean": (weights.sum(), float(max(weights.numel(), 1))),
            "sampler/ratio_max": (weights.max() if weights.numel() else torch.tensor(0.0), 1.0),
        }


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class GRPOStage(OnlineStage):
    name = "grpo"
    config_class = GRPOConfig
    multi_turn = True  # tools / an environment: episodes whose observations the completion mask leaves out

    def load_model(self) -> nn.Module:
        return load_policy(self.cfg)

    @property
    def samples_per_prompt(self) -> int:
        return self.cfg.num_generations

    @property
    def updates_per_batch(self) -> int:
        return self.cfg.num_iterations

    @property
    def spec(self) -> GRPOLossSpec:
        """The loss type's pieces and facts (read at use, so a variant registered after `build` is found)."""
        return GRPO_LOSSES[self.cfg.loss_type]

    @property
    def kl_in_reward(self) -> bool:
        """Whether the KL is penalised in the reward (per sequence, as RLOO) rather than in the loss (per token)."""
        return self.spec.kl_in_reward and self.cfg.beta > 0

    @property
    def dynamic_sampling(self) -> bool:
        ds = self.cfg.dynamic_sampling
        return self.spec.dynamic_sampling if ds is None else ds

    def build(self) -> None:
        super().build()
        self.build_rewards()
        self.reference = Reference(self.cfg, self.model) if self.cfg.beta > 0 else None
        self._refill_rng = random.Random(self.cfg.seed)

    def state_dict(self) -> dict[str, Any]:
        return {"refill_rng": self.rng_state(self._refill_rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "refill_rng" in state:
            self.set_rng_state(self._refill_rng, state["refill_rng"])

    # ---------------------------------------------------------------- rollout
    @torch.no_grad()
    def rollout(self, model: nn.Module, rows: list[dict], device: torch.device) -> list[dict]:
        cfg, g = self.cfg, self.cfg.num_generations
        samples = self.sample(model, rows, g)
        total, parts = self.rewards(rows, samples, g, device)
        kept = list(range(len(samples.completion_ids)))
        zero_std = (total.view(-1, g).std(dim=1) == 0).repeat_interleave(g).float()
        self.frac_zero_std = float(zero_std.mean())
        if self.dynamic_sampling:
            batch = self._refill(model, Groups(rows, samples, total, parts), device)
            samples, total, parts = batch.samples, batch.total, batch.parts
            kept = list(range(len(samples.completion_ids)))
            # the batch as sampled, before the refill: each sample carries the share, whose mean is logged
            zero_std = torch.full((len(kept),), self.frac_zero_std)
        index = [i for i in kept if samples.completion_ids[i]]
        sampler = samples.logprobs if self.corrects_sampler else None
        buffer = [
            {
                "prompt_ids": samples.prompt_ids[i],
                "completion_ids": samples.completion_ids[i],
                **({"sampler_logps": list(sampler[i])} if sampler is not None else {}),
                **episode_entries(samples, i),
                "reward": float(total[i]),
                "truncated": samples.truncated[i],
                "zero_std": float(zero_std[i]),
                **self.reward_entries(parts, i),
            }
            for i in index
        ]
        self._attach_logps(model, buffer, device)
        if self.kl_in_reward:  # reward - beta * sum_t (log pi - log ref), before the baseline (RLOO)
            seq_kl = torch.zeros_like(total)
            for i, s in zip(index, buffer):
                s["kl"] = sum(o - r for o, r in zip(s["old_logps"], s.pop("ref_logps")))
                seq_kl[i] = s["kl"]
            total = total - cfg.beta * seq_kl
        adv = self.spec.advantages(total, g)
        for i, s in zip(index, buffer):
            s["advantage"] = float(adv[i])
        return buffer

    def _refill(self, model: nn.Module, batch: Groups, device: torch.device) -> Groups:
        """DAPO's dynamic sampling over the global batch: groups whose rewards are all equal teach nothing, so
        rounds of freshly drawn prompts replace them until the processes together hold as many informative
        groups as the global batch has prompts, or `max_refill_rounds` run out. Every process takes part in
        every round (one sample and one reward call each, so collectives inside them match), draws the same
        prompts from the shared generator and samples its share of them. The kept groups are then dealt by
        `share_groups`; a process left none trains on its batch as a filler, at weight 0. If no process holds
        an informative group, each keeps its batch (its advantages are zero)."""
        g = self.cfg.num_generations
        target = 0 if self.filler_rollout else len(batch.rows)  # a filler rollout's groups never count
        pieces = [batch.informative(g)] if target else []
        counts = gather_counts([target, sum(len(p.rows) for p in pieces)], device)
        world, rank = len(counts), _rank()
        goal = sum(c[0] for c in counts)
        if world > 1 and goal:  # the global batch as sampled, before the refill
            self.frac_zero_std = float(torch.tensor(float(goal - sum(c[1] for c in counts))) / goal)
        for _ in range(self.cfg.max_refill_rounds):
            have = sum(c[1] for c in counts)
            if have >= goal:
                break
            per_process = -(-(goal - have) // world)
            drawn = self._refill_rng.sample(self.train_rows, min(per_process * world, len(self.train_rows)))
            mine = drawn[rank::world]
            extra = mine or drawn[:1]  # dealt none: sample one anyway (discarded), to take part in the round
            more = self.sample(model, extra, g)
            piece = Groups(extra, more, *self.rewards(extra, more, g, device)).informative(g)
            if target and mine:
                pieces.append(piece)
            counts = gather_counts([target, sum(len(p.rows) for p in pieces)], device)
        keep = share_groups([c[0] for c in counts], [c[1] for c in counts])[rank]
        if keep == 0:
            self.filler_rollout = self.filler_rollout or any(c[1] for c in counts)
            return batch
        return Groups.concat(pieces).first(keep, g)

    @property
    def corrects_sampler(self) -> bool:
        """Whether the sampler's own log-probs weight the loss (vLLM samples; the trainer recomputes)."""
        return self.engine is not None and self.cfg.vllm_importance_sampling_correction

    def _attach_logps(self, model: nn.Module, buffer: list[dict], device: torch.device) -> None:
        """Sampling-time log-probs (for importance ratios when a rollout is reused, and against the sampler's)
        and reference log-probs."""
        need_old = self.cfg.num_iterations > 1 or self.kl_in_reward or self.corrects_sampler
        if not need_old and self.reference is None:
            return
        bs = self.cfg.per_device_eval_batch_size
        for i in range(0, len(buffer), bs):
            chunk = buffer[i : i + bs]
            batch = self.sequence_batch(chunk, device)
            if need_old:
                self._store(chunk, "old_logps", self._token_logps(model, batch))
            if self.reference is not None:
                with self.reference.active(model, device) as ref:
                    self._store(chunk, "ref_logps", self._token_logps(ref, batch))

    def _token_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.token_stats(model, batch).logps

    @staticmethod
    def _store(chunk: list[dict], key: str, flat: torch.Tensor) -> None:
        values = flat.float().cpu().tolist()
        pos = 0
        for s in chunk:
            n = len(s["completion_ids"]) - (0 if s["prompt_ids"] else 1)
            if "completion_mask" in s:  # an episode: only the model's own tokens have log-probs
                n = sum(s["completion_mask"][0 if s["prompt_ids"] else 1 :])
            s[key], pos = values[pos : pos + n], pos + n

    # ---------------------------------------------------------------- update
    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.sequence_batch(samples)
        batch["advantages"] = torch.tensor([s["advantage"] for s in samples], dtype=torch.float32)
        for key in ("old_logps", "ref_logps", "sampler_logps"):
            if key in samples[0]:
                batch[key] = torch.tensor([v for s in samples for v in s[key]], dtype=torch.float32)
        batch["reward"] = torch.tensor([s["reward"] for s in samples])
        batch["truncated"] = torch.tensor([float(s["truncated"]) for s in samples])
        batch["zero_std"] = torch.tensor([float(s["zero_std"]) for s in samples])
        if "kl" in samples[0]:
            batch["kl"] = torch.tensor([s["kl"] for s in samples])
        self.collate_rewards(samples, batch)
        return batch

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        if self.spec.average_over == "tokens":
            return int(batch["completion_mask"][:, 1:].sum())
        return batch["input_ids"].shape[0]

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        cfg = self.cfg
        n = batch["input_ids"].shape[0]
        stats = self.token_stats(model, batch)
        logps, rows = stats.logps, stats.rows
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()
        lengths = per_row_sum(torch.ones_like(logps), rows, n).clamp(min=1)
        eps_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
        weights = None
        if "sampler_logps" in batch:  # the trainer's old log-probs against vLLM's, per token
            weights = sampler_correction(
                old,
                batch["sampler_logps"],
                rows,
                n,
                cfg.vllm_importance_sampling_mode,
                cfg.vllm_importance_sampling_clip_max,
                cfg.vllm_importance_sampling_clip_min,
            )
        loss, clipped, kl = grpo_policy_loss(
            logps,
            old,
            batch["advantages"],
            rows,
            self.spec,
            cfg.epsilon,
            eps_high,
            cfg.max_new_tokens,
            batch.get("ref_logps"),
            cfg.beta,
            cfg.use_bias_correction_kl,
            weights,
        )
        clip_frac = (clipped.float().sum(), float(clipped.numel()))
        metrics = self._metrics(batch, stats, lengths, clip_frac, kl)
        if weights is not None:
            metrics.update(sampler_metrics(old, batch["sampler_logps"], weights))
        return StepOutput(loss_sum=loss, metrics=metrics)

    def _metrics(
        self,
        batch: dict[str, torch.Tensor],
        stats: TokenStats,
        lengths: torch.Tensor,
        clip_frac: tuple[torch.Tensor, float],
        kl: torch.Tensor | None,
    ) -> Metrics:
        n = float(batch["input_ids"].shape[0])
        out: Metrics = {
            **self.reward_metrics(batch["reward"], batch),
            "frac_reward_zero_std": (batch["zero_std"].sum(), n),
            "clip_ratio": clip_frac,
            "entropy": (stats.entropy.sum(), float(stats.entropy.numel())),
            "completion_length": (lengths.detach().sum(), n),
            "truncated_fraction": (batch["truncated"].sum(), n),
        }
        if kl is not None:
            out["kl"] = (kl.detach().sum(), float(kl.numel()))
        elif "kl" in batch:  # KL in the reward (RLOO): the sequence KL the reward was penalised with
            out["kl"] = (batch["kl"].sum(), n)
        return out
