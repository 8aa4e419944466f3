"""What the online stages (GRPO family, PPO) share: prompts, rollouts, rewards, the update batches.

An online stage makes its micro-batches from a rollout: on the first step of each global batch of prompts
it samples, scores and turns them into a buffer of samples (`rollout`, under the steps' autocast), and that
step and the next `updates_per_batch - 1` train on the buffer (`update_batches`), each the usual accumulate /
clip / step of the loop.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch
from torch import nn

from alignkit.config import BaseConfig, OnlineConfig
from alignkit.data.batches import pad, tokenize_chat, tokenize_text
from alignkit.data.formats import Example
from alignkit.errors import UserError
from alignkit.generation.judge_reward import build_judge_reward
from alignkit.generation.rewards import (
    RewardFn,
    RewardModelScorer,
    build_reward_funcs,
    check_columns,
    score,
)
from alignkit.generation.rollout import Samples, VLLMEngine, sample_hf, sequences
from alignkit.generation.tools import EpisodeSamples, build_environment, run_episodes
from alignkit.losses.rl import dapo_overlong_penalty
from alignkit.losses.tokens import per_row_sum
from alignkit.modeling.logprobs import TokenStats, completion_token_stats
from alignkit.stages.base import Metrics, MicroBatch, Stage, StepContext

log = logging.getLogger("alignkit")


def gather_counts(values: list[int], device: torch.device) -> list[list[int]]:
    """Every process's `values` (as many on each), in rank order; [values] in a single process."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return [list(values)]
    mine = torch.tensor(values, dtype=torch.long, device=device)
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [t.tolist() for t in out]


def episode_entries(samples: Samples, i: int) -> dict[str, Any]:
    """Sample i's multi-turn entries (its completion mask, turns, error observations); {} for one turn."""
    if not isinstance(samples, EpisodeSamples):
        return {}
    return {
        "completion_mask": samples.completion_masks[i],
        "turns": samples.turns[i],
        "tool_errors": samples.tool_errors[i],
    }


def encode_prompt(ex: Example, tokenizer: Any) -> list[int]:
    if isinstance(ex.prompt, list):
        return tokenize_chat(tokenizer, ex.prompt, add_generation_prompt=True, tools=ex.tools)
    return tokenize_text(tokenizer, ex.prompt)


