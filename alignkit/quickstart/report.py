"""The quickstart's measurements: accuracy on a problem set, the reward model's diagnosis, the report files.

Every number in the quickstart's README table comes from here, so anyone can reproduce it with
`alignkit quickstart` (one seed) or `python benchmarks/quickstart_seeds.py` (several).
"""

from __future__ import annotations

import json
import os
from typing import Any

from alignkit.generation.rewards import RewardModelScorer
from alignkit.generation.rollout import complete
from alignkit.quickstart.task import Problem, add, parse_answer
from alignkit.stats import wilson_interval


def accuracy(model_dir: str, problems: list[Problem]) -> dict[str, Any]:
    """Greedy exact-match accuracy, overall (with n and a 95% Wilson interval) and split by carry."""
    tok, model = _load(model_dir)
    outs = complete(model, tok, [p.messages() for p in problems], max_new_tokens=5, batch_size=150).texts
    return _scored(outs, problems)


def tool_accuracy(model_dir: str, problems: list[Problem], max_turns: int = 2) -> dict[str, Any]:
    """`accuracy` of a model that may call the `add` tool: each problem is a greedy episode (a call, its result as
    a tool turn, then the answer) of at most `max_turns` model turns; the last answer is scored. Adds the share
    of episodes that called the tool (`tool_calls`)."""
    from alignkit.generation.rollout import sample_hf
    from alignkit.generation.tools import ToolEnvironment, run_episodes, tool_schema

    tok, model = _load(model_dir)
    episodes = []
    for i in range(0, len(problems), 150):
        chunk = problems[i : i + 150]
        episodes += run_episodes(
            lambda contexts: sample_hf(model, tok, contexts, 1, max_new_tokens=40, temperature=0.0),
            tok,
            [{"prompt": p.messages()} for p in chunk],
            lambda: ToolEnvironment({"add": add}),
            max_turns,
            [tool_schema(add)],
        )
    called = sum(any(m["role"] == "tool" for m in ep.messages) for ep in episodes)
    return {
        **_scored([ep.answer for ep in episodes], problems),
        "tool_calls": round(called / len(episodes), 4),
    }


def _load(model_dir: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)


def _scored(outs: list[str], problems: list[Problem]) -> dict[str, Any]:
    right = [parse_answer(o) == p.answer for o, p in zip(outs, problems)]

    def share(sel: list[bool]) -> float:
        picked = [r for r, s in zip(right, sel) if s]
        return round(sum(picked) / max(len(picked), 1), 4)

    lo, hi = wilson_interval(sum(right), len(right))
    return {
        "accuracy": share([True] * len(problems)),
        "n": len(problems),
        "ci95": [round(lo, 4), round(hi, 4)],
        "carry_accuracy": share([p.carry for p in problems]),
        "no_carry_accuracy": share([not p.carry for p in problems]),
    }


def _share_preferred(scorer: Any, prompts: list, better: list[str], worse: list[str]) -> float:
    import torch

    device = torch.device("cpu")
    s_better = scorer(prompts, better, device)
    s_worse = scorer(prompts, worse, device)
    return round((s_better > s_worse).float().mean().item(), 4)


def reward_model_diagnosis(rm_dir: str, pairs_file: str, test: list[Problem]) -> dict[str, float]:
    """What the reward model learned: does it fit its pairs, does it rank held-out pairs, and does it check
    the ones digit (correct answer vs answer + 1 on held-out carry problems)?"""

    scorer = RewardModelScorer(rm_dir)
    with open(pairs_file, encoding="utf-8") as fh:
        pairs = [json.loads(line) for line in fh]
    carry = [p for p in test if p.carry]
    return {
        "train_pair_accuracy": _share_preferred(
            scorer,
            [r["prompt"] for r in pairs],
            [r["chosen"][0]["content"] for r in pairs],
            [r["rejected"][0]["content"] for r in pairs],
        ),
        "test_pair_accuracy": _share_preferred(
            scorer,
            [p.messages() for p in test],
            [str(p.answer) for p in test],
            [str(p.wrong()) for p in test],
        ),
        "test_carry_prefers_answer_plus_one": _share_preferred(
            scorer,
            [p.messages() for p in carry],
            [str(p.answer + 1) for p in carry],
            [str(p.answer) for p in carry],
        ),
    }


def reward_trend(run_dir: str, window: int = 3) -> dict[str, float]:
    """Mean `reward/mean` of the first and last `window` logged steps of an online run ({} for an offline one,
    which logs no reward)."""
    key = "reward/mean"
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        records = list(map(json.loads, fh))
    if not any(key in r for r in records):  # online DPO logs its samples' mean reward as objective/scores
        key = "objective/scores"
    rows = [r for r in records if key in r]
    if not rows:
        return {}
    first, last = rows[:window], rows[-window:]
    out: dict[str, Any] = {
        "reward_first": round(sum(r[key] for r in first) / len(first), 4),
        "reward_last": round(sum(r[key] for r in last) / len(last), 4),
    }
    hacking = os.path.join(run_dir, "hacking.json")
    if os.path.exists(hacking):  # the monitor's flags while it trained (see alignkit.training.hacking)
        with open(hacking, encoding="utf-8") as fh:
            out["hacking_flags"] = json.load(fh)["flags"]
    return out


