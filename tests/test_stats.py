"""The uncertainty helpers every report uses."""

from __future__ import annotations

import random

import pytest

from alignkit.stats import bootstrap_mean_ci, mean_with_ci, paired_bootstrap, rate_with_ci, wilson_interval


def test_wilson_interval_known_values() -> None:
    lo, hi = wilson_interval(5, 10)  # the textbook case
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_n() -> None:
    rng = random.Random(0)
    small = [rng.random() for _ in range(30)]
    big = [rng.random() for _ in range(3000)]
    lo, hi = bootstrap_mean_ci(small)
    assert lo < sum(small) / len(small) < hi
    blo, bhi = bootstrap_mean_ci(big)
    assert (bhi - blo) < (hi - lo) / 5  # about 1/sqrt(100) as wide
    # a uniform(0, 1) mean has sd 0.2887/sqrt(n): the 95% interval is about 2 * 1.96 * that wide
    assert bhi - blo == pytest.approx(2 * 1.96 * 0.2887 / 3000**0.5, rel=0.15)


def test_paired_bootstrap_cancels_per_item_difficulty() -> None:
    """b is a plus a constant 0.05 on items of very different difficulty: paired, the difference is sure;
    an unpaired comparison of the two means could not tell them apart."""
    rng = random.Random(1)
    a = [rng.uniform(0, 10) for _ in range(50)]
    b = [x + 0.05 for x in a]
    out = paired_bootstrap(b, a)
    assert out["diff"] == pytest.approx(0.05)
    assert (
        out["significant"] and out["ci95"][0] == pytest.approx(0.05) and out["ci95"][1] == pytest.approx(0.05)
    )
    lo_a, hi_a = bootstrap_mean_ci(a)
    assert lo_a < sum(b) / len(b) < hi_a  # unpaired, b's mean lies inside a's interval


def test_paired_bootstrap_false_alarm_rate_is_about_five_percent() -> None:
    """Two methods with the same 50% accuracy: the 95% interval excludes 0 in about 5% of draws."""
    rng = random.Random(2)
    alarms = 0
    for trial in range(200):
        a = [float(rng.random() < 0.5) for _ in range(100)]
        b = [float(rng.random() < 0.5) for _ in range(100)]
        alarms += paired_bootstrap(a, b, seed=trial, resamples=500)["significant"]
    assert 2 <= alarms <= 22  # 10 expected; a binomial(200, 0.05) lies in 2..22 with > 99.9% probability
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 2.0])


def test_report_rows_carry_value_n_and_interval() -> None:
    assert rate_with_ci([True, False, True, True]) == {
        "value": 0.75,
        "n": 4,
        "ci95": list(wilson_interval(3, 4)),
    }
    row = mean_with_ci([1.0, 2.0, 3.0])
    assert row["value"] == 2.0 and row["n"] == 3 and row["ci95"][0] < 2.0 < row["ci95"][1]