class OnlineStage(Stage):
    batch_unit = "prompts"
    online = True
    kinds = ("prompt", "sft", "pair", "unpaired")  # only the prompt (and the extra columns) is used
    multi_turn = False  # whether the stage trains on multi-turn episodes (masks over observations)
    rewarded = True  # whether it learns from rewards (distillation learns from a teacher's distributions)

    def __init__(self, cfg: BaseConfig, reward_funcs: dict[str, RewardFn] | None = None) -> None:
        """`reward_funcs`: functions handed over in Python, by the names `cfg.reward_funcs` lists them under."""
        super().__init__(cfg)
        self.given_reward_funcs = dict(reward_funcs or {})
        self.buffer: list[dict] | None = None  # the current rollout's samples
        self.episodes: tuple | None = None  # (environment factory, tool schemas) of multi-turn rollouts
        self.judge: Any = None  # the LLM judge as a reward (build_rewards)
        self.engine: VLLMEngine | None = None
        # this process's prompts are a filler (a short last batch left it none), trained at weight 0; a
        # rollout's own cross-process statistics leave it out
        self.filler_rollout = False

    @property
    def samples_per_prompt(self) -> int:
        """Completions sampled per prompt in a rollout."""
        return 1

    def micro_batches(self, step: int, ctx: StepContext) -> list[MicroBatch]:
        """A rollout on the first step of each global batch of prompts (and on the first after a resume), then
        the buffer's `update_batches` for this step. An empty micro-batch (a small buffer on this process) and
        every micro-batch of a filler rollout run at weight 0, so every process makes as many backward passes."""
        update = ctx.plan.update_index(step)
        if update == 0 or self.buffer is None:
            chunks, filler = ctx.plan.row_chunks(step)
            idx = [i for chunk in chunks for i in chunk]
            self.filler_rollout = not idx  # a short last batch left this process no prompt: sample a filler
            rows = [self.train_rows[i] for i in idx or [filler]]
            # under the steps' autocast: the log-probs a rollout stores are then the function the update
            # computes (PPO's first ratio is 1), and the prepared model's float32 outputs meet a bf16 head
            with ctx.autocast():
                self.buffer = self.rollout(ctx.model, rows, ctx.device)
        return [
            MicroBatch(
                self.collate(chunk or self.buffer[:1]), 0.0 if self.filler_rollout or not chunk else 1.0
            )
            for chunk in self.update_batches(self.buffer, update)
        ]

    def rollout(self, model: nn.Module, rows: list[dict], device: torch.device) -> list[dict]:
        """Sample completions of this process's prompts, score them, and return the buffer of samples the
        update batches are cut from."""
        raise NotImplementedError

    def rows(self, sources: str | list[str]) -> list[dict]:
        rows, too_long = [], 0
        for ex in self.load_examples(sources):
            ids = encode_prompt(ex, self.tokenizer) if ex.prompt else []
            if not ids:  # nothing to condition on, and no position to predict the first token from
                raise UserError(f"{ex.where}: the prompt is empty; give every row a prompt")
            if len(ids) + self.cfg.max_new_tokens > self.cfg.max_length:
                too_long += 1
                continue
            rows.append(self.prompt_row(ex, ids))
        if too_long:
            log.warning(
                "%d prompts dropped: prompt + max_new_tokens is longer than max_length=%d",
                too_long,
                self.cfg.max_length,
            )
        if not rows:
            raise UserError(
                f"every prompt is longer than max_length - max_new_tokens "
                f"({self.cfg.max_length} - {self.cfg.max_new_tokens}); raise `max_length`"
            )
        return rows

    def prompt_row(self, ex: Example, prompt_ids: list[int]) -> dict:
        """The row a rollout samples from: the prompt's tokens and messages, the columns rewards read."""
        return {"prompt_ids": prompt_ids, "prompt": ex.prompt, "columns": ex.extra, "where": ex.where}

    def build(self) -> None:
        super().build()
        # no dropout in RL (as TRL): the log-probs scored at rollout time and those of the first update must
        # be the same function, or the ratio is not 1 before any step (LoRA dropout, GPT-2-style models)
        for module in self.model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0

    @staticmethod
    def rng_state(rng: random.Random) -> list:
        version, internal, gauss = rng.getstate()
        return [version, list(internal), gauss]

    @staticmethod
    def set_rng_state(rng: random.Random, state: list) -> None:
        rng.setstate((state[0], tuple(state[1]), state[2]))

    def build_rewards(self) -> None:
        cfg = self.cfg
        self.reward_funcs = build_reward_funcs(
            cfg.reward_funcs or [], cfg.format_pattern, cfg.length_target, self.given_reward_funcs
        )
        columns = set(self.train_rows[0]["columns"])
        check_columns(self.reward_funcs, columns, f"dataset {cfg.dataset}")
        self.reward_scorer = (
            RewardModelScorer(
                cfg.reward_model, trust_remote_code=cfg.trust_remote_code, model_type=cfg.reward_model_type
            )
            if cfg.reward_model
            else None
        )
        self.build_eval_funcs()
        self.judge = build_judge_reward(cfg)
        n = len(self.reward_funcs) + sum(1 for x in (self.reward_scorer, self.judge, cfg.environment) if x)
        self.reward_weights = torch.tensor(cfg.reward_weights or [1.0] * n, dtype=torch.float32)
        self.engine = None
        if cfg.rollout_backend == "vllm":
            self.engine = VLLMEngine(cfg.model_name_or_path, self.tokenizer)
        if cfg.tools or cfg.environment:
            if not self.multi_turn:
                raise UserError(
                    f"`{'tools' if cfg.tools else 'environment'}`: multi-turn rollouts are supported by stages grpo "
                    f"and ppo for now, not {cfg.stage}"
                )
            self.episodes = build_environment(cfg.tools, cfg.environment, cfg.tool_timeout)

    def build_eval_funcs(self) -> None:
        """The held-out scorers (`eval_reward_funcs`), checked against the held-out prompts' columns."""
        cfg = self.cfg
        pattern, target = (
            getattr(cfg, k, getattr(OnlineConfig, k)) for k in ("format_pattern", "length_target")
        )
        self.eval_funcs = build_reward_funcs(
            cfg.eval_reward_funcs or [], pattern, target, self.given_reward_funcs
        )
        if self.eval_rows and self.eval_funcs:
            check_columns(self.eval_funcs, set(self.eval_rows[0]["columns"]), "the held-out prompts")

    def held_out_anchor(self) -> Any:
        """The frozen model the held-out `kl` is measured against (a `Reference`), or None for no KL: the
        reference policy here; distillation's teacher."""
        return getattr(self, "reference", None)

    def language_model(self, model: nn.Module) -> nn.Module:
        """The causal LM that samples (unwrapped from DDP); PPO's is its actor."""
        return getattr(model, "module", model)

    @torch.no_grad()
    def held_out(self, model: nn.Module, device: torch.device) -> dict[str, list[float]]:
        """The policy on the held-out prompts, one greedy completion each, per prompt: the total training reward
        (`reward`; none for a stage without rewards), each reward (`reward/<name>`), each `eval_reward_funcs`
        function (by its name), the answer's length in tokens (`length`; an episode's last answer) and, with a
        reference (or teacher), its log-ratio to it (`kl`, nats per completion)."""
        policy, rows, out = self.language_model(model), self.eval_rows or [], {}
        bs, anchor = self.cfg.per_device_eval_batch_size, self.held_out_anchor()
        for i in range(0, len(rows), bs):
            chunk = rows[i : i + bs]
            samples = self.sample(policy, chunk, 1, temperature=0.0)
            values = {}
            if self.rewarded:
                total, parts = self.rewards(chunk, samples, 1, device)
                values = {"reward": total, **{f"reward/{k}": v for k, v in parts.items()}}
            values.update(self._eval_scores(chunk, samples))
            values["length"] = self._answer_lengths(samples)
            if anchor is not None:
                values["kl"] = self._log_ratio(policy, samples, device, anchor)
            for key, v in values.items():
                out.setdefault(key, []).extend(float(x) for x in v)
        return out

    def _answer_lengths(self, samples: Samples) -> torch.Tensor:
        """Tokens of each answer the rewards score: the completion; for an episode, its last answer only (a
        policy that learns to call a tool writes longer episodes by design, not longer answers)."""
        if isinstance(samples, EpisodeSamples):
            encode = self.tokenizer
            return torch.tensor(
                [float(len(encode(t, add_special_tokens=False)["input_ids"])) for t in samples.texts]
            )
        return torch.tensor([float(len(c)) for c in samples.completion_ids])

    def _eval_scores(self, rows: list[dict], samples: Samples) -> dict[str, torch.Tensor]:
        if not self.eval_funcs:
            return {}
        prompts = [self.tokenizer.decode(r["prompt_ids"], skip_special_tokens=True) for r in rows]
        columns = {k: [r["columns"].get(k) for r in rows] for k in rows[0]["columns"]}
        return score(self.eval_funcs, prompts, samples.texts, columns, [r["where"] for r in rows])

    def _log_ratio(
        self, model: nn.Module, samples: Samples, device: torch.device, anchor: Any
    ) -> torch.Tensor:
        """sum_t log pi(y_t) - log pi_ref(y_t) over each completion's tokens (N,), at temperature 1."""
        batch = self.sequence_batch(
            [
                {"prompt_ids": p, "completion_ids": c or [self.tokenizer.eos_token_id]}
                for p, c in zip(samples.prompt_ids, samples.completion_ids)
            ],
            device,
        )
        n = batch["input_ids"].shape[0]
        ours = completion_token_stats(
            model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        )
        with anchor.active(model, device) as ref:
            theirs = completion_token_stats(
                ref, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
            )
        return per_row_sum((ours.logps - theirs.logps).float(), ours.rows, n).cpu()

    def sample(
        self, model: nn.Module, rows: list[dict], num_generations: int, temperature: float | None = None
    ) -> Samples:
        """`num_generations` completions per row (at `temperature`, default the config's; 0: greedy), or with
        tools / an environment that many episodes per row."""
        if self.episodes is None:
            return self._sample_once(model, rows, num_generations, temperature)
        make_env, schemas = self.episodes
        starts = [{"prompt": r["prompt"], **r["columns"]} for r in rows for _ in range(num_generations)]

        def draw(contexts: list[list[int]]) -> Samples:
            return self._sample_once(model, [{"prompt_ids": c} for c in contexts], 1, temperature)

        played = run_episodes(draw, self.tokenizer, starts, make_env, self.cfg.max_turns, schemas)
        return EpisodeSamples.from_episodes(played, self.tokenizer, schemas, self.cfg.max_length)

    def _sample_once(
        self, model: nn.Module, rows: list[dict], num_generations: int, temperature: float | None = None
    ) -> Samples:
        cfg = self.cfg
        policy = getattr(model, "module", model)
        args = (
            [r["prompt_ids"] for r in rows],
            num_generations,
            cfg.max_new_tokens,
            cfg.temperature if temperature is None else temperature,
            cfg.top_p,
            cfg.top_k,
            cfg.stop_strings,
        )
        if self.engine is not None:
            self.engine.push_weights(policy)
            return self.engine.sample(*args)
        return sample_hf(policy, self.tokenizer, *args)

    def rewards(
        self, rows: list[dict], samples: Samples, num_generations: int, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total reward (N,) and each component (N,), with the truncation penalties applied to the total."""
        cfg = self.cfg
        per_row = [r for r in rows for _ in range(num_generations)]
        prompt_texts = [self.tokenizer.decode(r["prompt_ids"], skip_special_tokens=True) for r in per_row]
        columns = {k: [r["columns"].get(k) for r in per_row] for k in per_row[0]["columns"]}
        parts = score(self.reward_funcs, prompt_texts, samples.texts, columns, [r["where"] for r in per_row])
        if self.reward_scorer is not None:
            parts["reward_model"] = self.reward_scorer(
                [r["prompt"] for r in per_row], samples.texts, device
            ).cpu()
        if self.judge is not None:  # NaN where the verdict did not parse: no judge reward for that sample
            parts["judge"] = self.judge([r["prompt"] for r in per_row], samples.texts, num_generations)
        if cfg.environment and isinstance(samples, EpisodeSamples):  # the environment's own reward, or none
            parts["environment"] = torch.tensor(
                [float("nan") if r is None else r for r in samples.env_rewards]
            )
        stacked = torch.stack(list(parts.values()), dim=1)  # (N, F)
        total = torch.nansum(stacked * self.reward_weights, dim=1)
        truncated = torch.tensor(samples.truncated)
        if cfg.missing_eos_penalty is not None:
            total = total - cfg.missing_eos_penalty * truncated.float()
        if getattr(cfg, "overlong_buffer_len", None):
            lengths = torch.tensor([len(c) for c in samples.completion_ids])
            overlong = dapo_overlong_penalty(
                lengths, cfg.max_new_tokens, cfg.overlong_buffer_len, cfg.overlong_penalty_factor
            )
            parts["overlong"] = overlong
            total = total + overlong
        return total, parts

    def token_stats(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> TokenStats:
        """Completion-token stats under the sampling temperature (the distribution the rollout drew from)."""
        return completion_token_stats(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["completion_mask"],
            temperature=self.cfg.temperature,
        )

    def sequence_batch(
        self, samples: list[dict], device: torch.device | None = None
    ) -> dict[str, torch.Tensor]:
        """prompt + completion rows of buffer samples, padded, with their completion mask."""
        batch = sequences(
            [s["prompt_ids"] for s in samples],
            [s["completion_ids"] for s in samples],
            self.tokenizer.pad_token_id,
        )
        if "completion_mask" in samples[0]:  # multi-turn: observations inside the completion are not trained
            masks = [[0] * len(s["prompt_ids"]) + s["completion_mask"] for s in samples]
            batch["completion_mask"] = pad(masks, 0)
        return {k: v.to(device) for k, v in batch.items()} if device is not None else batch

    # -- rewards in the buffer, the batch and the metrics (GRPO and PPO alike)
    @staticmethod
    def reward_entries(parts: dict[str, torch.Tensor], i: int) -> dict[str, float]:
        """Sample i's reward components as buffer entries, "r/<name>"."""
        return {f"r/{k}": float(v[i]) for k, v in parts.items()}

    @staticmethod
    def collate_rewards(samples: list[dict], batch: dict[str, torch.Tensor]) -> None:
        """The samples' reward components (and an episode's turns and error observations) into `batch`, one (B,)
        tensor each."""
        for key in samples[0]:
            if key.startswith("r/") or key in ("turns", "tool_errors"):
                batch[key] = torch.tensor([float(s[key]) for s in samples])

    @staticmethod
    def reward_metrics(reward: torch.Tensor, batch: dict[str, torch.Tensor]) -> Metrics:
        """Per sample: the logged reward's mean (and square, for `reward/std`), each component's mean."""
        n = float(batch["input_ids"].shape[0])
        out: Metrics = {"reward/mean": (reward.sum(), n), "_reward_sq": ((reward**2).sum(), n)}
        for key in batch:
            if key.startswith("r/"):  # a component a sample lacks (an unparsable verdict: NaN) is left out
                missing = torch.isnan(batch[key])
                out[f"rewards/{key[2:]}/mean"] = (batch[key].nan_to_num().sum(), (~missing).sum().float())
                if key == "r/judge":
                    out["rewards/judge/unparsable"] = (missing.float().sum(), n)
            elif key in (
                "turns",
                "tool_errors",
            ):  # multi-turn episodes: model turns and error observations each
                out[f"episode/{key}"] = (batch[key].sum(), n)
        return out

    def finalize_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        if "_reward_sq" in metrics:
            metrics["reward/std"] = max(metrics.pop("_reward_sq") - metrics["reward/mean"] ** 2, 0.0) ** 0.5
        return metrics

    def update_batches(self, buffer: list[dict], update: int) -> list[list[dict]]:
        """The whole buffer in `gradient_accumulation_steps` micro-batches (the same count on every process, so
        some may be empty when a process's buffer is small: the loop runs those as zero-weight fillers)."""
        accum = self.cfg.gradient_accumulation_steps
        size = max(-(-len(buffer) // accum), 1)
        return [buffer[i * size : (i + 1) * size] for i in range(accum)]
