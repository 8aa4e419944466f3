"""The online-RL losses as pure functions (tensors in, numbers out, no model): the GRPO family's registries and
pieces, the clipped surrogate and value losses, k3 KL, DAPO's overlong penalty, GAE and whitening, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses.rl import (
    ADVANTAGE_ESTIMATORS,
    GRPO_LOSS_TYPES,
    GRPO_LOSSES,
    GRPOLossSpec,
    clipped_surrogate,
    clipped_value_loss,
    dapo_overlong_penalty,
    dr_grpo_advantages,
    gae,
    group_advantages,
    grpo_advantages,
    grpo_policy_loss,
    k3_kl,
    register_adv_est,
    register_policy_loss,
    rloo_advantages,
    seq_mean_token_mean,
    seq_mean_token_sum_norm,
    sequence_mean_ratio,
    sequence_sum_ratio,
    token_mean,
    token_ratio,
    whiten,
)

# each loss type's pieces, written out here (not read from GRPO_LOSSES) so that a wrong registry entry fails;
# tests/stages/test_online_grpo.py runs each through the loop
WRITTEN_OUT = {
    "grpo": GRPOLossSpec(grpo_advantages, token_ratio, seq_mean_token_mean),
    "dr_grpo": GRPOLossSpec(dr_grpo_advantages, token_ratio, seq_mean_token_sum_norm),
    "dapo": GRPOLossSpec(
        grpo_advantages, token_ratio, token_mean, average_over="tokens", dynamic_sampling=True
    ),
    "gspo": GRPOLossSpec(grpo_advantages, sequence_mean_ratio, seq_mean_token_mean),
    "rloo": GRPOLossSpec(rloo_advantages, sequence_sum_ratio, seq_mean_token_mean, kl_in_reward=True),
}

# two completions of 2 and 3 tokens, token ratios [1.5, 0.9] and [1.0, 1.3, 0.7], advantages 1 and -2
RATIOS = [1.5, 0.9, 1.0, 1.3, 0.7]
LOGPS = torch.log(torch.tensor(RATIOS))  # (5,) against old log-probs of 0
OLD = torch.zeros(5)
ROWS = torch.tensor([0, 0, 1, 1, 1])
ADV = torch.tensor([1.0, -2.0])


def _loss(spec: GRPOLossSpec, **kw: object) -> tuple[float, list[bool]]:
    """The hand-computed batch above through `grpo_policy_loss`, clip range 0.2, max_new_tokens 4."""
    out, clipped, _ = grpo_policy_loss(LOGPS, OLD, ADV, ROWS, spec, 0.2, 0.2, 4, **kw)
    return out.item(), clipped.tolist()


def test_the_registries_hold_each_variants_pieces() -> None:
    assert GRPO_LOSSES == WRITTEN_OUT
    assert tuple(GRPO_LOSS_TYPES) == ("grpo", "dr_grpo", "dapo", "gspo", "rloo")
    assert ADVANTAGE_ESTIMATORS == {
        "grpo": grpo_advantages,
        "dr_grpo": dr_grpo_advantages,
        "rloo": rloo_advantages,
    }


def test_registering_a_variant_makes_it_a_loss_type_and_a_name_is_taken_once() -> None:
    toy = GRPOLossSpec(dr_grpo_advantages, sequence_mean_ratio, token_mean, average_over="tokens")
    types = GRPO_LOSS_TYPES  # bound before the registration, as the config module binds it
    try:
        assert register_policy_loss("toy", toy) is toy
        assert "toy" in types and GRPO_LOSSES["toy"] is toy
        with pytest.raises(ValueError, match="`toy` is already registered"):
            register_policy_loss("toy", WRITTEN_OUT["grpo"])
        assert GRPO_LOSSES["toy"] is toy
    finally:
        GRPO_LOSSES.pop("toy", None)
    assert "toy" not in types
    with pytest.raises(ValueError, match="`grpo` is already registered"):
        register_adv_est("grpo")(dr_grpo_advantages)
    assert ADVANTAGE_ESTIMATORS["grpo"] is grpo_advantages
    with pytest.raises(
        ValueError, match="unknown advantage estimator grpoo; registered: grpo, dr_grpo, rloo"
    ):
        group_advantages(torch.zeros(4), 2, "grpoo")


def test_group_advantages_by_hand() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of 4
    grpo = group_advantages(r, 4, "grpo")
    std = math.sqrt(((0.5**2) * 4) / 3)  # unbiased std of [1, 0, 0, 1]
    assert grpo[:4].tolist() == pytest.approx(
        [0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 1 + [-0.5 / (std + 1e-4), 0.5 / (std + 1e-4)], rel=1e-5
    )
    assert grpo[4:].tolist() == [0.0] * 4  # a group with one reward teaches nothing
    assert group_advantages(r, 4, "dr_grpo")[:4].tolist() == [0.5, -0.5, -0.5, 0.5]
    # RLOO: r_i - mean of the other three
    assert group_advantages(r, 4, "rloo")[:4].tolist() == pytest.approx(
        [1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3]
    )


def test_clipped_surrogate_and_clip_higher() -> None:
    logp, old = torch.log(torch.tensor([1.5, 0.5, 1.1])), torch.zeros(3)  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([1.0, -1.0, 1.0])
    loss, clipped = clipped_surrogate(logp, old, adv, 0.2, 0.2)
    assert loss.tolist() == pytest.approx([-1.2, 0.8, -1.1], rel=1e-6)  # min(r A, clip(r) A), negated
    assert clipped.tolist() == [True, True, False]
    loss_hi, clipped_hi = clipped_surrogate(logp, old, adv, 0.2, 0.6)  # DAPO clip-higher lets 1.5 through
    assert loss_hi[0].item() == pytest.approx(-1.5) and not clipped_hi[0]


def test_grpo_family_aggregations_by_hand() -> None:
    """The batch above, clip range 0.2. Per-token clipped losses: [-1.2, -0.9] and [2.0, 2.6, 1.6] (the
    pessimistic term for A < 0)."""
    seq_mean, clipped = _loss(WRITTEN_OUT["grpo"])  # per-completion token mean, summed over completions
    assert seq_mean == pytest.approx((-1.2 - 0.9) / 2 + (2.0 + 2.6 + 1.6) / 3, rel=1e-6)
    assert clipped == [True, False, False, False, True]
    assert _loss(WRITTEN_OUT["dr_grpo"])[0] == pytest.approx((-2.1 + 6.2) / 4, rel=1e-6)  # / max_new_tokens
    assert _loss(WRITTEN_OUT["dapo"])[0] == pytest.approx(
        -2.1 + 6.2, rel=1e-6
    )  # token sum (the loop divides)
    # GSPO: one ratio per completion, the geometric mean of its token ratios, clipped as a whole
    s0, s1 = math.sqrt(1.5 * 0.9), (1.0 * 1.3 * 0.7) ** (1 / 3)
    gspo, seq_clipped = _loss(WRITTEN_OUT["gspo"])
    assert gspo == pytest.approx(-s0 * 1.0 + s1 * 2.0, rel=1e-6) and seq_clipped == [False, False]
    # RLOO: the whole completion's ratio, 1.35 (clipped to 1.2, A > 0) and 0.91; the KL is in the reward
    rloo, seq_clipped = _loss(WRITTEN_OUT["rloo"])
    assert rloo == pytest.approx(-1.2 * 1.0 + 0.91 * 2.0, rel=1e-6) and seq_clipped == [True, False]
    with pytest.raises(ValueError, match="KL penalty in the reward"):
        _loss(WRITTEN_OUT["rloo"], ref_logps=OLD, beta=0.1)
    # beta * k3 KL per token, added before aggregation; with ref = old, k3 = 1/r + log r - 1; by default
    # weighted by the (unclipped) ratio r (DeepSeek-V3.2's bias correction), else not
    k3 = [1 / r + math.log(r) - 1 for r in RATIOS]
    with_kl, _ = _loss(WRITTEN_OUT["dapo"], ref_logps=OLD, beta=0.1)
    assert with_kl == pytest.approx(4.1 + 0.1 * sum(r * k for r, k in zip(RATIOS, k3)), rel=1e-6)
    plain_kl, _ = _loss(WRITTEN_OUT["dapo"], ref_logps=OLD, beta=0.1, kl_bias_correction=False)
    assert plain_kl == pytest.approx(4.1 + 0.1 * sum(k3), rel=1e-6)
    # the gradient flows through the policy log-probs: d/dlogp of -r*A at an unclipped token is -r*A
    lp = LOGPS.clone().requires_grad_(True)
    grpo_policy_loss(lp, OLD, ADV, ROWS, WRITTEN_OUT["dapo"], 0.2, 0.2, 4)[0].backward()
    assert lp.grad.tolist() == pytest.approx([0.0, -0.9, 2.0, 2.6, 0.0], abs=1e-6)


def test_a_per_completion_loss_counts_on_each_of_its_tokens_under_the_token_aggregations() -> None:
    """GSPO's ratio with DAPO's or Dr. GRPO's aggregation (not registered: what a new variant may combine):
    each completion's surrogate -s A weighs as its 2 and 3 tokens; the KL stays per token, weighted by s."""
    s0, s1 = math.sqrt(1.5 * 0.9), (1.0 * 1.3 * 0.7) ** (1 / 3)
    by_tokens = GRPOLossSpec(grpo_advantages, sequence_mean_ratio, token_mean, average_over="tokens")
    assert _loss(by_tokens)[0] == pytest.approx(-s0 * 1.0 * 2 + s1 * 2.0 * 3, rel=1e-6)
    by_max_len = GRPOLossSpec(grpo_advantages, sequence_mean_ratio, seq_mean_token_sum_norm)
    assert _loss(by_max_len)[0] == pytest.approx((-s0 * 2 + s1 * 2.0 * 3) / 4, rel=1e-6)
    k3 = [1 / r + math.log(r) - 1 for r in RATIOS]
    kl = 0.1 * (s0 * (k3[0] + k3[1]) + s1 * (k3[2] + k3[3] + k3[4]))
    with_kl, _ = _loss(by_tokens, ref_logps=OLD, beta=0.1)
    assert with_kl == pytest.approx(-s0 * 2 + s1 * 6 + kl, rel=1e-6)


