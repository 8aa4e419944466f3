"""General ability through EleutherAI's lm-eval harness (the optional extra `alignkit[eval]`).

The model is loaded by `load_causal_lm` (the one loader of `eval`, `sxs` and `compare`) and handed to lm-eval's
HFLM as an instance, so a LoRA adapter folder, its saved tokenizer and the dtype rules work here exactly as they
do everywhere else in alignkit. Each task's (and group's) headline metric comes back with n and a 95% interval.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from alignkit.errors import UserError, did_you_mean
from alignkit.modeling.load import load_causal_lm
from alignkit.stats import wilson_interval

MISSING = 'lm_eval_tasks needs EleutherAI\'s lm-eval harness: pip install "alignkit[eval]"'
# Metrics that are not bounded by 1, so their normal interval is not clipped to [0, 1].
_UNBOUNDED = ("perplexity", "bits_per_byte")


def run_lm_eval(
    model_path: str,
    tasks: list[str],
    include_path: str | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    torch_dtype: str = "auto",
    trust_remote_code: bool = False,
    device: str = "cpu",
) -> dict[str, dict]:
    """{task or group: {"metric", "value", "stderr", "n", "ci95", "interval"}} for everything lm-eval reports.

    `tasks` are lm-eval task, group or tag names (or task YAML paths); `include_path` is a folder of the user's
    own task YAMLs. A rate's interval is Wilson's from the per-document successes; other metrics get
    value +- 1.96 * lm-eval's stderr.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise UserError(MISSING) from err
    if not tasks:
        raise UserError("lm_eval_tasks is empty: name at least one lm-eval task, e.g. [mmlu]")
    if include_path is not None and not os.path.isdir(include_path):
        raise UserError(f"lm_eval_include_path {include_path} is not a folder of task YAML files")
    # Names are checked before the model loads, so a typo costs seconds, not a model load.
    manager = _task_manager(TaskManager, list(tasks), include_path)

    model, tokenizer = load_causal_lm(model_path, torch_dtype, trust_remote_code, device)
    hf_logger = logging.getLogger(HFLM.__module__)
    level = hf_logger.level
    # HFLM warns that a model instance makes some of its arguments unused; we pass none of them.
    hf_logger.setLevel(logging.ERROR)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        hf_logger.setLevel(level)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=True,  # the per-document scores give a rate's exact successes for its Wilson interval
    )
    return summarize(results)


def _task_manager(task_manager_cls: Any, tasks: list[str], include_path: str | None) -> Any:
    """An index that knows every requested name; a UserError naming the unknown ones otherwise.

    Indexing lm-eval's own ~15k task files takes many seconds, so when every name is a task of the user's
    folder (or a group of those tasks) only that folder is indexed.
    """
    if include_path is not None:
        local = task_manager_cls(include_path=include_path, include_defaults=False)
        if all(_is_local(local, name) for name in tasks):
            return local
    manager = task_manager_cls(include_path=include_path)
    known = set(manager.all_tasks)
    unknown = [name for name in tasks if name not in known and not os.path.isfile(name)]
    if unknown:
        hints = "; ".join(f"`{name}`{did_you_mean(name, known)}" for name in unknown)
        where = f" or of {include_path}" if include_path else ""
        raise UserError(
            f"lm_eval_tasks: not a task, group or tag of lm-eval{where}: {hints}. "
            "`lm-eval ls tasks` lists lm-eval's own; your task YAMLs go in lm_eval_include_path"
        )
    return manager


def _is_local(local: Any, name: str) -> bool:
    """`name` is a plain task of the user's folder, or a group whose members all are."""
    if name in local.all_subtasks:
        return True
    if name not in local.all_groups:
        return False
    # older lm-eval versions keep no parsed config in their index: such a group is looked up in the full one
    cfg = getattr(local.task_index.get(name), "cfg", None) or {}
    members = cfg.get("task", [])
    members = members if isinstance(members, list) else [members]
    return all(isinstance(m, str) and m in local.all_subtasks for m in members)


