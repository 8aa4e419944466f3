"""The functions of the built-in metrics (their facts are in `alignkit.evaluation.registry`): each one,
`(ctx, side) -> None`, writes its report rows into `side.metrics` and its per-prompt values (for compare's
paired differences) into `side.per_prompt`."""

from __future__ import annotations

import logging
from typing import Any

from alignkit.data.formats import Example, parse_label
from alignkit.errors import UserError
from alignkit.evaluation import metrics as M
from alignkit.evaluation.answers import sample_for_kl, turn_prefixes
from alignkit.evaluation.context import EvalContext, Side, device
from alignkit.evaluation.scoring import implicit_reward_margins, kl_per_sample, nll_per_row
from alignkit.generation.judge import summarize_grades, summarize_pairwise
from alignkit.generation.rewards import score
from alignkit.generation.rollout import encode_prompts

log = logging.getLogger("alignkit")


# ------------------------------------------------------------------------------------------ from the answers
def _columns(examples: list[Example]) -> dict[str, list[Any]]:
    names = {k for ex in examples for k in ex.extra}
    return {k: [ex.extra.get(k) for ex in examples] for k in sorted(names)}


def accuracy(ctx: EvalContext, side: Side) -> None:
    """The task's reward functions over every sample; the first is `accuracy` (with pass@k, maj@k and
    consistency), the others are reported under their names (accuracy:<name>, ...)."""

    k, examples, tok = ctx.cfg.num_samples, ctx.examples, side.tokenizer
    # the prompt as the model saw it (chat template applied), as the online stages hand it to rewards
    texts = [
        tok.decode(ids, skip_special_tokens=True) for ids in encode_prompts(tok, [e.prompt for e in examples])
    ]
    prompts = [t for t in texts for _ in range(k)]
    flat = [t for ts in side.texts for t in ts]
    columns = {c: [v for v in vals for _ in range(k)] for c, vals in _columns(examples).items()}
    wheres = [ex.where for ex in examples for _ in range(k)]
    for i, (name, values) in enumerate(score(ctx.plan.reward_funcs, prompts, flat, columns, wheres).items()):
        grid = [values[j * k : (j + 1) * k].tolist() for j in range(len(examples))]
        rows, per_prompt = M.task_accuracy(grid, side.texts)
        if i > 0:
            rows = {f"{key}:{name}": row for key, row in rows.items()}
        side.metrics.update(rows)
        side.per_prompt["accuracy" if i == 0 else f"accuracy:{name}"] = per_prompt


def _mean_lengths(side: Side) -> list[float]:
    return [sum(ls) / len(ls) for ls in side.lengths]


def length(ctx: EvalContext, side: Side) -> None:
    """Answer tokens per prompt; for the model, its ratio to the baseline's when there is one."""
    side.per_prompt["length"] = _mean_lengths(side)
    side.metrics["length"] = M.length_rows(side.per_prompt["length"], None, ctx.cfg.seed)["length"]
    if side is ctx.sides[0] and len(ctx.sides) > 1:
        rows = M.length_rows(side.per_prompt["length"], _mean_lengths(ctx.sides[1]), ctx.cfg.seed)
        side.metrics["length_ratio"] = rows["length_ratio"]


def _should_refuse(examples: list[Example]) -> list[bool | None] | None:
    """The `should_refuse` column as booleans (rows without it in neither group), or None when no row has it."""

    values = [ex.extra.get("should_refuse") for ex in examples]
    if all(v is None for v in values):
        return None
    return [
        None if v is None else parse_label(v, ex.where, "should_refuse") for v, ex in zip(values, examples)
    ]


def refusal_rate(ctx: EvalContext, side: Side) -> None:
    rows, side.per_prompt["refusal_rate"] = M.refusal_rates(
        side.texts, ctx.cfg.refusal_phrases, _should_refuse(ctx.examples)
    )
    side.metrics.update(rows)


# ------------------------------------------------------------------------------- with the model (and reference)
def perplexity(ctx: EvalContext, side: Side) -> None:

    cfg = ctx.cfg
    nll, counts = nll_per_row(ctx.model, ctx.tokenizer, ctx.plan.sft_rows, cfg.max_length, cfg.batch_size)
    side.metrics["perplexity"] = M.perplexity_row(nll, counts, cfg.seed)


def kl(ctx: EvalContext, side: Side) -> None:
    """KL(model || reference) along the model's own samples (temperature 1): the exact next-token KL summed over
    each answer's positions (see `metrics.kl_row`), with the k1 log-ratio beside it."""
    import torch

    cfg = ctx.cfg
    torch.manual_seed(cfg.seed + 1)
    samples = sample_for_kl(ctx.model, ctx.tokenizer, ctx.examples, cfg, ctx.engine)
    found = kl_per_sample(
        ctx.model,
        ctx.reference,
        samples.prompt_ids,
        samples.completion_ids,
        ctx.tokenizer.pad_token_id,
        cfg.batch_size,
    )
    sampled = [sum(lp) for lp in samples.logprobs] if samples.logprobs else None
    side.metrics["kl"], side.per_prompt["kl"] = M.kl_row(
        found.exact, found.k1, cfg.num_samples, sampled=sampled, scored=found.logp
    )
    dtype = next(ctx.model.parameters()).dtype
    if dtype in (torch.bfloat16, torch.float16):
        log.warning(
            "kl: the models run in %s, whose rounding differs between sampling and scoring and between the two "
            "models (SmolLM2-135M, 32-token answers: ~0.1 nats per answer); a smaller KL is within that noise, "
            "measure it with torch_dtype: float32 (sampling_gap here: %.3g)",
            str(dtype).removeprefix("torch."),
            side.metrics["kl"].get("sampling_gap", float("nan")),
        )