NOTES = """Every method after SFT starts from the SFT model. `dpo` is DPO plus the NLL of the chosen answer (RPO)
and `simpo` SimPO plus that NLL; `orpo` has its own NLL term; `kto` has none. `grpo` samples 8 answers per
prompt and rewards exact answers. `ppo` is the classic recipe: a reward model trained (`stage: rm`) on the
task's pairs, then PPO against it; `ppo_verifiable` is the same PPO with the exact-answer reward.
`online_dpo` learns from its own samples (4 per prompt, best vs worst by the exact answer); the control
`online_dpo_rm` is the same ranked by PPO's reward model, which it hacks; `best_of_n` is SFT on the SFT
model's exactly right samples (rejection sampling); `distill` distils the GRPO model into the SFT model on the
student's own samples (GKD, reverse KL). `sft_tools` is the SFT model taught from transcripts in which the
annotator calls an `add(a, b)` tool on half of the problems; `grpo_tools` is GRPO with that tool from it
(episodes: a call, its result, the answer); both are measured in episodes with the tool. The online rows evaluate on the validation prompts while they train, and the reward-hacking monitor's verdict
is printed under the table.

Problems are split on unordered pairs (a + b and b + a fall on the same side): the recipes were chosen on the
validation set, and the accuracy column is the untouched test set, with its 95% Wilson interval. On 300
problems that interval is about +-0.05: read differences smaller than that as noise.

The controls answer "what does each ingredient add?": `sft_on_chosen` trains only the NLL of the chosen
answers, `dpo_without_nll` only the DPO loss. `ppo_weak_kl` runs the same PPO with a tenth of the KL penalty,
and shows how far the policy follows the reward model when the KL penalty does not hold it back."""


def render_table(report: dict[str, Any]) -> str:
    lines = [
        "| model | test accuracy | 95% CI | carry | no carry | validation | wall s |",
        "|---|---|---|---|---|---|---|",
        f"| base (random init) | {report['base_accuracy']:.3f} | | | | | |",
    ]
    rows = list(report["methods"].items()) + [
        (f"control: {k}", v) for k, v in report.get("controls", {}).items()
    ]
    for name, r in rows:
        lo, hi = r["ci95"]
        lines.append(
            f"| {name} | {r['accuracy']:.3f} | {lo:.3f}-{hi:.3f} | {r['carry_accuracy']:.3f} "
            f"| {r['no_carry_accuracy']:.3f} | {r['validation']['accuracy']:.3f} | {r['wall_s']:.1f} |"
        )
    rm = report.get("reward_model")
    if rm:
        lines.append(
            f"\nReward model: fits {rm['train_pair_accuracy']:.3f} of its training pairs and ranks "
            f"{rm['test_pair_accuracy']:.3f} of test pairs (correct vs the annotator's error); on test carry "
            f"problems it prefers answer + 1 to the correct answer {rm['test_carry_prefers_answer_plus_one']:.3f}"
            " of the time."
        )
    for name, r in rows:
        if "tool_calls" in r:  # answered in episodes with the `add` tool
            lines.append(
                f"{name}: answered with the add tool, calling it on {r['tool_calls']:.3f} of test problems."
            )
    for name, r in rows:
        if "reward_first" in r:
            flags = r.get("hacking_flags")
            monitor = (
                ""
                if flags is None
                else " Monitor: no flag."
                if not flags
                else (
                    f" Monitor: flagged at step {flags[0]['step']} ({flags[0]['rule']}: {flags[0]['message']})."
                )
            )
            best = r.get("best")
            kept = (
                "" if not best else f" Best model by held-out accuracy (best/): test {best['accuracy']:.3f}."
            )
            lines.append(
                f"{name}: mean reward {r['reward_first']:.2f} (first steps) -> {r['reward_last']:.2f} (last)."
                + monitor
                + kept
            )
    return "\n".join(lines)


def write_report(output_dir: str, report: dict[str, Any]) -> str:
    """report.json and report.md; returns the table."""
    with open(os.path.join(output_dir, "report.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    table = render_table(report)
    with open(os.path.join(output_dir, "report.md"), "w", encoding="utf-8") as fh:
        fh.write(
            f"# alignkit quickstart\n\nTask: {report['task']}; {report['test_problems']} test problems, greedy "
            f"decoding, exact match. Total {report['total_wall_s']:.0f} s.\n\n{table}\n\n{NOTES}\n"
        )
    return table
