"""PPO-based RLHF (Ouyang et al. 2022; the details of Huang et al. 2024, "The N+ implementation details of
RLHF with PPO"): actor, critic (a per-token value head), frozen reference, reward model and/or verifiable
rewards, per-token KL penalty in the reward (fixed or adaptive), GAE, clipped surrogate and value losses.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import torch
from torch import nn

from alignkit.config import PPOConfig
from alignkit.errors import UserError
from alignkit.generation.rewards import RewardModelScorer
from alignkit.losses.rl import (
    clipped_surrogate,
    clipped_value_loss,
    pad_right,
    ppo_advantages,
    ppo_token_rewards,
)
from alignkit.modeling.load import (
    apply_finetuning,
    from_pretrained,
    load_policy,
    load_spec,
    load_tokenizer,
    torch_dtype,
)
from alignkit.modeling.reference import Reference
from alignkit.modeling.resolve import resolve_model
from alignkit.modeling.save import load_weights, save_model
from alignkit.stages.base import Metrics, StepOutput
from alignkit.stages.online import OnlineStage, episode_entries

log = logging.getLogger("alignkit")


class PolicyAndValue(nn.Module):
    """One module for the loop (one optimizer, one DDP wrapper): `head="value"` runs the critic."""

    def __init__(self, policy: nn.Module, value: nn.Module) -> None:
        super().__init__()
        self.policy, self.value = policy, value
        self.config = policy.config

    def forward(self, head: str = "policy", **kwargs: Any) -> Any:
        return self.value(**kwargs) if head == "value" else self.policy(**kwargs)

    def get_output_embeddings(self) -> nn.Module:
        return self.policy.get_output_embeddings()


def load_value_model(cfg: Any, tokenizer: Any) -> nn.Module:
    """A token-classification head (one value per position) on a backbone: by default the reward model's, so
    the critic starts from the reward model's weights and head, as in InstructGPT. The critic reads the
    policy's token ids, so a reward model with another vocabulary cannot be its backbone: the policy is.
    A LoRA reward model (or policy) adapter: the critic starts from its base with the adapter merged."""

    path = cfg.value_model_name_or_path or cfg.reward_model or cfg.model_name_or_path
    if cfg.reward_model:  # reward_model_type checked before anything is loaded
        RewardModelScorer.spec(cfg.reward_model, cfg.reward_model_type)
    if path != cfg.model_name_or_path:
        if load_tokenizer(path, cfg.trust_remote_code).get_vocab() != tokenizer.get_vocab():
            if cfg.value_model_name_or_path:
                raise UserError(
                    f"value_model_name_or_path: {path} has another tokenizer than the policy "
                    f"({cfg.model_name_or_path}); the critic reads the policy's tokens. Use a model with the "
                    "policy's tokenizer, or leave the key out"
                )
            log.warning(
                "the reward model %s has another tokenizer than the policy: the critic starts from the policy "
                "instead (the reward model still scores text re-tokenised with its own)",
                path,
            )
            path = cfg.model_name_or_path
    if path == cfg.model_name_or_path:  # the starting policy: its adapters merged
        spec = resolve_model(path, cfg.adapter_name_or_path)
    elif path == cfg.reward_model:
        spec = RewardModelScorer.spec(path, cfg.reward_model_type)
    else:
        spec = resolve_model(path, key="value_model_name_or_path")
    model = _token_classifier(spec, cfg)
    return apply_finetuning(model, cfg, task_type="TOKEN_CLS")


def _token_classifier(spec: Any, cfg: Any) -> nn.Module:
    """The spec's weights under a one-label token-classification head. With adapters, they are merged into a
    sequence classifier first (a reward adapter's `score` head is saved for that class), whose weights then
    load into the token classifier: the names match (`model.*`, `score.weight`); `score.bias`, which only the
    token classifier has, keeps its initial zeros."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    kwargs = {"dtype": torch_dtype(cfg), "num_labels": 1, "trust_remote_code": cfg.trust_remote_code}
    model = from_pretrained(AutoModelForTokenClassification, spec.base, **kwargs)
    if not spec.merge:
        return model
    merged = load_spec(AutoModelForSequenceClassification, spec, **kwargs)
    result = model.load_state_dict(merged.state_dict(), strict=False)
    heads = ("score.", "classifier.")
    backbone = [k for k in result.missing_keys if not k.startswith(heads)]
    if backbone:
        raise UserError(
            f"the critic could not start from {spec.base} + {', '.join(spec.merge)}: the backbone's weights "
            f"do not fit a token classifier ({backbone[0]}); set `value_model_name_or_path` to a full model"
        )
    if result.unexpected_keys or any(not k.endswith(".bias") for k in result.missing_keys):
        log.warning("the critic's value head starts fresh: the merged reward head does not fit it")
    return model


def _token_values(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N,) value of the state before each completion token (the position that predicts it), flattened."""
    out = model(head="value", input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    values = out.logits.squeeze(-1)[:, :-1].float()  # (B, T-1)
    return values[batch["completion_mask"][:, 1:].bool()]


def _split(flat: torch.Tensor, lengths: list[int]) -> list[list[float]]:
    return [part.tolist() for part in torch.split(flat.float().cpu(), lengths)]


class PPOStage(OnlineStage):
    name = "ppo"
    config_class = PPOConfig
    multi_turn = True  # tools / an environment: GAE over the model's own tokens, observations masked

    def load_model(self) -> nn.Module:
        return PolicyAndValue(load_policy(self.cfg), load_value_model(self.cfg, self.tokenizer))

    @property
    def updates_per_batch(self) -> int:
        return self.cfg.ppo_epochs * self.cfg.num_mini_batches

    def language_model(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model).policy

    def build(self) -> None:
        super().build()
        self.build_rewards()
        self.reference = Reference(self.cfg, self.model.policy)
        self.kl_coef = self.cfg.init_kl_coef
        self._shuffle = random.Random(self.cfg.seed)

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def rollout(self, model: nn.Module, rows: list[dict], device: torch.device) -> list[dict]:
        cfg = self.cfg
        unwrapped = getattr(model, "module", model)
        samples = self.sample(unwrapped.policy, rows, 1)
        raw, parts = self.rewards(rows, samples, 1, device)
        scores = raw  # what the policy is trained on; `reward/mean` logs the raw score
        if cfg.reward_clip is not None:
            scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
        if cfg.whiten_rewards:
            scores = (scores - scores.mean()) / (scores.std() + 1e-8) if len(scores) > 1 else scores
        keep = [i for i, c in enumerate(samples.completion_ids) if c]
        # with tools, an episode's completion holds observations: only the model's own tokens are actions, so
        # the per-token tensors (log-probs, values, KL, GAE's steps) run over those; a tool result between two
        # of them is the environment's transition, not a step of the policy
        entries = [
            {
                "prompt_ids": samples.prompt_ids[i],
                "completion_ids": samples.completion_ids[i],
                **episode_entries(samples, i),
            }
            for i in keep
        ]
        lengths = [
            sum(e["completion_mask"]) if "completion_mask" in e else len(e["completion_ids"]) for e in entries
        ]
        batch = self.sequence_batch(entries, device)
        old = self.token_stats(model, batch).logps
        with self.reference.active(unwrapped.policy, device) as ref:
            ref_logps = self.token_stats(ref, batch).logps
        values = _token_values(model, batch)
        # the flat (N,) per-token tensors, left-aligned per completion: (B, T) with T the longest completion
        mask = pad_right(torch.ones_like(old), lengths)
        token_rewards, kl_tok = ppo_token_rewards(
            scores[keep].to(device),
            pad_right(old, lengths),
            pad_right(ref_logps, lengths),
            mask,
            self.kl_coef,
        )
        adv, returns = ppo_advantages(
            token_rewards, pad_right(values, lengths), mask, cfg.gamma, cfg.lam, cfg.whiten_advantages
        )
        self._update_kl_coef(kl_tok.sum(1))
        old_l, ref_l, val_l = _split(old, lengths), _split(ref_logps, lengths), _split(values, lengths)
        buffer = []
        for j, i in enumerate(keep):
            n = lengths[j]
            buffer.append(
                {
                    **entries[j],
                    "old_logps": old_l[j],
                    "ref_logps": ref_l[j],
                    "values": val_l[j],
                    "advantages": adv[j, :n].tolist(),
                    "returns": returns[j, :n].tolist(),
                    "score": float(raw[i]),
                    "truncated": samples.truncated[i],
                    **self.reward_entries(parts, i),
                }
            )
        return buffer

    def _update_kl_coef(self, seq_kl: torch.Tensor) -> None:
        """Adaptive KL controller (Ziegler et al. 2019, sec. 2.2): move toward `target_kl`, error clipped to 20%,
        from the KL of the whole global batch, so that every process keeps the same coefficient."""
        if self.cfg.target_kl is None:
            return
        total = torch.stack([seq_kl.sum(), torch.tensor(float(len(seq_kl)), device=seq_kl.device)]).float()
        total = total * (0.0 if self.filler_rollout else 1.0)  # a filler rollout weighs 0 here too
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
        kl, n = float(total[0] / total[1].clamp(min=1)), float(total[1])
        error = max(-0.2, min(0.2, kl / self.cfg.target_kl - 1))
        self.kl_coef *= 1 + error * n / self.cfg.kl_horizon

    def state_dict(self) -> dict[str, Any]:
        return {"kl_coef": self.kl_coef, "shuffle_rng": self.rng_state(self._shuffle)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "kl_coef" in state:
            self.kl_coef = state["kl_coef"]
            self.set_rng_state(self._shuffle, state["shuffle_rng"])

    def update_batches(self, buffer: list[dict], update: int) -> list[list[dict]]:
        """`num_mini_batches` mini-batches per PPO epoch, reshuffled every epoch, each in micro-batches."""
        nmb = self.cfg.num_mini_batches
        if update % nmb == 0:
            self._order = list(range(len(buffer)))
            self._shuffle.shuffle(self._order)
        size = -(-len(buffer) // nmb)
        part = [buffer[i] for i in self._order[(update % nmb) * size : (update % nmb + 1) * size]]
        return super().update_batches(part, update)

    # ------------------------------------------------------------------ update
    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.sequence_batch(samples)
        for key in ("old_logps", "ref_logps", "values", "advantages", "returns"):
            batch[key] = torch.tensor([v for s in samples for v in s[key]], dtype=torch.float32)
        batch["score"] = torch.tensor([s["score"] for s in samples])
        batch["truncated"] = torch.tensor([float(s["truncated"]) for s in samples])
        # the model's own tokens (an episode's observations are not its response)
        batch["response_length"] = torch.tensor([float(len(s["values"])) for s in samples])
        self.collate_rewards(samples, batch)
        return batch

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["completion_mask"][:, 1:].sum())  # token-level averages, as TRL's PPO

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        cfg = self.cfg
        stats = self.token_stats(model, batch)
        pg, clipped = clipped_surrogate(
            stats.logps, batch["old_logps"], batch["advantages"], cfg.cliprange, cfg.cliprange
        )
        values = _token_values(model, batch)
        ret = batch["returns"]
        vf = clipped_value_loss(values, batch["values"], ret, cfg.cliprange_value)
        loss = pg + cfg.vf_coef * vf
        if cfg.entropy_coef:  # entropy bonus: the entropy is differentiable
            loss = loss - cfg.entropy_coef * stats.entropy
        n_tok = float(stats.logps.numel())
        with torch.no_grad():
            resid = ret - values.detach()
            n = float(batch["input_ids"].shape[0])
            metrics: Metrics = {
                **self.reward_metrics(batch["score"], batch),
                "policy/clipfrac": (clipped.float().sum(), n_tok),
                "policy/approxkl": ((0.5 * (stats.logps.detach() - batch["old_logps"]) ** 2).sum(), n_tok),
                "value/loss": (vf.detach().sum(), n_tok),
                "_ret": (ret.sum(), n_tok),
                "_ret_sq": ((ret**2).sum(), n_tok),
                "_resid": (resid.sum(), n_tok),
                "_resid_sq": ((resid**2).sum(), n_tok),
                "entropy": (stats.entropy.sum(), n_tok),
                "kl": ((batch["old_logps"] - batch["ref_logps"]).sum(), n),
                "kl_coef": (torch.tensor(self.kl_coef * n), n),
                "response_length": (batch["response_length"].sum(), n),
                "truncated_fraction": (batch["truncated"].sum(), n),
            }
        return StepOutput(loss_sum=loss.sum(), metrics=metrics)

    def finalize_metrics(self, m: dict[str, float]) -> dict[str, float]:
        m = super().finalize_metrics(m)
        if "_ret" in m:
            var_ret = m.pop("_ret_sq") - m.pop("_ret") ** 2
            var_res = m.pop("_resid_sq") - m.pop("_resid") ** 2
            m["value/explained_variance"] = 1 - var_res / var_ret if var_ret > 0 else float("nan")
        return m

    # ------------------------------------------------------------------ saving
    def save(self, model: nn.Module, output_dir: str, merged: bool = False) -> None:
        """The policy in HF format at the top, the critic in `value_model/`."""
        save_model(model.policy, self.tokenizer, output_dir, merged=merged)
        model.value.save_pretrained(os.path.join(output_dir, "value_model"), safe_serialization=True)

    def load_weights(self, model: nn.Module, path: str) -> None:

        load_weights(model.policy, path)
        load_weights(model.value, os.path.join(path, "value_model"))
