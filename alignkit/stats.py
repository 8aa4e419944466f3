"""Uncertainty for the numbers alignkit reports: a rate is never shown without its n and interval."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial rate (Wilson 1927); 95% with z = 1.96.

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0/n and n/n.
    """
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _resample_means(columns: list[list[float]], seed: int, resamples: int) -> list[list[float]]:
    """Means of each column over the same bootstrap resamples of the row index (a paired resample)."""
    import numpy as np

    data = np.asarray(columns, dtype=np.float64)  # (C, n)
    index = _bootstrap_index(data.shape[1], seed, resamples)  # (R, n)
    return data[:, index].mean(axis=2).tolist()  # (C, R)


def _bootstrap_index(n: int, seed: int, resamples: int) -> Any:
    """(resamples, n) row indices drawn with replacement: one bootstrap resample per row."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_ratio_ci(
    numerators: list[float],
    denominators: list[float],
    seed: int = 0,
    resamples: int = 2000,
    level: float = 0.95,
    transform: Callable[[Any], Any] | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(numerators) / sum(denominators), items resampled in pairs (a length
    ratio of two models on the same prompts; NLL per token); `transform` maps the ratios first (exp: perplexity)."""
    import numpy as np

    num, den = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    index = _bootstrap_index(len(num), seed, resamples)
    ratios = num[index].sum(1) / np.maximum(den[index].sum(1), 1e-9)
    return _percentiles(list(transform(ratios) if transform else ratios), level)


def _percentiles(values: list[float], level: float) -> tuple[float, float]:
    import numpy as np

    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(np.asarray(values), [tail, 100 - tail])
    return (float(lo), float(hi))


def bootstrap_mean_ci(
    values: list[float], seed: int = 0, resamples: int = 2000, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean (a win rate with ties as 0.5, a mean score, a mean length)."""
    if len(values) == 0:
        return (float("nan"), float("nan"))
    if len(values) == 1:
        return (float(values[0]), float(values[0]))
    return _percentiles(_resample_means([list(values)], seed, resamples)[0], level)


def paired_bootstrap(
    a: list[float], b: list[float], seed: int = 0, resamples: int = 2000, level: float = 0.95
) -> dict[str, float | bool | list[float]]:
    """The difference mean(a) - mean(b) of two methods scored on the same items, with a paired bootstrap
    interval (the items are resampled together, so per-item difficulty cancels) and whether it excludes 0."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_bootstrap needs two equal, non-empty lists (got {len(a)} and {len(b)})")
    diffs = [x - y for x, y in zip(a, b)]
    lo, hi = bootstrap_mean_ci(diffs, seed, resamples, level)
    return {
        "diff": sum(diffs) / len(diffs),
        "ci95": [lo, hi],
        "significant": bool(lo > 0 or hi < 0),
        "n": len(diffs),
    }


def mean_with_ci(values: list[float], seed: int = 0) -> dict[str, float | int | list[float]]:
    """{"value", "n", "ci95"} for a mean: what every report row carries."""
    vals = [float(v) for v in values]
    lo, hi = bootstrap_mean_ci(vals, seed)
    return {"value": sum(vals) / len(vals) if vals else float("nan"), "n": len(vals), "ci95": [lo, hi]}


def rate_with_ci(successes: list[bool] | list[float]) -> dict[str, float | int | list[float]]:
    """{"value", "n", "ci95"} for a rate, with the Wilson interval."""
    k, n = int(sum(bool(s) for s in successes)), len(successes)
    lo, hi = wilson_interval(k, n)
    return {"value": k / n if n else float("nan"), "n": n, "ci95": [lo, hi]}