def preference_accuracy(ctx: EvalContext, side: Side) -> None:
    """DPO's implicit reward margin on held-out pairs: a property of each pair, not of a prompt."""

    cfg = ctx.cfg
    margins = implicit_reward_margins(
        ctx.model, ctx.reference, ctx.tokenizer, ctx.plan.pairs, cfg.beta, cfg.max_length, cfg.batch_size
    )
    side.metrics["preference_accuracy"], _ = M.preference_row(margins)


# ------------------------------------------------------------------------------------------ the reward model
def _reward_model_scores(ctx: EvalContext, side: Side) -> list[float]:
    """Per-prompt mean score of a side's answers (scored once, shared by the score and the win rate)."""
    import torch

    if "reward_model_score" not in side.per_prompt:
        k, examples = ctx.cfg.num_samples, ctx.examples
        prompts = [ex.prompt for ex in examples for _ in range(k)]
        flat = ctx.scorer(prompts, [t for ts in side.texts for t in ts], torch.device(device()))
        side.per_prompt["reward_model_score"] = [
            flat[i * k : (i + 1) * k].mean().item() for i in range(len(examples))
        ]
    return side.per_prompt["reward_model_score"]


def reward_model_score(ctx: EvalContext, side: Side) -> None:
    side.metrics["reward_model_score"] = M.mean_with_ci(_reward_model_scores(ctx, side), ctx.cfg.seed)


def reward_model_win_rate(ctx: EvalContext, side: Side) -> None:
    mine, theirs = (_reward_model_scores(ctx, s) for s in ctx.sides[:2])
    side.metrics["reward_model_win_rate"], side.per_prompt["reward_model_win_rate"] = M.win_rate(mine, theirs)


def _text(value: Any) -> str:
    return value[-1]["content"] if isinstance(value, list) else str(value)


def reward_model_preference_accuracy(ctx: EvalContext, side: Side) -> None:
    """Whether the reward model ranks the held-out pairs' chosen answer first: a property of the reward model."""
    import torch

    on, pairs = torch.device(device()), ctx.plan.pairs
    prompts = [ex.prompt for ex in pairs]
    chosen = ctx.scorer(prompts, [_text(ex.chosen) for ex in pairs], on)
    rejected = ctx.scorer(prompts, [_text(ex.rejected) for ex in pairs], on)
    side.metrics["reward_model_preference_accuracy"], _ = M.preference_row((chosen - rejected).tolist())


# --------------------------------------------------------------------------------------------------- the judge
def judge_score(ctx: EvalContext, side: Side) -> None:
    """MT-Bench style: every assistant turn graded 1-10 with the conversation before it; a prompt's score is the
    mean of its turns whose grade parsed (None when none did). Unparsable grades are left out of the summary and
    counted under `unparsable`; more than `judge_max_unparsable` of them stop the eval."""

    turns = [turn_prefixes(c) for c in side.conversations]
    grades = ctx.judge.grade([t for ts in turns for t in ts], max_unparsable=ctx.cfg.judge_max_unparsable)
    per_prompt: list[float | None] = []
    at = 0
    for ts in turns:
        parsed = [g for g in grades[at : at + len(ts)] if g is not None]
        per_prompt.append(sum(parsed) / len(parsed) if parsed else None)
        at += len(ts)
    row = summarize_grades(grades)
    side.metrics["judge_score"] = {"value": row.pop("mean"), **row}
    side.per_prompt["judge_score"] = per_prompt


def judge_win_rate(ctx: EvalContext, side: Side) -> None:
    """Pairwise verdicts on whole conversations, in both orders (position bias cancels); an item whose reply
    does not parse in either order has none (None per prompt, left out of the summary)."""

    verdicts = ctx.judge.pairwise(
        ctx.sides[0].conversations, ctx.sides[1].conversations, max_unparsable=ctx.cfg.judge_max_unparsable
    )
    row = summarize_pairwise(verdicts)
    side.metrics["judge_win_rate"] = {"value": row.pop("win_rate"), **row}
    side.per_prompt["judge_win_rate"] = [
        None if v["verdict"] is None else {"a": 1.0, "tie": 0.5, "b": 0.0}[v["verdict"]] for v in verdicts
    ]


# ---------------------------------------------------------------------------------------------------- lm-eval
def lm_eval(ctx: EvalContext, side: Side) -> None:
    from alignkit.evaluation.general import run_lm_eval

    cfg = ctx.cfg
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


def lm_eval_installed(cfg: Any) -> None:
    """lm-eval is optional: its absence is said before any model loads."""
    import importlib.util

    from alignkit.evaluation.general import MISSING

    try:
        found = importlib.util.find_spec("lm_eval") is not None
    except ValueError:  # set to None in sys.modules: treated as absent
        found = False
    if not found:
        raise UserError(MISSING)
