"""Which metrics an eval runs: each one whose inputs exist, or those named in `metrics:` (then a missing
input is an error). Every metric that does not run is reported with the reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from alignkit.data.formats import Example, load_examples
from alignkit.errors import UserError
from alignkit.evaluation.config import METRICS, EvalConfig


@dataclass
class Plan:
    run: set[str] = field(default_factory=set)
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> why it did not run
    reward_funcs: dict[str, Any] = field(default_factory=dict)  # task accuracy (the first is `accuracy`)
    reference: str | None = None  # KL and implicit-reward reference
    pairs: list[Example] = field(default_factory=list)  # held-out preference pairs
    sft_rows: list[Example] = field(default_factory=list)  # held-out SFT rows (perplexity)

    @property
    def generates(self) -> bool:
        """Whether the models must answer the prompts."""
        return bool(self.run & ANSWER_METRICS)

    @property
    def loads_model(self) -> bool:
        return bool(self.run - {"lm_eval", "reward_model_preference_accuracy"})


# metrics computed from the models' answers
ANSWER_METRICS = {
    "accuracy",
    "reward_model_score",
    "reward_model_win_rate",
    "judge_win_rate",
    "judge_score",
    "length",
    "refusal_rate",
}


def _held_out(
    cfg: EvalConfig, source: str | None, kind: str, rows_of_dataset: list[Example]
) -> list[Example]:
    if source:
        found = [ex for ex in load_examples(source, "auto", cfg.dataset_split) if ex.kind == kind]
    else:
        found = [ex for ex in rows_of_dataset if ex.kind == kind]
    return found[: cfg.max_samples] if cfg.max_samples else found


def _accuracy_funcs(cfg: EvalConfig, examples: list[Example]) -> tuple[dict[str, Any], str]:
    from alignkit.generation.rewards import build_reward_funcs, check_columns

    columns = {k for ex in examples for k in ex.extra}
    names = cfg.reward_funcs or (["math_accuracy"] if "answer" in columns else [])
    if not names:
        return {}, "the rows have no `answer` column (set `reward_funcs` to score another column)"
    funcs = build_reward_funcs(names, r"<think>.*</think>.*", 512)
    check_columns(funcs, columns, f"dataset {cfg.dataset}")
    return funcs, ""


def _reasons(cfg: EvalConfig, examples: list[Example], plan: Plan) -> dict[str, str]:
    """metric -> why it cannot run ('' when it can)."""
    no_prompts = "" if examples else "the dataset has no prompts to answer"
    no_baseline = "" if cfg.baseline else "no `baseline` to compare with"
    no_rm = "" if cfg.reward_model else "no `reward_model`"
    no_judge = "" if cfg.judge_base_url else "no `judge_base_url` (an OpenAI-compatible endpoint)"
    no_ref = "" if plan.reference else "no reference (`ref_model_name_or_path` or `baseline`)"
    if plan.reference == cfg.model:
        no_ref = f"the reference is the model itself ({cfg.model}): KL 0 and every margin 0 by definition"
    no_pairs = "" if plan.pairs else "no preference pairs (`preference_dataset`, or pair rows in `dataset`)"
    funcs_reason = "" if plan.reward_funcs else plan.skipped.pop("accuracy", "")
    return {
        "accuracy": no_prompts or funcs_reason,
        "reward_model_score": no_rm or no_prompts,
        "reward_model_win_rate": no_rm or no_baseline or no_prompts,
        "judge_win_rate": no_judge or no_baseline or no_prompts,
        "judge_score": no_judge or no_prompts,
        "preference_accuracy": no_pairs or no_ref,
        "reward_model_preference_accuracy": no_pairs or no_rm,
        "kl": no_prompts or no_ref,
        "length": no_prompts,
        "refusal_rate": no_prompts,
        "perplexity": "" if plan.sft_rows else "no SFT rows (`perplexity_dataset`, or SFT rows in `dataset`)",
        "lm_eval": "" if cfg.lm_eval_tasks else "no `lm_eval_tasks`",
    }


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # set to None in sys.modules: treated as absent
        return False


def _check_inputs(cfg: EvalConfig, plan: Plan) -> None:
    """What would otherwise fail after the answers were generated: a folder that is not there, lm-eval not
    installed."""
    from alignkit.modeling.resolve import check_model_path

    paths = {"baseline": cfg.baseline, "reward_model": cfg.reward_model}
    if plan.run & {"kl", "preference_accuracy"}:
        paths["ref_model_name_or_path"] = plan.reference
    for key, path in paths.items():
        if path:
            try:
                check_model_path(path)
            except UserError as exc:
                raise UserError(f"`{key}`: {exc}") from exc
    if "lm_eval" in plan.run and not _installed("lm_eval"):
        from alignkit.evaluation.general import MISSING

        raise UserError(MISSING)


def plan_metrics(cfg: EvalConfig, examples: list[Example], rows: list[Example] | None = None) -> Plan:
    """examples: the rows with a prompt to answer; rows: every row of `dataset` (text rows too)."""
    rows = examples if rows is None else rows
    plan = Plan(reference=cfg.ref_model_name_or_path or cfg.baseline)
    plan.pairs = _held_out(cfg, cfg.preference_dataset, "pair", rows)
    plan.sft_rows = _held_out(cfg, cfg.perplexity_dataset, "sft", rows)
    if examples:
        plan.reward_funcs, why = _accuracy_funcs(cfg, examples)
        if why:
            plan.skipped["accuracy"] = why
    wanted = set(cfg.metrics or METRICS)
    for metric, reason in _reasons(cfg, examples, plan).items():
        if metric not in wanted:
            plan.skipped[metric] = "not in `metrics`"
            if metric == "accuracy":
                plan.reward_funcs = {}
        elif reason:
            if cfg.metrics:
                raise UserError(f"metrics: `{metric}` was asked for, but {reason}")
            plan.skipped[metric] = reason
        else:
            plan.run.add(metric)
    if not plan.run:
        raise UserError(
            f"nothing to measure on {cfg.dataset or 'no dataset'}: "
            + "; ".join(f"{k}: {v}" for k, v in plan.skipped.items())
        )
    _check_inputs(cfg, plan)
    return plan
