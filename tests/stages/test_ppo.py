"""PPO's maths on a fixed rollout, against hand computations in plain Python (alignkit issue 8, finding 9).

The rollout: four sampled completions of 3, 1, 0 and 4 tokens (the empty one is dropped by the stage), with
hand-made policy / reference log-probs, critic values and scores. Each piece is checked against a loop written
here, never against the library's own function: where the score lands, the per-token KL penalty, GAE, the
value targets, the whitening, and the clipped policy and value losses, first through the stage's own rollout
and step (models replaced by the fixed tensors), then piece by piece.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch

from alignkit.config import PPOConfig
from alignkit.generation.rollout import Samples
from alignkit.losses.rl import (
    clipped_surrogate,
    clipped_value_loss,
    gae,
    pad_right,
    ppo_advantages,
    ppo_token_rewards,
    whiten,
)
from alignkit.modeling.logprobs import TokenStats
from alignkit.stages import ppo as ppo_module
from alignkit.stages.ppo import PPOStage

PROMPTS = [[5, 6], [7], [8, 9, 10], [11]]
COMPLETIONS = [[1, 2, 3], [4], [], [5, 6, 7, 8]]
RAW_SCORES = [1.5, -0.5, 9.0, 2.0]  # the empty completion's 9.0 must reach no token
# per kept completion (the empty one dropped): log pi, log ref, V(state before the token)
LOGPS = [[-1.0, -0.5, -2.0], [-0.3], [-1.2, -0.7, -0.1, -2.5]]
REF = [[-1.1, -0.9, -1.5], [-0.6], [-1.0, -1.0, -0.4, -2.0]]
VALUES = [[0.5, 0.2, -0.1], [1.0], [0.0, 0.3, 0.6, 0.9]]
SCORES = [1.5, -0.5, 2.0]
KL_COEF, GAMMA, LAM = 0.2, 0.9, 0.8


# ------------------------------------------------------------------------ by hand, in plain Python
def hand_rewards(kl_coef: float = KL_COEF) -> list[list[float]]:
    """-kl_coef * (log pi - log ref) on every token; the score added on the last one."""
    out = []
    for lp, ref, score in zip(LOGPS, REF, SCORES):
        r = [-kl_coef * (a - b) for a, b in zip(lp, ref)]
        r[-1] += score
        out.append(r)
    return out


def hand_gae(rewards: list[list[float]], gamma: float = GAMMA, lam: float = LAM) -> list[list[float]]:
    """delta_t = r_t + gamma V_{t+1} - V_t (V after the last token = 0), A_t = delta_t + gamma lam A_{t+1}."""
    out = []
    for r, v in zip(rewards, VALUES):
        adv, running = [0.0] * len(r), 0.0
        for t in reversed(range(len(r))):
            next_v = v[t + 1] if t + 1 < len(r) else 0.0
            running = r[t] + gamma * next_v - v[t] + gamma * lam * running
            adv[t] = running
        out.append(adv)
    return out


def hand_returns(adv: list[list[float]]) -> list[list[float]]:
    return [[a + v for a, v in zip(ra, rv)] for ra, rv in zip(adv, VALUES)]


def hand_whiten(rows: list[list[float]]) -> list[list[float]]:
    """Mean and unbiased variance over the real tokens of the whole batch (TRL's `masked_whiten`)."""
    flat = [x for row in rows for x in row]
    mean, var = statistics.mean(flat), statistics.variance(flat)
    return [[(x - mean) / math.sqrt(var + 1e-8) for x in row] for row in rows]


# ------------------------------------------------------------------------ the stage on the fixed rollout
class _Reference:
    @contextlib.contextmanager
    def active(self, policy: object, device: torch.device) -> Iterator[str]:
        yield "reference"


def _flat(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor([x for row in rows for x in row])


def _stats(logps: torch.Tensor) -> TokenStats:
    zeros = torch.zeros_like(logps)
    return TokenStats(logps, zeros, zeros + 0.5, zeros.bool(), zeros.long())


def _stage(monkeypatch: pytest.MonkeyPatch, **keys: object) -> PPOStage:
    """A PPOStage whose sampler, rewards, log-probs and critic return the fixed rollout."""
    cfg = PPOConfig(reward_funcs=["exact_match"], gamma=GAMMA, lam=LAM, init_kl_coef=KL_COEF, **keys)
    stage = PPOStage(cfg)
    stage.tokenizer = SimpleNamespace(pad_token_id=0)
    stage.reference = _Reference()
    stage.kl_coef = KL_COEF
    samples = Samples(PROMPTS, COMPLETIONS, [False] * 4, ["t"] * 4)
    stage.sample = lambda policy, rows, n: samples
    stage.rewards = lambda rows, s, n, device: (torch.tensor(RAW_SCORES), {})

    def token_stats(model: object, batch: dict[str, torch.Tensor]) -> TokenStats:
        # the stage scores the kept completions, right-padded after their prompts: 3 + 1 + 4 tokens
        assert batch["completion_mask"].sum(1).tolist() == [3, 1, 4]
        return _stats(_flat(REF if model == "reference" else LOGPS))

    stage.token_stats = token_stats
    monkeypatch.setattr(ppo_module, "_token_values", lambda model, batch: _flat(VALUES))
    return stage


def _rollout(stage: PPOStage) -> list[dict]:
    return stage.rollout(SimpleNamespace(policy="policy"), [{}] * 4, torch.device("cpu"))


def test_rollout_targets_by_hand_without_whitening(monkeypatch: pytest.MonkeyPatch) -> None:
    """The score on the last real token, the KL penalty on every token, GAE, returns = A + V."""
    buffer = _rollout(_stage(monkeypatch, whiten_advantages=False))
    adv = hand_gae(hand_rewards())
    assert [s["completion_ids"] for s in buffer] == [c for c in COMPLETIONS if c]
    assert [s["score"] for s in buffer] == SCORES
    for s, a, ret in zip(buffer, adv, hand_returns(adv)):
        assert s["advantages"] == pytest.approx(a, abs=1e-6)
        assert s["returns"] == pytest.approx(ret, abs=1e-6)


def test_rollout_whitens_the_advantages_over_real_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whitened advantages (unbiased variance, as TRL's `masked_whiten`); the returns keep the raw ones."""
    buffer = _rollout(_stage(monkeypatch, whiten_advantages=True))
    adv = hand_gae(hand_rewards())
    for s, a, ret in zip(buffer, hand_whiten(adv), hand_returns(adv)):
        assert s["advantages"] == pytest.approx(a, abs=1e-6)
        assert s["returns"] == pytest.approx(ret, abs=1e-6)


def test_step_is_the_clipped_policy_loss_plus_the_clipped_value_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """The update on the fixed buffer: new log-probs and values moved so that some tokens clip, loss by hand."""
    stage = _stage(monkeypatch, whiten_advantages=False, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    buffer = _rollout(stage)
    batch = stage.collate(buffer)
    old, adv = _flat(LOGPS).tolist(), [a for row in hand_gae(hand_rewards()) for a in row]
    old_v, ret = _flat(VALUES).tolist(), [r for row in hand_returns(hand_gae(hand_rewards())) for r in row]
    moves = [0.5, -0.05, 0.1, -0.4, 0.0, 0.3, -0.3, 0.05]  # log-ratio per token: some past 1 +/- 0.2
    new = [o + d for o, d in zip(old, moves)]
    new_v = [v + m for v, m in zip(old_v, [0.5, -0.1, 0.3, -0.6, 0.0, 1.0, -0.25, 0.15])]
    stage.token_stats = lambda model, b: _stats(torch.tensor(new))
    monkeypatch.setattr(ppo_module, "_token_values", lambda model, b: torch.tensor(new_v))
    out = stage.step("model", batch)
    pg, vf, clipped = 0.0, 0.0, 0
    for lp, lo, a, v, vo, r in zip(new, old, adv, new_v, old_v, ret):
        ratio = math.exp(lp - lo)
        unclipped, clip = -a * ratio, -a * min(max(ratio, 0.8), 1.2)
        pg += max(unclipped, clip)
        clipped += clip > unclipped
        v_clip = min(max(v, vo - 0.2), vo + 0.2)
        vf += 0.5 * max((v - r) ** 2, (v_clip - r) ** 2)
    assert 0 < clipped < len(new)  # the hand-made moves exercise both branches
    assert out.loss_sum.item() == pytest.approx(pg + 0.1 * vf, rel=1e-6)
    clipfrac = out.metrics["policy/clipfrac"]
    assert clipfrac[0].item() / clipfrac[1] == pytest.approx(clipped / len(new))
    assert out.metrics["value/loss"][0].item() == pytest.approx(vf, rel=1e-6)


# ------------------------------------------------------------------------ the pieces, padding filled with junk
def _dense(rows: list[list[float]], fill: float = 7.0) -> torch.Tensor:
    """(B, 4) right-padded with `fill`: a value the pieces must never read."""
    return torch.tensor([row + [fill] * (4 - len(row)) for row in rows])


MASK = _dense([[1.0] * len(row) for row in LOGPS], 0.0)


def _rows(dense: torch.Tensor) -> list[list[float]]:
    return [dense[i, : len(row)].tolist() for i, row in enumerate(LOGPS)]


def _padding(dense: torch.Tensor) -> list[float]:
    return dense[MASK == 0].tolist()


def test_pad_right_lays_the_flat_tokens_out_per_completion() -> None:
    dense = pad_right(_flat(LOGPS), [3, 1, 4])
    assert (
        dense.shape == (3, 4)
        and _rows(dense) == [pytest.approx(row) for row in LOGPS]
        and _padding(dense) == [0.0] * 4
    )


def test_token_rewards_put_the_score_on_the_last_real_token_and_the_kl_on_every_token() -> None:
    rewards, kl = ppo_token_rewards(torch.tensor(SCORES), _dense(LOGPS), _dense(REF), MASK, KL_COEF)
    assert _rows(rewards) == [pytest.approx(r, abs=1e-6) for r in hand_rewards()]
    assert _padding(rewards) == [0.0] * 4 and _padding(kl) == [0.0] * 4
    assert _rows(kl) == [
        pytest.approx([a - b for a, b in zip(lp, ref)], abs=1e-6) for lp, ref in zip(LOGPS, REF)
    ]
    # no KL penalty: the score alone, on the last real token of each completion and nowhere else
    only_score, _ = ppo_token_rewards(torch.tensor(SCORES), _dense(LOGPS), _dense(REF), MASK, 0.0)
    expected = [[0.0] * (len(row) - 1) + [s] for row, s in zip(LOGPS, SCORES)]
    assert _rows(only_score) == [pytest.approx(e) for e in expected]


def test_gae_and_value_targets_match_a_backwards_loop() -> None:
    rewards = _dense(hand_rewards())
    adv, returns = gae(rewards, _dense(VALUES), MASK, GAMMA, LAM)
    hand = hand_gae(hand_rewards())
    assert _rows(adv) == [pytest.approx(a, abs=1e-6) for a in hand]
    assert _rows(returns) == [pytest.approx(r, abs=1e-6) for r in hand_returns(hand)]
    assert _padding(adv) == [0.0] * 4 and _padding(returns) == [0.0] * 4


def test_whitening_uses_the_real_tokens_only_with_the_unbiased_variance() -> None:
    """TRL's `masked_whiten`: mean and unbiased variance over the mask; the junk in the padding changes nothing."""
    adv = hand_gae(hand_rewards())
    out = whiten(_dense(adv), MASK)
    assert _rows(out) == [pytest.approx(w, abs=1e-6) for w in hand_whiten(adv)]
    assert _padding(out) == [0.0] * 4
    assert _rows(whiten(_dense(adv, fill=-300.0), MASK)) == _rows(out)
    flat = [x for row in adv for x in row]
    kept = _rows(whiten(_dense(adv), MASK, shift_mean=False))
    assert [x for row in kept for x in row] == pytest.approx(
        [w + statistics.mean(flat) for row in hand_whiten(adv) for w in row], abs=1e-6
    )


def test_ppo_advantages_whiten_after_the_returns_are_taken() -> None:
    rewards = _dense(hand_rewards())
    adv, returns = ppo_advantages(rewards, _dense(VALUES), MASK, GAMMA, LAM, whiten_advantages=True)
    hand = hand_gae(hand_rewards())
    assert _rows(adv) == [pytest.approx(w, abs=1e-6) for w in hand_whiten(hand)]
    assert _rows(returns) == [pytest.approx(r, abs=1e-6) for r in hand_returns(hand)]
    raw, _ = ppo_advantages(rewards, _dense(VALUES), MASK, GAMMA, LAM, whiten_advantages=False)
    assert _rows(raw) == [pytest.approx(a, abs=1e-6) for a in hand]


def test_clipped_losses_per_token_by_hand() -> None:
    """Clipped surrogate max(-A r, -A clip(r, 1 - 0.2, 1 + 0.3)) and 0.5 max((V - R)^2, (V_clip - R)^2)."""
    adv = [a for row in hand_gae(hand_rewards()) for a in row]
    ret = [r for row in hand_returns(hand_gae(hand_rewards())) for r in row]
    old, old_v = _flat(LOGPS), _flat(VALUES)
    new = old + torch.tensor([0.5, -0.05, 0.1, -0.4, 0.0, 0.3, -0.3, 0.05])
    new_v = old_v + torch.tensor([0.5, -0.1, 0.3, -0.6, 0.0, 1.0, -0.25, 0.15])
    pg, clipped = clipped_surrogate(new, old, torch.tensor(adv), 0.2, 0.3)
    vf = clipped_value_loss(new_v, old_v, torch.tensor(ret), 0.2)
    for i, a in enumerate(adv):
        ratio = math.exp(new[i].item() - old[i].item())
        unclipped, clip = -a * ratio, -a * min(max(ratio, 0.8), 1.3)
        assert pg[i].item() == pytest.approx(max(unclipped, clip), rel=1e-5)
        assert bool(clipped[i]) == (clip > unclipped)
        v, vo = new_v[i].item(), old_v[i].item()
        v_clip = min(max(v, vo - 0.2), vo + 0.2)
        assert vf[i].item() == pytest.approx(0.5 * max((v - ret[i]) ** 2, (v_clip - ret[i]) ** 2), rel=1e-5)
    assert 0 < int(clipped.sum()) < len(adv)


def test_adaptive_kl_leaves_a_filler_rollout_out() -> None:
    """The adaptive KL controller moves on the global batch's KL; a process whose prompts were a filler (a
    short last batch left it none) adds neither KL nor count, so the coefficient is that of the real rows."""
    cfg = PPOConfig(reward_funcs=["exact_match"], init_kl_coef=0.1, target_kl=1.0, kl_horizon=100)
    stage = PPOStage(cfg)
    stage.kl_coef = 0.1
    stage._update_kl_coef(torch.tensor([3.0, 5.0]))  # KL 4 = 4x target: error clipped to +0.2, n = 2
    assert stage.kl_coef == pytest.approx(0.1 * (1 + 0.2 * 2 / 100))
    moved = stage.kl_coef
    stage.filler_rollout = True
    stage._update_kl_coef(torch.tensor([3.0, 5.0]))
    assert stage.kl_coef == moved
