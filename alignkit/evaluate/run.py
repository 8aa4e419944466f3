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
from alignkit.evaluate import metrics as M
from alignkit.evaluate.config import EvalConfig, eval_config
from alignkit.evaluate.models import load_causal_lm
from alignkit.evaluate.plan import Plan, plan_metrics
from alignkit.evaluate.report import write_report
from alignkit.evaluate.scoring import implicit_reward_margins, kl_per_sample, nll_per_row
from alignkit.rollout import complete

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


def _messages(prompt: Any) -> list[dict]:
    return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]


def generate(model: Any, tokenizer: Any, examples: list[Example], cfg: EvalConfig) -> tuple[list, list, list]:
    """(texts (P, k), completion token counts (P, k), conversations (P,)). MT-Bench rows ask their later
    turns as follow-ups to sample 0's answers, one turn at a time across rows."""
    k = cfg.num_samples
    settings = dict(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        stop_strings=cfg.stop_strings,
        batch_size=cfg.batch_size,
    )
    samples = complete(model, tokenizer, [ex.prompt for ex in examples], num_samples=k, **settings)
    texts = [samples.texts[i * k : (i + 1) * k] for i in range(len(examples))]
    lengths = [[len(c) for c in samples.completion_ids[i * k : (i + 1) * k]] for i in range(len(examples))]
    conversations = [
        _messages(ex.prompt) + [{"role": "assistant", "content": t[0]}] for ex, t in zip(examples, texts)
    ]
    turns = [ex.extra.get("turns") or [] for ex in examples]
    for t in range(1, max((len(ts) for ts in turns), default=0)):
        rows = [i for i, ts in enumerate(turns) if len(ts) > t]
        follow = [conversations[i] + [{"role": "user", "content": turns[i][t]}] for i in rows]
        answers = complete(model, tokenizer, follow, num_samples=1, **settings).texts
        for i, msgs, answer in zip(rows, follow, answers):
            conversations[i] = msgs + [{"role": "assistant", "content": answer}]
    return texts, lengths, conversations


def _columns(examples: list[Example]) -> dict[str, list[Any]]:
    names = {k for ex in examples for k in ex.extra}
    return {k: [ex.extra.get(k) for ex in examples] for k in sorted(names)}


def _task_scores(cfg: EvalConfig, plan: Plan, examples: list[Example], side: Side) -> None:
    from alignkit.rewards import score

    k = cfg.num_samples
    prompts = [str(ex.prompt) for ex in examples for _ in range(k)]
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


def _with_reference(
    cfg: EvalConfig, plan: Plan, model: Any, tok: Any, examples: list[Example], side: Side
) -> None:
    """KL(model || reference) from the model's own samples, and the implicit-reward preference accuracy."""
    reference, _ = load_causal_lm(plan.reference, cfg.torch_dtype, cfg.trust_remote_code, device())
    if "kl" in plan.run:
        samples = complete(
            model,
            tok,
            [ex.prompt for ex in examples],
            num_samples=cfg.num_samples,
            max_new_tokens=cfg.max_new_tokens,
            temperature=1.0,  # the model's own distribution: the KL is of the model, not of a tempered copy
            batch_size=cfg.batch_size,
        )
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
        side.metrics["preference_accuracy"], side.per_prompt["preference_accuracy"] = M.preference_row(
            margins
        )
    del reference
    gc.collect()


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate_side(cfg: EvalConfig, plan: Plan, name: str, path: str, examples: list[Example]) -> Side:
    side = Side(name, path)
    t0 = time.perf_counter()
    model, tok = load_causal_lm(path, cfg.torch_dtype, cfg.trust_remote_code, device())
    if examples:
        side.texts, lengths, side.conversations = generate(model, tok, examples, cfg)
        per_prompt_len = [sum(ls) / len(ls) for ls in lengths]
        if "length" in plan.run:
            side.per_prompt["length"] = per_prompt_len
            side.metrics["length"] = M.length_rows(per_prompt_len, None, cfg.seed)["length"]
        if "refusal_rate" in plan.run:
            should = [ex.extra.get("should_refuse") for ex in examples]
            has_column = all(s is not None for s in should)
            rows, side.per_prompt["refusal_rate"] = M.refusal_rates(
                side.texts, cfg.refusal_phrases, should if has_column else None
            )
            side.metrics.update(rows)
        if plan.reward_funcs:
            _task_scores(cfg, plan, examples, side)
    if "perplexity" in plan.run:
        nll, counts = nll_per_row(model, tok, plan.sft_rows, cfg.max_length, cfg.batch_size)
        side.metrics["perplexity"] = M.perplexity_row(nll, counts, cfg.seed)
    if plan.reference and plan.reference != path and plan.run & {"kl", "preference_accuracy"}:
        _with_reference(cfg, plan, model, tok, examples, side)
    del model
    gc.collect()
    log.info("%s: %d prompts evaluated in %.1f s", name, len(examples), time.perf_counter() - t0)
    return side


def _text(value: Any) -> str:
    return value[-1]["content"] if isinstance(value, list) else str(value)


