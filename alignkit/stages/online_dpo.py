"""Online DPO: the DPO family on pairs the current policy samples (Guo et al. 2024, "Direct language model
alignment from online AI feedback"; TRL's `trl.experimental.online_dpo`).

A reading guide, rollout -> reward -> pair -> loss:
- rollout: `num_generations` completions per prompt from the current policy (the one rollout engine);
- reward: the online stages' rewards (reward functions, a reward model, the LLM judge as a reward function),
  with `missing_eos_penalty` taken off truncated completions;
- pair: per prompt, the best completion is chosen, the worst rejected (ties: the earlier sample is chosen,
  the later rejected, as TRL's two-sample rule `first >= second`); the reference's log-probs of both are
  taken at rollout time (the reference is frozen, so it is the value TRL computes at its step);
- loss: the offline DPO stage's step, unchanged: any loss of `alignkit.losses.preference.DPO_LOSSES`, on
  log-probs at temperature 1 (the policy's own distribution, as TRL; the sampling temperature only shapes
  which completions are drawn).

How it departs from TRL: any number of samples per prompt (best vs worst), every DPO-family loss (TRL: sigmoid
and ipo), `ipo` as the offline DPO stage's (log-ratios averaged over tokens, as TRL's DPOTrainer; TRL's
online trainer sums them), and the pair's reward gap is logged (`objective/scores_margin`) beside the share of tied pairs.
"""

from __future__ import annotations

import torch
from torch import nn

from alignkit.config import OnlineDPOConfig
from alignkit.data.batches import collate_pairs
from alignkit.stages.base import Metrics, StepOutput
from alignkit.stages.online import OnlineStage
from alignkit.stages.preference import PreferenceStage, sequence_logps


def best_and_worst(total: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of `g` rewards (`total`: (P*g,)), the index of the chosen (the first maximum) and of the
    rejected (the last minimum) sample, (P,) each. With g = 2 this is TRL's rule: the first is chosen when
    its reward is >= the second's."""
    groups = total.view(-1, g)
    first = torch.arange(groups.shape[0]) * g
    chosen = groups.argmax(dim=1)  # torch returns the first maximal index
    rejected = g - 1 - groups.flip(1).argmin(dim=1)  # the last minimal index
    return first + chosen, first + rejected


class OnlineDPOStage(OnlineStage, PreferenceStage):
    """Sampling, rewards and the rollout-driven batches from `OnlineStage`; the reference, the pair collation
    and the loss from `PreferenceStage`."""

    name = "online_dpo"
    config_class = OnlineDPOConfig

    @property
    def samples_per_prompt(self) -> int:
        return self.cfg.num_generations

    def build(self) -> None:
        super().build()  # OnlineStage.build -> PreferenceStage.build (model, reference) -> Stage.build
        self.build_rewards()

    @torch.no_grad()
    def rollout(self, model: nn.Module, rows: list[dict], device: torch.device) -> list[dict]:
        g = self.cfg.num_generations
        samples = self.sample(model, rows, g)
        total, _ = self.rewards(rows, samples, g, device)
        chosen, rejected = best_and_worst(total, g)
        buffer = [
            {
                "prompt_ids": samples.prompt_ids[c],
                "chosen_ids": samples.completion_ids[c],
                "rejected_ids": samples.completion_ids[r],
                "score_chosen": float(total[c]),
                "score_rejected": float(total[r]),
                "score_mean": float(total[c - c % g : c - c % g + g].mean()),
                "truncated": sum(samples.truncated[c - c % g : c - c % g + g]) / g,
            }
            for c, r in zip(chosen.tolist(), rejected.tolist())
        ]
        if self.reference is not None:
            bs = self.cfg.per_device_eval_batch_size
            for i in range(0, len(buffer), bs):
                chunk = buffer[i : i + bs]
                batch = {k: v.to(device) for k, v in self._pairs(chunk).items()}
                with self.reference.active(model, device) as ref:
                    out = sequence_logps(ref, batch)
                for key in ("ref_chosen_logps", "ref_rejected_logps"):
                    for s, v in zip(chunk, out[key].double().cpu().tolist()):
                        s[key] = v
        return buffer

    def _pairs(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        return collate_pairs(samples, self.tokenizer.pad_token_id, self.cfg.max_length)

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self._pairs(samples)
        for key in ("score_chosen", "score_rejected", "score_mean", "truncated"):
            batch[key] = torch.tensor([s[key] for s in samples], dtype=torch.float32)
        return batch

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        out = PreferenceStage.step(self, model, batch)
        out.metrics.update(self._score_metrics(batch))
        return out

    @staticmethod
    def _score_metrics(batch: dict[str, torch.Tensor]) -> Metrics:
        n = float(batch["score_chosen"].shape[0])
        margin = batch["score_chosen"] - batch["score_rejected"]
        return {
            "objective/scores": (batch["score_mean"].sum(), n),
            "objective/scores_margin": (margin.sum(), n),
            "frac_tied_pairs": ((margin == 0).float().sum(), n),
            "truncated_fraction": (batch["truncated"].sum(), n),
        }
