"""The eval report: a table (every value with n and its 95% interval), eval.json, eval.md, and samples.jsonl
with the worst cases first."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from alignkit.data.formats import Example
from alignkit.evaluation import registry


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.3f}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def _cell(row: dict | None) -> list[str]:
    if not row:
        return ["", "", ""]
    if row.get("value") is None:  # nothing to summarize: every judge verdict unparsable
        return ["", "", str(row.get("n", ""))]
    lo, hi = row.get("ci95", [float("nan"), float("nan")])
    return [_fmt(row["value"]), f"{_fmt(lo)}-{_fmt(hi)}", str(row.get("n", ""))]


def metric_rank(name: str) -> tuple[int, int, str]:
    """Table order: the metric registry's (task quality, reward model, judge, preferences, drift, safety,
    general ability, then any metric registered after them)."""
    return registry.row_rank(name)


def render_table(model: dict[str, dict], baseline: dict[str, dict] | None) -> str:
    head = "| metric | model | 95% CI | n |"
    rule = "|---|---|---|---|"
    if baseline is not None:
        head += " baseline | 95% CI | n |"
        rule += "---|---|---|"
    lines = [head, rule]
    names = sorted(list(model) + [k for k in (baseline or {}) if k not in model], key=metric_rank)
    for name in names:
        cells = [name, *_cell(model.get(name))]
        if baseline is not None:
            cells += _cell(baseline.get(name))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _worst_first_key(row: dict) -> tuple:
    """Lowest first on every higher-is-better score, in report order: wrong answers first, then the lowest
    reward-model score, then the lowest judge grade, ..."""
    scores = row["model"]["scores"]
    ranked = sorted((k for k in scores if registry.higher_is_better(k)), key=metric_rank)
    return tuple(_finite_or_inf(scores[k]) for k in ranked)


def _finite_or_inf(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else math.inf


def sample_rows(examples: list[Example], sides: list[Any]) -> list[dict]:
    rows = []
    for i, ex in enumerate(examples):
        row: dict[str, Any] = {"index": i, "where": ex.where, "prompt": ex.prompt}
        if "answer" in ex.extra:
            row["answer"] = ex.extra["answer"]
        for side in sides:
            entry: dict[str, Any] = {
                "completions": side.texts[i],
                "scores": {k: v[i] for k, v in side.per_prompt.items() if len(v) == len(examples)},
            }
            if len(side.conversations[i]) > len(ex.prompt if isinstance(ex.prompt, list) else [0]) + 1:
                entry["conversation"] = side.conversations[i]
            row[side.name] = entry
        rows.append(row)
    return sorted(rows, key=_worst_first_key)


def write_report(
    cfg: Any, examples: list[Example], sides: list[Any], skipped: dict[str, str], wall_s: float
) -> dict[str, Any]:
    model = sides[0].metrics
    baseline = sides[1].metrics if len(sides) > 1 else None
    table = render_table(model, baseline)
    report = {
        "model": cfg.model,
        "baseline": cfg.baseline,
        "dataset": cfg.dataset,
        "n_prompts": len(examples),
        "metrics": model,
        "baseline_metrics": baseline,
        "skipped": skipped,
        "wall_s": round(wall_s, 1),
        "config": dataclasses.asdict(cfg),
    }
    out = cfg.output_dir
    with open(os.path.join(out, "eval.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, ensure_ascii=False)
    with open(os.path.join(out, "samples.jsonl"), "w", encoding="utf-8") as fh:
        for row in sample_rows(examples, sides) if examples else []:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    skipped_md = "\n".join(f"- `{k}`: {v}" for k, v in skipped.items()) or "- none"
    measured = [spec for spec in registry.specs() if any(spec.row_index(r) is not None for r in model)]
    intervals = "; ".join(f"{spec.name}: {spec.interval}" for spec in measured)
    with open(os.path.join(out, "eval.md"), "w", encoding="utf-8") as fh:
        fh.write(
            f"# alignkit eval\n\nModel: `{cfg.model}`; baseline: `{cfg.baseline or 'none'}`; dataset: "
            f"`{cfg.dataset}` ({len(examples)} prompts, {cfg.num_samples} sample(s) each, temperature "
            f"{cfg.temperature}). 95% intervals: {intervals}.\n\n{table}\n\n"
            f"## Not measured\n{skipped_md}\n\nWorst cases first: samples.jsonl.\n"
        )
    report["table"] = table + ("\n\nnot measured:\n" + skipped_md if skipped else "")
    return report
