"""`alignkit eval`: sample each model's answers through the rollout engine, score them, write the report.

A model is loaded once; everything that needs it (answers, perplexity, KL and implicit rewards against the
reference) happens while it is in memory, then it is freed before the next one is loaded."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from alignkit.data.formats import Example, load_examples
from alignkit.errors import UserError
from alignkit.evaluation import metrics as M
from alignkit.evaluation.answers import generate, sample_for_kl, turn_prefixes, vllm_engine
from alignkit.evaluation.config import EvalConfig, eval_config
from alignkit.evaluation.plan import Plan, plan_metrics
from alignkit.evaluation.report import write_report
from alignkit.evaluation.scoring import implicit_reward_margins, kl_per_sample, nll_per_row
from alignkit.generation.rollout import encode_prompts
from alignkit.modeling.load import load_causal_lm

log = logging.getLogger("alignkit")


@dataclass
class Side:
    """What one evaluated model produced: its answers and its scores."""

    name: str  # "model" or "baseline"
    path: str
    texts: list[list[str]] = field(default_factory=list)  # (prompts, num_samples) first-turn answers
    conversations: list[list[dict]] = field(default_factory=list)  # sample 0's whole conversation
    metrics: dict[str, dict] = field(default_factory=dict)  # report rows
    per_prompt: dict[str, list[float]] = field(default_factory=dict)  # for paired comparisons


def _columns(examples: list[Example]) -> dict[str, list[Any]]:
    names = {k for ex in examples for k in ex.extra}
    return {k: [ex.extra.get(k) for ex in examples] for k in sorted(names)}


def _task_scores(cfg: EvalConfig, plan: Plan, tok: Any, examples: list[Example], side: Side) -> None:
    from alignkit.generation.rewards import score

    k = cfg.num_samples
    # the prompt as the model saw it (chat template applied), as the online stages hand it to rewards
    texts = [
        tok.decode(ids, skip_special_tokens=True) for ids in encode_prompts(tok, [e.prompt for e in examples])
    ]
    prompts = [t for t in texts for _ in range(k)]
    flat = [t for ts in side.texts for t in ts]
    columns = {c: [v for v in vals for _ in range(k)] for c, vals in _columns(examples).items()}
    wheres = [ex.where for ex in examples for _ in range(k)]
    for i, (name, values) in enumerate(score(plan.reward_funcs, prompts, flat, columns, wheres).items()):
        grid = [values[j * k : (j + 1) * k].tolist() for j in range(len(examples))]
        rows, per_prompt = M.task_accuracy(grid, side.texts)
        if i > 0:  # the first function is the task's accuracy; others are reported under their names
            rows = {f"{key}:{name}": row for key, row in rows.items()}
        side.metrics.update(rows)
        side.per_prompt["accuracy" if i == 0 else f"accuracy:{name}"] = per_prompt


def _same_vocabulary(tok: Any, ref_tok: Any, plan: Plan, cfg: EvalConfig) -> bool:
    """Log-ratios need the reference to read the model's token ids as the same tokens."""
    if tok.get_vocab() == ref_tok.get_vocab():
        return True
    why = f"the reference {plan.reference} has another vocabulary than the model (log-ratios need the same tokens)"
    for metric in ("kl", "preference_accuracy"):
        if metric in plan.run:
            if cfg.metrics:
                raise UserError(f"metrics: `{metric}` was asked for, but {why}")
            plan.skipped[metric] = why
    return False


def _with_reference(
    cfg: EvalConfig, plan: Plan, model: Any, tok: Any, examples: list[Example], side: Side, engine: Any
) -> None:
    """KL(model || reference) from the model's own samples, and the implicit-reward preference accuracy."""
    reference, ref_tok = load_causal_lm(
        plan.reference or "", cfg.torch_dtype, cfg.trust_remote_code, device()
    )
    if not _same_vocabulary(tok, ref_tok, plan, cfg):
        return
    if "kl" in plan.run:
        torch.manual_seed(cfg.seed + 1)
        samples = sample_for_kl(model, tok, examples, cfg, engine)
        per_sample = kl_per_sample(
            model, reference, samples.prompt_ids, samples.completion_ids, tok.pad_token_id, cfg.batch_size
        )
        side.metrics["kl"] = M.kl_row(per_sample)
        k = cfg.num_samples
        side.per_prompt["kl"] = [sum(per_sample[i * k : (i + 1) * k]) / k for i in range(len(examples))]
    if "preference_accuracy" in plan.run:
        margins = implicit_reward_margins(
            model, reference, tok, plan.pairs, cfg.beta, cfg.max_length, cfg.batch_size
        )
        side.metrics["preference_accuracy"], _ = M.preference_row(margins)  # per pair, not per prompt
    del reference
    gc.collect()


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _should_refuse(examples: list[Example]) -> list[bool | None] | None:
    """The `should_refuse` column as booleans (rows without it in neither group), or None when no row has it."""
    from alignkit.data.formats import parse_label

    values = [ex.extra.get("should_refuse") for ex in examples]
    if all(v is None for v in values):
        return None
    return [
        None if v is None else parse_label(v, ex.where, "should_refuse") for v, ex in zip(values, examples)
    ]