@pytest.mark.parametrize("loss_type", list(WRITTEN_OUT))
def test_each_variants_loss_sum_is_the_sum_over_its_completions(loss_type: str) -> None:
    """The loop divides the micro-batches' sums by the global batch's count, so a loss sum must split over any
    partition of the completions (micro-batches, processes) and add back up to the same value."""
    spec = GRPO_LOSSES[loss_type]
    kw = {} if spec.kl_in_reward else {"ref_logps": OLD + 0.3, "beta": 0.1}
    whole = grpo_policy_loss(LOGPS, OLD, ADV, ROWS, spec, 0.2, 0.28, 4, **kw)[0]
    parts = [
        grpo_policy_loss(
            LOGPS[ROWS == i],
            OLD[ROWS == i],
            ADV[i : i + 1],
            torch.zeros(int((ROWS == i).sum()), dtype=torch.long),
            spec,
            0.2,
            0.28,
            4,
            **({k: v[ROWS == i] if k == "ref_logps" else v for k, v in kw.items()}),
        )[0]
        for i in range(2)
    ]
    assert whole.item() == pytest.approx(sum(p.item() for p in parts), rel=1e-6)
    assert abs(whole.item()) > 0.1  # not a sum of zeros


def test_clipped_value_loss_by_hand() -> None:
    values, old, ret = (
        torch.tensor([1.0, 0.5, 2.0]),
        torch.tensor([0.5, 0.5, 1.0]),
        torch.tensor([2.0, 0.0, 1.5]),
    )
    vf = clipped_value_loss(values, old, ret, 0.2)
    # clipped values 0.7, 0.5, 1.2; the larger of the two squared errors, halved
    assert vf.tolist() == pytest.approx([0.5 * 1.3**2, 0.5 * 0.5**2, 0.5 * 0.5**2], rel=1e-6)