def reward_model_scores(cfg: EvalConfig, plan: Plan, examples: list[Example], sides: list[Side]) -> None:
    from alignkit.rewards import RewardModelScorer

    scorer = RewardModelScorer(cfg.reward_model, trust_remote_code=cfg.trust_remote_code)
    on = torch.device(device())
    k = cfg.num_samples
    for side in sides if examples else []:
        flat = scorer(
            [ex.prompt for ex in examples for _ in range(k)], [t for ts in side.texts for t in ts], on
        )
        per_prompt = [flat[i * k : (i + 1) * k].mean().item() for i in range(len(examples))]
        side.per_prompt["reward_model_score"] = per_prompt
        side.metrics["reward_model_score"] = M.mean_with_ci(per_prompt, cfg.seed)
    if len(sides) == 2 and examples:
        mine, theirs = (s.per_prompt["reward_model_score"] for s in sides)
        row, per = M.win_rate(mine, theirs)
        sides[0].metrics["reward_model_win_rate"], sides[0].per_prompt["reward_model_win_rate"] = row, per
    if "reward_model_preference_accuracy" in plan.run:
        prompts = [ex.prompt for ex in plan.pairs]
        chosen = scorer(prompts, [_text(ex.chosen) for ex in plan.pairs], on)
        rejected = scorer(prompts, [_text(ex.rejected) for ex in plan.pairs], on)
        row, _ = M.preference_row((chosen - rejected).tolist())
        for side in sides:  # a property of the reward model, the same for every side: shown once
            side.metrics["reward_model_preference_accuracy"] = row
            break


def judge_scores(cfg: EvalConfig, sides: list[Side]) -> None:
    from alignkit.evaluate.judge import Judge, summarize_grades, summarize_pairwise

    judge = Judge(
        cfg.judge_base_url or "",
        cfg.judge_model or "",
        judge_key(cfg),
        cache_path=os.path.join(cfg.output_dir, "judge_cache.sqlite"),
        max_concurrency=cfg.judge_max_concurrency,
        max_retries=cfg.judge_max_retries,
        api_key_env=cfg.judge_api_key_env,
    )
    for side in sides:
        grades = judge.grade(side.conversations)
        row = summarize_grades(grades)
        side.metrics["judge_score"] = {"value": row.pop("mean"), **row}
        side.per_prompt["judge_score"] = [float(g) for g in grades]
    if len(sides) == 2:
        verdicts = judge.pairwise(sides[0].conversations, sides[1].conversations)
        row = summarize_pairwise(verdicts)
        sides[0].metrics["judge_win_rate"] = {"value": row.pop("win_rate"), **row}
        sides[0].per_prompt["judge_win_rate"] = [
            {"a": 1.0, "tie": 0.5, "b": 0.0}[v["verdict"]] for v in verdicts
        ]


def judge_key(cfg: EvalConfig) -> str | None:
    """The judge's API key from the environment variable `judge_api_key_env` names. The default variable may
    be unset (a local endpoint without a key); one the user named must exist."""
    name = cfg.judge_api_key_env
    if not name:
        return None
    key = os.environ.get(name)
    if key is None and name != EvalConfig.judge_api_key_env:
        raise UserError(f"judge_api_key_env: {name} is not set in the environment; export {name}=<key>")
    return key


def load_prompts(cfg: EvalConfig) -> list[Example]:
    if not cfg.dataset:
        return []
    examples = load_examples(cfg.dataset, cfg.dataset_format, cfg.dataset_split)
    if cfg.max_samples is not None:
        examples = examples[: cfg.max_samples]
    return [ex for ex in examples if ex.prompt]  # text rows have no prompt to answer


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    os.makedirs(cfg.output_dir, exist_ok=True)
    examples = load_prompts(cfg)
    plan = plan_metrics(cfg, examples)
    sides = [evaluate_side(cfg, plan, "model", cfg.model, examples)]
    if cfg.baseline:
        sides.append(evaluate_side(cfg, plan, "baseline", cfg.baseline, examples))
        if "length" in plan.run:
            lengths = [s.per_prompt["length"] for s in sides]
            sides[0].metrics["length_ratio"] = M.length_rows(*lengths, cfg.seed)["length_ratio"]
    if "reward_model_score" in plan.run:
        reward_model_scores(cfg, plan, examples, sides)
    if plan.run & {"judge_score", "judge_win_rate"}:
        judge_scores(cfg, sides)
    if "lm_eval" in plan.run:
        from alignkit.evaluate.general import run_lm_eval

        for side in sides:
            for task, row in run_lm_eval(
                side.path,
                list(cfg.lm_eval_tasks or []),
                include_path=cfg.lm_eval_include_path,
                limit=cfg.lm_eval_limit,
                num_fewshot=cfg.lm_eval_num_fewshot,
                batch_size=cfg.batch_size,
                torch_dtype=cfg.torch_dtype,
                trust_remote_code=cfg.trust_remote_code,
                device=device(),
            ).items():
                side.metrics[f"lm_eval:{task}"] = row
    return write_report(cfg, examples, sides, plan.skipped, time.perf_counter() - t0)


def eval_command(args: argparse.Namespace) -> int:
    cfg = eval_config(args)
    report = run_eval(cfg)
    print(report["table"])
    print(f"\nwritten: {cfg.output_dir}/eval.json, eval.md, samples.jsonl")
    return 0