def _answers(
    cfg: EvalConfig, plan: Plan, model: Any, tok: Any, examples: list[Example], side: Side, engine: Any
) -> None:
    torch.manual_seed(cfg.seed)  # sampled answers (temperature > 0) are the same on a re-run
    side.texts, lengths, side.conversations = generate(model, tok, examples, cfg, engine)
    if "length" in plan.run:
        side.per_prompt["length"] = [sum(ls) / len(ls) for ls in lengths]
        side.metrics["length"] = M.length_rows(side.per_prompt["length"], None, cfg.seed)["length"]
    if "refusal_rate" in plan.run:
        rows, side.per_prompt["refusal_rate"] = M.refusal_rates(
            side.texts, cfg.refusal_phrases, _should_refuse(examples)
        )
        side.metrics.update(rows)
    if plan.reward_funcs:
        _task_scores(cfg, plan, tok, examples, side)


def evaluate_side(cfg: EvalConfig, plan: Plan, name: str, path: str, examples: list[Example]) -> Side:
    """Everything that needs this model loaded: its answers, perplexity, KL and implicit rewards."""
    side = Side(name, path)
    if not plan.loads_model:  # lm-eval loads the model itself
        return side
    t0 = time.perf_counter()
    model, tok = load_causal_lm(path, cfg.torch_dtype, cfg.trust_remote_code, device())
    engine = vllm_engine(cfg, path, model, tok) if cfg.rollout_backend == "vllm" else None
    if plan.generates:
        _answers(cfg, plan, model, tok, examples, side, engine)
    if "perplexity" in plan.run:
        nll, counts = nll_per_row(model, tok, plan.sft_rows, cfg.max_length, cfg.batch_size)
        side.metrics["perplexity"] = M.perplexity_row(nll, counts, cfg.seed)
    if plan.reference and plan.reference != path and plan.run & {"kl", "preference_accuracy"}:
        _with_reference(cfg, plan, model, tok, examples, side, engine)
    del model, engine
    gc.collect()
    log.info("%s: evaluated in %.1f s", name, time.perf_counter() - t0)
    return side


def _text(value: Any) -> str:
    return value[-1]["content"] if isinstance(value, list) else str(value)


def reward_model_scores(cfg: EvalConfig, plan: Plan, examples: list[Example], sides: list[Side]) -> None:
    from alignkit.generation.rewards import RewardModelScorer

    scorer = RewardModelScorer(cfg.reward_model or "", trust_remote_code=cfg.trust_remote_code)
    on = torch.device(device())
    k = cfg.num_samples
    if plan.run & {"reward_model_score", "reward_model_win_rate"}:
        for side in sides:
            prompts = [ex.prompt for ex in examples for _ in range(k)]
            flat = scorer(prompts, [t for ts in side.texts for t in ts], on)
            per_prompt = [flat[i * k : (i + 1) * k].mean().item() for i in range(len(examples))]
            side.per_prompt["reward_model_score"] = per_prompt
            if "reward_model_score" in plan.run:
                side.metrics["reward_model_score"] = M.mean_with_ci(per_prompt, cfg.seed)
    if "reward_model_win_rate" in plan.run:
        mine, theirs = (s.per_prompt["reward_model_score"] for s in sides)
        row, per = M.win_rate(mine, theirs)
        sides[0].metrics["reward_model_win_rate"], sides[0].per_prompt["reward_model_win_rate"] = row, per
    if "reward_model_preference_accuracy" in plan.run:  # a property of the reward model: shown once
        prompts = [ex.prompt for ex in plan.pairs]
        chosen = scorer(prompts, [_text(ex.chosen) for ex in plan.pairs], on)
        rejected = scorer(prompts, [_text(ex.rejected) for ex in plan.pairs], on)
        sides[0].metrics["reward_model_preference_accuracy"], _ = M.preference_row(
            (chosen - rejected).tolist()
        )


