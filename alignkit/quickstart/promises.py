"""What the quickstart promises, as checks on its report.json: SFT learns the task and the annotator's error,
every method lifts the SFT model, the controls and the reward model behave as the README says.

Each threshold sits below the smallest value seen over 8 seeds (`python benchmarks/quickstart_seeds.py --seeds
0 1 2 3 4 5 6 7`, on a 16-core machine) and on seed 0 of a 2-core CI machine, with a margin, so floating-point
differences between machines do not flip it. A lift small on some seed (PPO with the learned reward model:
+0.02 on seed 1) is promised only as far as it holds everywhere. The test suite checks the methods it runs;
`quickstart_seeds.py --check` checks the whole table on every seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# smallest test lift over SFT each method must show (8 seeds, 16 cores: dpo +0.28, simpo +0.24, orpo +0.29,
# grpo +0.24, ppo_verifiable +0.21, kto +0.10, ppo +0.02; seed 0 on a 2-core CI machine: dpo +0.24,
# simpo +0.21, orpo +0.23, grpo +0.21, ppo_verifiable +0.14, kto +0.14, ppo +0.13)
MIN_LIFT = {
    "dpo": 0.10,
    "simpo": 0.10,
    "orpo": 0.10,
    "grpo": 0.10,
    "ppo_verifiable": 0.10,
    "kto": 0.05,
    "ppo": 0.0,
    # issue 21's rows, 5 seeds on a 2-core machine (benchmarks/quickstart_seeds.py --seeds 0 1 2 3 4 -- --methods
    # sft,grpo,online_dpo,best_of_n,distill --no-controls): smallest lifts online_dpo +0.24, best_of_n +0.32,
    # distill +0.24
    "online_dpo": 0.10,
    "best_of_n": 0.10,
    "distill": 0.10,
    # the tool rows (--methods sft,sft_tools,grpo_tools), seeds 0-4 on a 2-core machine: smallest lifts
    # sft_tools +0.14, grpo_tools +0.36
    "sft_tools": 0.05,
    "grpo_tools": 0.10,
}
MIN_CARRY_GAIN = 0.15  # every method fixes the forgotten carry (smallest over 8 seeds: ppo +0.28)


def _sft(sft: dict[str, Any]) -> list[str]:
    broken = []
    if not (sft["accuracy"] > 0.4 and sft["n"] == 300 and sft["ci95"][0] < sft["accuracy"] < sft["ci95"][1]):
        broken.append(
            f"sft: accuracy {sft['accuracy']:.3f} on n={sft['n']} (promised > 0.4 on 300, inside its CI)"
        )
    if not sft["no_carry_accuracy"] > 0.8 > 0.4 > sft["carry_accuracy"]:  # it learned the forgotten carry
        broken.append(
            f"sft: no-carry {sft['no_carry_accuracy']:.3f} / carry {sft['carry_accuracy']:.3f} accuracy "
            "(promised > 0.8 / < 0.4: the annotator's error learned)"
        )
    return broken


def _methods(methods: dict[str, Any]) -> list[str]:
    sft, broken = methods["sft"], []
    for name, row in methods.items():
        if name == "sft":
            continue
        lift, least = row["accuracy"] - sft["accuracy"], MIN_LIFT.get(name, 0.0)
        if lift <= least:
            broken.append(f"{name}: lift {lift:+.3f} over sft (promised > {least:+.2f})")
        if row["carry_accuracy"] <= sft["carry_accuracy"] + MIN_CARRY_GAIN:
            broken.append(
                f"{name}: carry accuracy {row['carry_accuracy']:.3f} vs sft {sft['carry_accuracy']:.3f} "
                f"(promised > +{MIN_CARRY_GAIN})"
            )
    return broken


def _controls(controls: dict[str, Any], sft: dict[str, Any]) -> list[str]:
    broken = []
    if "dpo_without_nll" in controls and controls["dpo_without_nll"]["accuracy"] >= sft["accuracy"]:
        broken.append("control dpo_without_nll: not below sft (plain DPO drifts; seed 0: -0.47)")
    hacked = controls.get("ppo_weak_kl")
    if hacked is not None:  # reward hacking: the reward model's score rises while solved problems are lost
        if hacked["reward_last"] <= hacked["reward_first"] + 0.1:
            broken.append(
                f"control ppo_weak_kl: reward {hacked['reward_first']:.2f} -> {hacked['reward_last']:.2f}"
            )
        if hacked["no_carry_accuracy"] >= sft["no_carry_accuracy"] - 0.05:
            broken.append("control ppo_weak_kl: no-carry accuracy did not fall (no reward hacking shown)")
    return broken


def _monitor(report: dict[str, Any]) -> list[str]:
    """The reward-hacking monitor (alignkit.training.hacking) flags no method. It is not promised to flag the
    weak-KL control: that control's held-out accuracy rose on seed 1 and, on seed 0, fell only at the last
    evaluations and by less than the paired interval (its gains on carries offset its losses elsewhere)."""
    return [
        f"{name}: flagged by the hacking monitor ({row['hacking_flags'][0]['message']})"
        for name, row in report.get("methods", {}).items()
        if row.get("hacking_flags")
    ]


def _reward_model(rm: dict[str, Any]) -> list[str]:
    """It fits its pairs and ranks held-out ones, yet prefers an off-by-one answer on carries (0.24-0.95)."""
    broken = []
    if not (rm["train_pair_accuracy"] > 0.95 and rm["test_pair_accuracy"] > 0.95):
        broken.append(
            f"reward model: pair accuracy {rm['train_pair_accuracy']:.3f} / {rm['test_pair_accuracy']:.3f}"
        )
    if rm["test_carry_prefers_answer_plus_one"] <= 0.2:
        broken.append("reward model: the carry shortcut (answer + 1 preferred) is not there")
    return broken


def _missing(
    report: dict[str, Any], methods: Sequence[str] | None, controls: Sequence[str] | None
) -> list[str]:
    """What the report should hold and does not: the methods and controls asked for (SFT always), and the
    reward model's diagnosis when PPO against it ran."""
    have_methods, have_controls = set(report.get("methods", {})), set(report.get("controls", {}))
    missing = [f"{m}: not in the report" for m in sorted({"sft", *(methods or ())} - have_methods)]
    missing += [f"control {c}: not in the report" for c in sorted(set(controls or ()) - have_controls)]
    if {"ppo", "ppo_weak_kl"} & (have_methods | have_controls) and "reward_model" not in report:
        missing.append("reward model: its diagnosis is not in the report")
    return missing


def broken_promises(
    report: dict[str, Any], methods: Sequence[str] | None = None, controls: Sequence[str] | None = None
) -> list[str]:
    """Every promise the report breaks (empty: all kept), for the methods and controls it holds; those named in
    `methods` / `controls` must be there (a run that left one out keeps no promise about it)."""
    broken = _missing(report, methods, controls)
    if "sft" not in report.get("methods", {}):
        return broken
    if report["base_accuracy"] >= 0.05:
        broken.append(f"base accuracy {report['base_accuracy']} (random init)")
    sft = report["methods"]["sft"]
    broken += _sft(sft) + _methods(report["methods"]) + _controls(report.get("controls", {}), sft)
    broken += _monitor(report)
    if "reward_model" in report:
        broken += _reward_model(report["reward_model"])
    return broken