def test_k3_kl_overlong_gae_whiten_by_hand() -> None:
    kl = k3_kl(torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -1.5]))
    assert kl.tolist() == pytest.approx([0.0, math.exp(0.5) - 0.5 - 1], rel=1e-6)
    pen = dapo_overlong_penalty(torch.tensor([10, 12, 14, 16]), max_new_tokens=16, buffer_len=4)
    assert pen.tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0])
    # GAE with gamma=1, lam=1 gives returns-to-go minus the value; mask stops at each row's end
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, 0.6], [0.1, 0.3, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([1 - 0.2, 1 - 0.4, 1 - 0.6])
    assert adv[1].tolist() == pytest.approx([2.5 - 0.1, 2.0 - 0.3, 0.0])
    assert ret[1].tolist() == pytest.approx([2.5, 2.0, 0.0])
    adv2, _ = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    d2 = 1.0 - 0.6
    d1 = 0.0 + 0.9 * 0.6 - 0.4
    assert adv2[0, 1].item() == pytest.approx(d1 + 0.45 * d2)
    w = whiten(torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert w[:3].mean().item() == pytest.approx(0.0, abs=1e-6) and w[3].item() == 0.0


@pytest.mark.parametrize("module", ["tokens", "registry", "preference", "unpaired", "rl"])
def test_the_losses_import_only_torch(module: str) -> None:
    """A loss is a pure function over tensors: the losses import torch and each other (and alignkit's error
    helpers), never a config, a model or the loop."""
    import ast
    import importlib
    import inspect

    tree = ast.parse(inspect.getsource(importlib.import_module(f"alignkit.losses.{module}")))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    ours = {name for name in imported if name.startswith("alignkit")}
    assert ours <= {f"alignkit.losses.{m}" for m in ("tokens", "registry")} | {"alignkit.errors"}, ours
    stdlib = {"__future__", "collections.abc", "dataclasses", "typing", "functools", "inspect", "math"}
    assert imported - ours <= stdlib | {"torch", "torch.nn.functional"}, imported - ours