def judge_scores(cfg: EvalConfig, plan: Plan, sides: list[Side]) -> None:
    """MT-Bench style: every assistant turn graded 1-10 with the conversation before it (a prompt's score is
    the mean of its turns); pairwise verdicts on whole conversations, in both orders."""
    from alignkit.evaluation.judge import summarize_grades, summarize_pairwise

    judge = make_judge(cfg)
    if "judge_score" in plan.run:
        for side in sides:
            turns = [turn_prefixes(c) for c in side.conversations]
            grades = judge.grade([t for ts in turns for t in ts])
            per_prompt, at = [], 0
            for ts in turns:
                per_prompt.append(sum(grades[at : at + len(ts)]) / len(ts))
                at += len(ts)
            row = summarize_grades(grades)
            side.metrics["judge_score"] = {"value": row.pop("mean"), **row}
            side.per_prompt["judge_score"] = per_prompt
    if "judge_win_rate" in plan.run:
        verdicts = judge.pairwise(sides[0].conversations, sides[1].conversations)
        row = summarize_pairwise(verdicts)
        sides[0].metrics["judge_win_rate"] = {"value": row.pop("win_rate"), **row}
        sides[0].per_prompt["judge_win_rate"] = [
            {"a": 1.0, "tie": 0.5, "b": 0.0}[v["verdict"]] for v in verdicts
        ]


def make_judge(cfg: EvalConfig) -> Any:
    from alignkit.evaluation.judge import Judge

    return Judge(
        cfg.judge_base_url or "",
        cfg.judge_model or "",
        judge_key(cfg),
        cache_path=os.path.join(cfg.output_dir, "judge_cache.sqlite"),
        max_concurrency=cfg.judge_max_concurrency,
        max_retries=cfg.judge_max_retries,
        api_key_env=cfg.judge_api_key_env,
    )


def judge_key(cfg: EvalConfig) -> str | None:
    """The judge's API key from the environment variable `judge_api_key_env` names. The default variable may
    be unset (a local endpoint without a key); one the user named must be set."""
    from alignkit.evaluation.judge import api_key_from_env

    name = cfg.judge_api_key_env
    if name == EvalConfig.judge_api_key_env and not os.environ.get(name or ""):
        return None
    return api_key_from_env(name)


def load_rows(cfg: EvalConfig) -> list[Example]:
    if not cfg.dataset:
        return []
    examples = load_examples(cfg.dataset, cfg.dataset_format, cfg.dataset_split)
    return examples[: cfg.max_samples] if cfg.max_samples is not None else examples


def _lm_eval(cfg: EvalConfig, sides: list[Side]) -> None:
    from alignkit.evaluation.general import run_lm_eval

    for side in sides:
        rows = run_lm_eval(
            side.path,
            list(cfg.lm_eval_tasks or []),
            include_path=cfg.lm_eval_include_path,
            limit=cfg.lm_eval_limit,
            num_fewshot=cfg.lm_eval_num_fewshot,
            batch_size=cfg.batch_size,
            torch_dtype=cfg.torch_dtype,
            trust_remote_code=cfg.trust_remote_code,
            device=device(),
        )
        side.metrics.update({f"lm_eval:{task}": row for task, row in rows.items()})


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    rows = load_rows(cfg)
    examples = [ex for ex in rows if ex.prompt]  # text rows have no prompt to answer (perplexity reads them)
    plan = plan_metrics(cfg, examples, rows)
    if plan.run & {"judge_score", "judge_win_rate"}:
        make_judge(cfg)  # a bad URL or an unset key fails now, not after the answers are generated
    os.makedirs(cfg.output_dir, exist_ok=True)
    sides = [evaluate_side(cfg, plan, "model", cfg.model, examples)]
    if cfg.baseline:
        sides.append(evaluate_side(cfg, plan, "baseline", cfg.baseline, examples))
        if "length" in plan.run:
            lengths = [s.per_prompt["length"] for s in sides]
            sides[0].metrics["length_ratio"] = M.length_rows(*lengths, cfg.seed)["length_ratio"]
    if plan.run & {"reward_model_score", "reward_model_win_rate", "reward_model_preference_accuracy"}:
        reward_model_scores(cfg, plan, examples, sides)
    if plan.run & {"judge_score", "judge_win_rate"}:
        judge_scores(cfg, plan, sides)
    if "lm_eval" in plan.run:
        _lm_eval(cfg, sides)
    return write_report(
        cfg, examples if plan.generates else [], sides, plan.skipped, time.perf_counter() - t0
    )


def eval_command(args: argparse.Namespace) -> int:
    cfg = eval_config(args)
    report = run_eval(cfg)
    print(report["table"])
    print(f"\nwritten: {cfg.output_dir}/eval.json, eval.md, samples.jsonl")
    return 0
