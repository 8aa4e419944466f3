"""`alignkit eval`: sample each model's answers through the rollout engine, score them, write the report.

Which metrics run, and when, comes from the metric registry (`alignkit.evaluation.registry`), phase by phase:
a model is loaded once, and what needs it (its answers, the MODEL phase, the REFERENCE phase with the reference
beside it) happens while it is in memory, then it is freed before the next one is loaded; then the metrics read
from the answers, the reward model's, the judge's and the external ones run over every side."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import torch

from alignkit.data.formats import Example, load_examples
from alignkit.evaluation.answers import generate, vllm_engine
from alignkit.evaluation.config import EvalConfig
from alignkit.evaluation.context import EvalContext, Side, device
from alignkit.evaluation.plan import plan_metrics
from alignkit.evaluation.report import write_report
from alignkit.evaluation.spec import Phase
from alignkit.generation.judge import Judge
from alignkit.generation.judge_reward import judge_api_key
from alignkit.generation.rewards import RewardModelScorer
from alignkit.modeling.load import load_causal_lm

__all__ = ["Side", "run_eval"]

log = logging.getLogger("alignkit")


def _run_phase(ctx: EvalContext, phase: Phase, sides: list[Side]) -> None:
    """Each metric of `phase` that runs, in report order, on each of `sides` (the model only when it is
    not measured on each side)."""
    for spec in ctx.plan.specs(phase):
        for side in sides:
            if spec.each_side or side is ctx.sides[0]:
                spec.compute(ctx, side)


def _with_reference(ctx: EvalContext, side: Side) -> None:
    """The REFERENCE phase: the reference loaded beside the side's model. Log-ratios need the reference to read
    the model's token ids as the same tokens."""
    cfg, plan = ctx.cfg, ctx.plan
    reference, ref_tok = load_causal_lm(
        plan.reference or "", cfg.torch_dtype, cfg.trust_remote_code, device()
    )
    if ctx.tokenizer.get_vocab() != ref_tok.get_vocab():
        why = f"the reference {plan.reference} has another vocabulary than the model (log-ratios need the same tokens)"
        plan.drop(Phase.REFERENCE, why, asked=bool(cfg.metrics))
    else:
        ctx.reference = reference
        _run_phase(ctx, Phase.REFERENCE, [side])
    ctx.reference = None
    del reference
    gc.collect()


def evaluate_side(ctx: EvalContext, name: str, path: str) -> Side:
    """Everything that needs this model loaded: its answers, the MODEL and REFERENCE phases."""
    cfg, plan = ctx.cfg, ctx.plan
    side = Side(name, path)
    ctx.sides.append(side)
    if not plan.loads_model:  # lm-eval loads the model itself
        return side
    t0 = time.perf_counter()
    model, tok = load_causal_lm(path, cfg.torch_dtype, cfg.trust_remote_code, device())
    engine = vllm_engine(cfg, path, model, tok) if cfg.rollout_backend == "vllm" else None
    ctx.model, ctx.tokenizer, ctx.engine, side.tokenizer = model, tok, engine, tok
    if plan.generates:
        torch.manual_seed(cfg.seed)  # sampled answers (temperature > 0) are the same on a re-run
        side.texts, side.lengths, side.conversations = generate(model, tok, ctx.examples, cfg, engine)
    _run_phase(ctx, Phase.MODEL, [side])
    if plan.reference and plan.reference != path and plan.specs(Phase.REFERENCE):
        _with_reference(ctx, side)
    ctx.model = ctx.tokenizer = ctx.engine = None
    del model, engine
    gc.collect()
    log.info("%s: evaluated in %.1f s", name, time.perf_counter() - t0)
    return side


def _over_every_side(ctx: EvalContext) -> None:
    """The phases that need no policy in memory: from the answers, the reward model, the judge, external."""
    cfg = ctx.cfg
    _run_phase(ctx, Phase.ANSWERS, ctx.sides)
    if ctx.plan.specs(Phase.REWARD_MODEL):
        ctx.scorer = RewardModelScorer(cfg.reward_model or "", trust_remote_code=cfg.trust_remote_code)
        _run_phase(ctx, Phase.REWARD_MODEL, ctx.sides)
        ctx.scorer = None
    if ctx.plan.specs(Phase.JUDGE):
        ctx.judge = make_judge(cfg)
        _run_phase(ctx, Phase.JUDGE, ctx.sides)
    _run_phase(ctx, Phase.EXTERNAL, ctx.sides)


def make_judge(cfg: EvalConfig, cache: bool = True) -> Any:
    """The judge, with its verdict cache in output_dir (`cache` False: in memory, for the check made before
    anything is written)."""

    return Judge(
        cfg.judge_base_url or "",
        cfg.judge_model or "",
        judge_key(cfg),
        cache_path=os.path.join(cfg.output_dir, "judge_cache.sqlite") if cache else ":memory:",
        max_concurrency=cfg.judge_max_concurrency,
        max_retries=cfg.judge_max_retries,
        api_key_env=cfg.judge_api_key_env,
        mode=cfg.judge_mode,
    )


def judge_key(cfg: EvalConfig) -> str | None:
    """The judge's API key from the environment variable `judge_api_key_env` names (see `judge_api_key`)."""
    return judge_api_key(cfg.judge_api_key_env)


def load_rows(cfg: EvalConfig) -> list[Example]:
    if not cfg.dataset:
        return []
    examples = load_examples(cfg.dataset, cfg.dataset_format, cfg.dataset_split)
    return examples[: cfg.max_samples] if cfg.max_samples is not None else examples


@contextlib.contextmanager
def output_folder(path: str) -> Iterator[None]:
    """Makes `path` (and its missing parents). When what runs inside fails, the folders made here that are
    still empty are removed again, deepest first: a failed eval leaves no empty folder behind, and never
    touches a folder that was there before or anything written (the judge's verdicts stay for a rerun)."""
    made, folder = [], os.path.abspath(path)
    while not os.path.exists(folder):
        made.append(folder)
        folder = os.path.dirname(folder)
    os.makedirs(path, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in made:
            try:
                os.rmdir(folder)  # only an empty folder: anything written keeps it (and its parents)
            except OSError:
                break
        raise


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate `cfg.model` (and `cfg.baseline`): eval.json's dict, with the printed table under "table"."""
    t0 = time.perf_counter()
    rows = load_rows(cfg)
    examples = [ex for ex in rows if ex.prompt]  # text rows have no prompt to answer (perplexity reads them)
    plan = plan_metrics(cfg, examples, rows)
    if plan.specs(Phase.JUDGE):
        make_judge(
            cfg, cache=False
        )  # a bad URL or an unset key fails now, not after the answers are generated
    with output_folder(cfg.output_dir):
        ctx = EvalContext(cfg, plan, examples)
        evaluate_side(ctx, "model", cfg.model)
        if cfg.baseline:
            evaluate_side(ctx, "baseline", cfg.baseline)
        _over_every_side(ctx)
        answered = examples if plan.generates else []
        return write_report(cfg, answered, ctx.sides, plan.skipped, time.perf_counter() - t0)
