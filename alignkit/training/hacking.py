"""Reward hacking caught while it happens: the training reward's trend against held-out quality.

An online stage with `eval_dataset` / `val_size` evaluates its policy on held-out prompts every `eval_steps`
(greedy completions scored by the training rewards, `eval_reward_funcs`, length and KL to the reference), and
once before the first step (the starting policy: the baseline). At each evaluation the monitor flags the run:

- `reward_up_quality_down`: the training reward of the last evaluation interval is above that of the first
  interval (the difference's 95% interval, Welch, above 0) while the held-out `metric` is below the starting
  policy's on the same prompts (paired bootstrap 95% interval below 0);
- `length`: held-out completions are more than `length_limit` (1.5) times as long as the starting policy's;
- `kl_jump`: the held-out KL to the reference more than doubled since the last evaluation and grew by more than
  `kl_jump_nats` (1 nat per completion).

`compare`'s rule (alignkit.comparison.report.reward_hacking) judges finished runs against each other; this one
judges a run against its own start, while it trains. Thresholds are module constants so that a test pins them.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

from alignkit.data.files import write_json_atomic
from alignkit.errors import UserError
from alignkit.stats import paired_bootstrap

log = logging.getLogger("alignkit")

LENGTH_LIMIT = 1.5
KL_JUMP_FACTOR = 2.0
KL_JUMP_NATS = 1.0
MIN_WINDOW = 3  # training-reward records per window before the reward trend is judged


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def welch_interval(early: list[float], late: list[float], z: float = 1.96) -> tuple[float, float, float]:
    """mean(late) - mean(early) and its normal-approximation 95% interval (unequal variances)."""

    def var(xs: list[float]) -> float:
        m = _mean(xs)
        return sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1)

    diff = _mean(late) - _mean(early)
    half = z * math.sqrt(var(early) / len(early) + var(late) / len(late))
    return diff, diff - half, diff + half


@dataclass
class HackingMonitor:
    """The state of one run's monitor: the baseline's per-prompt values, the training rewards so far (one per
    rollout), the evaluations seen, and the flags raised."""

    metric: str  # the held-out quality metric (a key of the evaluation's per-prompt values)
    baseline: dict[str, list[float]] | None = None
    rewards: list[float] = field(default_factory=list)
    marks: list[int] = field(default_factory=list)  # len(rewards) at each evaluation after the baseline
    last: dict[str, float] = field(default_factory=dict)  # the previous evaluation's means
    flags: list[dict[str, Any]] = field(default_factory=list)

    def observe_reward(self, reward: float) -> None:
        if math.isfinite(reward):
            self.rewards.append(float(reward))

    def check(self, step: int, values: dict[str, list[float]]) -> list[dict[str, Any]]:
        """Judge the evaluation at `step` (per-prompt values, the same prompts as the baseline's); the first
        call sets the baseline and flags nothing. Returns this evaluation's flags (also kept in `flags`)."""
        means = {k: _mean(v) for k, v in values.items() if v}
        if self.baseline is None:
            self.baseline, self.last = values, means
            return []
        self.marks.append(len(self.rewards))
        found = [f for f in (self._reward_vs_quality(values), self._length(means), self._kl(means)) if f]
        found = [{"step": step, **f} for f in found]
        self.flags += found
        self.last = means
        return found

    def _reward_vs_quality(self, values: dict[str, list[float]]) -> dict[str, Any] | None:
        width = self.marks[-1] - (self.marks[-2] if len(self.marks) > 1 else 0)
        width = max(width, MIN_WINDOW)
        if len(self.rewards) < 2 * width or self.metric not in values or self.metric not in self.baseline:
            return None
        diff, lo, hi = welch_interval(self.rewards[:width], self.rewards[-width:])
        held = paired_bootstrap(values[self.metric], self.baseline[self.metric])
        if lo <= 0 or held["ci95"][1] >= 0:
            return None
        h_lo, h_hi = held["ci95"]
        return {
            "rule": "reward_up_quality_down",
            "message": (
                f"training reward rose {diff:+.3f} (95% CI {lo:+.3f} to {hi:+.3f}) while held-out {self.metric} "
                f"fell {held['diff']:+.3f} (95% CI {h_lo:+.3f} to {h_hi:+.3f}) from the starting policy's"
            ),
        }

    def _length(self, means: dict[str, float]) -> dict[str, Any] | None:
        start, now = self.baseline and _mean(self.baseline.get("length") or [0.0]), means.get("length")
        if not start or now is None or now / start <= LENGTH_LIMIT:
            return None
        return {
            "rule": "length",
            "message": f"held-out completions are {now / start:.2f}x as long as the starting policy's "
            f"({now:.1f} vs {start:.1f} tokens; limit {LENGTH_LIMIT})",
        }

    def _kl(self, means: dict[str, float]) -> dict[str, Any] | None:
        before, now = self.last.get("kl"), means.get("kl")
        if before is None or now is None:
            return None
        if now > KL_JUMP_FACTOR * max(before, 0.0) and now - before > KL_JUMP_NATS:
            return {
                "rule": "kl_jump",
                "message": f"held-out KL to the reference jumped from {before:.2f} to {now:.2f} nats per completion",
            }
        return None

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("baseline", "rewards", "marks", "last", "flags")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class OnlineEvaluation:
    """The loop's held-out evaluation of an online stage: the baseline before the first step, then every
    evaluation's means (logged as `eval_<key>`), the monitor's flags, and whether this evaluation is the best so
    far by the held-out metric (the loop then saves the model to `output_dir/best`)."""

    def __init__(self, stage: Any, cfg: Any, writes: bool) -> None:
        self.stage, self.cfg, self.writes = stage, cfg, writes
        self.monitor = HackingMonitor(cfg.held_out_metric)
        self.best: float | None = None
        self.history: list[dict[str, float]] = []

    def needs_baseline(self) -> bool:
        return self.monitor.baseline is None

    def observe(self, metrics: dict[str, float]) -> None:
        """A fresh rollout's training metrics: its mean reward joins the trend."""
        if "reward/mean" in metrics:
            self.monitor.observe_reward(metrics["reward/mean"])

    def __call__(self, step: int, model: Any, device: Any) -> tuple[dict[str, float], list[dict], bool]:
        """(eval_* means, this evaluation's flags, whether it is the best so far)."""
        values = self.stage.held_out(model, device)
        metric = self.monitor.metric
        if metric not in values:
            raise UserError(
                f"metric_for_best_model: `{metric}` is not a held-out metric of this run; "
                f"choose one of {', '.join(sorted(values))}"
            )
        flags = self.monitor.check(step, values)
        for flag in flags:
            log.warning("step %d: possible reward hacking (%s): %s", step, flag["rule"], flag["message"])
        means = {f"eval_{k}": _mean(v) for k, v in values.items() if v}
        means["eval_hacking_flags"] = float(len(self.monitor.flags))
        value = means[f"eval_{metric}"]
        best = step > 0 and (self.best is None or value > self.best)
        if best:
            self.best = value
        self.history.append({"step": step, **means})
        if self.writes:
            self._write(best_step=step if best else None)
        return means, flags, best

    def _write(self, best_step: int | None) -> None:
        """`hacking.json` in output_dir: the held-out metric, every evaluation's means, the flags, the best."""
        if best_step is not None:
            self.best_step = best_step
        report = {
            "metric": self.monitor.metric,
            "action": self.cfg.hacking_action,
            "flags": self.monitor.flags,
            "best": {"step": getattr(self, "best_step", None), "value": self.best, "folder": "best"},
            "evaluations": self.history,
        }
        write_json_atomic(os.path.join(self.cfg.output_dir, "hacking.json"), report)

    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor.state_dict(),
            "best": self.best,
            "best_step": getattr(self, "best_step", None),
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.monitor.load_state_dict(state["monitor"])
            self.best, self.best_step, self.history = state["best"], state["best_step"], state["history"]
