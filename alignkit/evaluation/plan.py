"""Which metrics an eval runs: each one whose inputs exist, or those named in `metrics:` (then a missing
input is an error). Every metric that does not run is reported with the reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from alignkit.data.formats import Example, load_examples
from alignkit.errors import UserError
from alignkit.evaluation import registry
from alignkit.evaluation.settings import EvalConfig
from alignkit.evaluation.spec import MetricSpec, Need, Phase
from alignkit.generation.rewards import build_reward_funcs, check_columns
from alignkit.modeling.resolve import check_model_path


@dataclass
class Plan:
    run: set[str] = field(default_factory=set)
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> why it did not run
    reward_funcs: dict[str, Any] = field(default_factory=dict)  # task accuracy (the first is `accuracy`)
    reward_funcs_missing: str = ""  # why there are none
    reference: str | None = None  # KL and implicit-reward reference
    pairs: list[Example] = field(default_factory=list)  # held-out preference pairs
    sft_rows: list[Example] = field(default_factory=list)  # held-out SFT rows (perplexity)

    def specs(self, phase: Phase | None = None) -> list[MetricSpec]:
        """The metrics that run (in `phase`), in report order."""
        return [s for s in registry.specs() if s.name in self.run and phase in (None, s.phase)]

    @property
    def generates(self) -> bool:
        """Whether the models must answer the prompts."""
        return any(s.reads_answers for s in self.specs())

    @property
    def loads_model(self) -> bool:
        return any(s.loads_model for s in self.specs())

    def drop(self, phase: Phase, why: str, asked: bool) -> None:
        """Skip the metrics of `phase` (a reference that cannot be used); an error when they were asked for."""
        for spec in self.specs(phase):
            if asked:
                raise UserError(f"metrics: `{spec.name}` was asked for, but {why}")
            self.run.discard(spec.name)
            self.skipped[spec.name] = why


def _held_out(
    cfg: EvalConfig, source: str | None, kind: str, rows_of_dataset: list[Example]
) -> list[Example]:
    if source:
        found = [ex for ex in load_examples(source, "auto", cfg.dataset_split) if ex.kind == kind]
    else:
        found = [ex for ex in rows_of_dataset if ex.kind == kind]
    return found[: cfg.max_samples] if cfg.max_samples else found


def _accuracy_funcs(cfg: EvalConfig, examples: list[Example]) -> tuple[dict[str, Any], str]:

    columns = {k for ex in examples for k in ex.extra}
    names = cfg.reward_funcs or (["math_accuracy"] if "answer" in columns else [])
    if not names:
        return {}, "the rows have no `answer` column (set `reward_funcs` to score another column)"
    funcs = build_reward_funcs(names, r"<think>.*</think>.*", 512)
    check_columns(funcs, columns, f"dataset {cfg.dataset}")
    return funcs, ""


def _missing(cfg: EvalConfig, examples: list[Example], plan: Plan) -> dict[Need, str]:
    """Each input -> why it is missing ('' when it is there)."""
    no_prompts = "" if examples else "the dataset has no prompts to answer"
    no_ref = "" if plan.reference else "no reference (`ref_model_name_or_path` or `baseline`)"
    if plan.reference == cfg.model:
        no_ref = f"the reference is the model itself ({cfg.model}): KL 0 and every margin 0 by definition"
    return {
        Need.PROMPTS: no_prompts,
        Need.ANSWERS: no_prompts,
        Need.BASELINE: "" if cfg.baseline else "no `baseline` to compare with",
        Need.REFERENCE: no_ref,
        Need.REWARD_MODEL: "" if cfg.reward_model else "no `reward_model`",
        Need.JUDGE: "" if cfg.judge_base_url else "no `judge_base_url` (an OpenAI-compatible endpoint)",
        Need.PAIRS: ""
        if plan.pairs
        else "no preference pairs (`preference_dataset`, or pair rows in `dataset`)",
        Need.SFT_ROWS: ""
        if plan.sft_rows
        else "no SFT rows (`perplexity_dataset`, or SFT rows in `dataset`)",
        Need.TASK_REWARD: plan.reward_funcs_missing,
        Need.LM_EVAL_TASKS: "" if cfg.lm_eval_tasks else "no `lm_eval_tasks`",
    }


def _check_inputs(cfg: EvalConfig, plan: Plan) -> None:
    """What would otherwise fail after the answers were generated: a folder that is not there, an optional
    package not installed (each metric's own `check`)."""

    paths = {"baseline": cfg.baseline, "reward_model": cfg.reward_model}
    if any(Need.REFERENCE in s.needs for s in plan.specs()):
        paths["ref_model_name_or_path"] = plan.reference
    for key, path in paths.items():
        if path:
            try:
                check_model_path(path)
            except UserError as exc:
                raise UserError(f"`{key}`: {exc}") from exc
    for spec in plan.specs():
        if spec.check is not None:
            spec.check(cfg)


def plan_metrics(cfg: EvalConfig, examples: list[Example], rows: list[Example] | None = None) -> Plan:
    """examples: the rows with a prompt to answer; rows: every row of `dataset` (text rows too)."""
    rows = examples if rows is None else rows
    plan = Plan(reference=cfg.ref_model_name_or_path or cfg.baseline)
    plan.pairs = _held_out(cfg, cfg.preference_dataset, "pair", rows)
    plan.sft_rows = _held_out(cfg, cfg.perplexity_dataset, "sft", rows)
    wanted = [s for s in registry.specs() if s.name in set(cfg.metrics or registry.names())]
    if examples and any(Need.TASK_REWARD in s.needs for s in wanted):
        plan.reward_funcs, plan.reward_funcs_missing = _accuracy_funcs(cfg, examples)
    missing = _missing(cfg, examples, plan)
    for spec in registry.specs():
        reason = spec.why_not(missing)
        if spec not in wanted:
            plan.skipped[spec.name] = "not in `metrics`"
        elif reason:
            if cfg.metrics:
                raise UserError(f"metrics: `{spec.name}` was asked for, but {reason}")
            plan.skipped[spec.name] = reason
        else:
            plan.run.add(spec.name)
    if not plan.run:
        raise UserError(
            f"nothing to measure on {cfg.dataset or 'no dataset'}: "
            + "; ".join(f"{k}: {v}" for k, v in plan.skipped.items())
        )
    _check_inputs(cfg, plan)
    return plan