def summarize(results: dict[str, Any]) -> dict[str, dict]:
    """lm-eval's `simple_evaluate` output -> one row per task and group (its first-listed metric)."""
    counts = _rate_counts(results)
    rows: dict[str, dict] = {}
    for name, row in results.get("results", {}).items():
        key = _primary_metric(row)
        if key is None:  # a group without an aggregate metric reports nothing of its own
            continue
        value, stderr = float(row[key]), _number(row.get(key.replace(",", "_stderr,", 1)))
        count = counts.get((name, key)) or _group_count(results, name, key, counts)
        n = count[1] if count else _sample_count(results, name)
        if count and math.isclose(value, count[0] / count[1], abs_tol=1e-9):
            ci, interval = list(wilson_interval(count[0], count[1])), "wilson"
        elif stderr is not None:
            ci, interval = _normal_interval(key, value, stderr), "normal"
        else:
            ci, interval = None, None
        metric = key.split(",")[0] if key.endswith(",none") else key
        rows[name] = {
            "metric": metric,
            "value": value,
            "stderr": stderr,
            "n": n,
            "ci95": ci,
            "interval": interval,
        }
    return rows


def _primary_metric(row: dict[str, Any]) -> str | None:
    """The first "metric,filter" key with a number: lm-eval lists a task's metrics in its metric_list order."""
    for key, value in row.items():
        if "," in key and "_stderr," not in key and _number(value) is not None:
            return key
    return None


def _number(value: Any) -> float | None:
    """lm-eval writes "N/A" (or nothing) where it has no number, e.g. a stderr with bootstrap_iters=0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def _rate_counts(results: dict[str, Any]) -> dict[tuple[str, str], tuple[int, int]]:
    """(task, "metric,filter") -> (successes, n) where every per-document score is 0 or 1."""
    counts = {}
    for task, samples in results.get("samples", {}).items():
        by_filter: dict[str, list[dict]] = {}
        for sample in samples:
            by_filter.setdefault(sample.get("filter", "none"), []).append(sample)
        for key in results.get("results", {}).get(task, {}):
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            scores = [s.get(metric) for s in by_filter.get(filt, [])]
            if scores and all(_number(x) in (0.0, 1.0) for x in scores):
                counts[(task, key)] = (int(sum(scores)), len(scores))
    return counts


def _group_count(
    results: dict[str, Any], group: str, key: str, counts: dict[tuple[str, str], tuple[int, int]]
) -> tuple[int, int] | None:
    """A group's pooled (successes, n) when all its tasks are rates of the same metric; used only where the
    group's value equals the pooled rate (lm-eval's weight_by_size mean), else the group is a mean of rates."""
    members = results.get("group_subtasks", {}).get(group)
    if not members:
        return None
    total = [0, 0]
    for member in members:
        count = counts.get((member, key)) or _group_count(results, member, key, counts)
        if count is None:
            return None
        total[0], total[1] = total[0] + count[0], total[1] + count[1]
    return (total[0], total[1]) if total[1] else None


def _sample_count(results: dict[str, Any], name: str) -> int | None:
    """Documents evaluated: a task's effective n-samples (after `limit`), a group's over its members."""
    effective = results.get("n-samples", {}).get(name, {}).get("effective")
    if effective is not None:
        return int(effective)
    sample_len = results.get("results", {}).get(name, {}).get("sample_len")
    if sample_len is not None:
        return int(sample_len)
    members = results.get("group_subtasks", {}).get(name) or []
    sizes = [_sample_count(results, member) for member in members]
    return sum(s for s in sizes if s is not None) if sizes and None not in sizes else None


def _normal_interval(key: str, value: float, stderr: float) -> list[float]:
    low, high = value - 1.96 * stderr, value + 1.96 * stderr
    if 0.0 <= value <= 1.0 and not any(word in key for word in _UNBOUNDED):
        low, high = max(0.0, low), min(1.0, high)
    return [low, high]
