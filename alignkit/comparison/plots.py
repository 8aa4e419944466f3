"""Compare's PNGs: metrics with their intervals, training curves on shared axes, the accuracy-KL frontier and
length drift. Each method keeps one colour in every plot."""

from __future__ import annotations

import math
import os
from typing import Any

from alignkit.comparison.report import LENGTH_RATIO_LIMIT
from alignkit.evaluation import registry
from alignkit.evaluation.report import metric_rank
from alignkit.training.tracking import read_metrics

# (metrics.jsonl key, panel title): a panel is drawn only when some method logged the key
CURVES = (
    ("loss", "training loss"),
    ("reward/mean", "reward (online: reward/mean)"),
    ("rewards/margins", "implicit reward margin (DPO family, KTO)"),
    ("kl", "KL to the reference (as logged)"),
)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colours(names: list[str]) -> dict[str, Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def _err(row: dict) -> tuple[float, float]:
    """Error-bar lengths below and above the value (never negative: a ratio's interval can sit off-centre)."""
    lo, hi = row.get("ci95", [row["value"], row["value"]])
    return max(row["value"] - lo, 0.0), max(hi - row["value"], 0.0)


def _finite(row: dict | None) -> bool:
    return bool(row) and isinstance(row.get("value"), (int, float)) and math.isfinite(row["value"])


def _save(fig: Any, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # a legend placed outside the axes stays in the file
    _plt().close(fig)
    return os.path.basename(path)


def _metric_panel(ax: Any, metric: str, present: list[tuple[str, dict]], colours: dict, flagged: set) -> None:
    """Bars from 0 for a quantity that cannot be negative; points where it can (a reward model's score), since
    a bar from 0 to a negative score hides the differences that matter."""
    xs = list(range(len(present)))
    values = [row["value"] for _, row in present]
    signed = any(row["value"] < 0 or row.get("ci95", [0, 0])[0] < 0 for _, row in present)
    for x, (name, row) in zip(xs, present):
        low, high = _err(row)
        if not signed:
            ax.bar(x, row["value"], color=colours[name])
        ax.errorbar(
            x,
            row["value"],
            yerr=[[low], [high]],
            fmt="o" if signed else "none",
            color=colours[name],
            ecolor="black",
            capsize=4,
            ms=7,
        )
        # the value itself (a bar at 0 is otherwise invisible), beside the interval rather than on it
        ax.annotate(
            f"{row['value']:.3g}",
            (x, row["value"]),
            textcoords="offset points",
            xytext=(6, 0),
            fontsize=8,
            va="center",
        )
    ax.set_xticks(xs, [n for n, _ in present], rotation=20, ha="right", fontsize=8)
    for label, (name, _) in zip(ax.get_xticklabels(), present):
        if name in flagged:  # reward hacking: the same mark in every panel
            label.set_color("red")
    ax.set_xlim(-0.6, len(values) - 0.4)


def panel_metrics(report: dict[str, Any]) -> list[str]:
    """The metrics of `plot_metrics`' panels, in report order: every row some method has a number for."""
    methods = report["methods"]
    return sorted(
        {m for r in methods.values() for m, row in r["metrics"].items() if _finite(row)}, key=metric_rank
    )


def plot_metrics(report: dict[str, Any], path: str) -> str | None:
    """One panel per metric: each method with its 95% interval, the starting model as a dashed line."""
    methods, base = report["methods"], report["baseline"]["metrics"] or {}
    names = panel_metrics(report)
    if not names:
        return None
    plt, colours = _plt(), _colours(list(methods))
    flagged = {n for n, r in methods.items() if r.get("flags")}
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.3 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, names):
        present = [(n, r["metrics"][metric]) for n, r in methods.items() if _finite(r["metrics"].get(metric))]
        _metric_panel(ax, metric, present, colours, flagged)
        if _finite(base.get(metric)):
            ax.axhline(base[metric]["value"], ls="--", color="grey", label="start")
        elif registry.is_win_rate(metric):  # against the start already: its reference is an even split
            ax.axhline(0.5, ls="--", color="grey", label="even split")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best", framealpha=0.6)
        ax.set_title(metric, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    note = "; red: flagged for reward hacking" if flagged else ""
    fig.suptitle(f"eval metrics (95% intervals; dashed: starting model{note})", fontsize=11)
    return _save(fig, path)


def plot_curves(report: dict[str, Any], path: str) -> str | None:
    """Training curves of every method on shared axes, one panel per logged quantity."""
    methods = report["methods"]
    logs = {n: read_metrics(os.path.join(r["run_dir"], "metrics.jsonl")) for n, r in methods.items()}
    panels = [(k, t) for k, t in CURVES if any(k in rec for recs in logs.values() for rec in recs)]
    if not panels:
        return None
    plt, colours = _plt(), _colours(list(methods))
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for name, recs in logs.items():
            points = [(r["step"], r[key]) for r in recs if key in r and "step" in r]
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, color=colours[name], label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def frontier_axes(report: dict[str, Any]) -> tuple[str, str] | None:
    """(x, y) of the frontier plot from the metric registry: its distance from the starting model (KL) and the
    first quality metric some method measured (accuracy, else the judge's score, else the reward model's)."""
    methods = report["methods"]
    x = registry.frontier_x()
    measured = (
        k for k in registry.frontier_y() if any(_finite(r["metrics"].get(k)) for r in methods.values())
    )
    y = next(measured, None)
    return (x.name, y) if x is not None and y is not None else None


def plot_frontier(report: dict[str, Any], path: str) -> str | None:
    """A quality metric against the distance from the starting model, per method (`frontier_axes`)."""
    methods, base = report["methods"], report["baseline"]["metrics"] or {}
    axes = frontier_axes(report)
    x_key, y_key = axes or ("", "")
    points = [
        (n, r["metrics"][x_key], r["metrics"][y_key])
        for n, r in methods.items()
        if axes and _finite(r["metrics"].get(x_key)) and _finite(r["metrics"].get(y_key))
    ]
    if not points:
        return None
    plt, colours = _plt(), _colours(list(methods))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, x, y in points:
        ax.errorbar(
            x["value"],
            y["value"],
            xerr=[[_err(x)[0]], [_err(x)[1]]],
            yerr=[[_err(y)[0]], [_err(y)[1]]],
            fmt="o",
            color=colours[name],
            capsize=4,
            label=f"{name} (reward hacking?)" if methods[name].get("flags") else name,
        )
    if _finite(base.get(y_key)):
        ax.plot(
            [0.0],
            [base[y_key]["value"]],
            marker="*",
            ms=14,
            color="grey",
            ls="none",
            label=f"start ({x_key} 0)",
        )
    ax.set_xlabel(registry.REGISTRY[x_key].label or x_key)
    ax.set_ylabel(y_key)
    ax.set_title(f"{y_key} against {x_key}: the trade-off frontier (bars: 95% intervals)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _save(fig, path)


def plot_length(report: dict[str, Any], path: str) -> str | None:
    """Length ratio to the starting model's answers per method, with 1.0 (no drift) and 1.5 (flagged)."""
    methods = report["methods"]
    present = [
        (n, r["metrics"]["length_ratio"])
        for n, r in methods.items()
        if _finite(r["metrics"].get("length_ratio"))
    ]
    if not present:
        return None
    plt, colours = _plt(), _colours(list(methods))
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(present) + 2), 3.8))
    xs = range(len(present))
    ax.bar(xs, [r["value"] for _, r in present], color=[colours[n] for n, _ in present])
    ax.errorbar(
        xs,
        [r["value"] for _, r in present],
        yerr=list(zip(*(_err(r) for _, r in present))),
        fmt="none",
        ecolor="black",
        capsize=4,
    )
    ax.axhline(1.0, ls="--", color="grey", label="1.0: same length as the start")
    ax.axhline(LENGTH_RATIO_LIMIT, ls=":", color="red", label=f"{LENGTH_RATIO_LIMIT}: flagged above")
    ax.set_xticks(list(xs), [n for n, _ in present], rotation=20, ha="right")
    ax.set_ylabel("mean answer tokens / starting model's")
    ax.set_title("length drift (bars: 95% interval)", fontsize=10)
    ax.set_ylim(0, max(LENGTH_RATIO_LIMIT * 1.15, max(r["ci95"][1] for _, r in present) * 1.1))
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def write_plots(report: dict[str, Any], output_dir: str) -> list[str]:
    """The PNG file names written into output_dir (a plot without data is left out)."""
    made = []
    for name, plot in PLOTS.items():
        path = os.path.join(output_dir, name)
        if plot(report, path):
            made.append(name)
        elif os.path.exists(path):  # an earlier compare's plot would describe other runs
            os.remove(path)
    return made


PLOTS = {
    "metrics.png": plot_metrics,
    "curves.png": plot_curves,
    "frontier.png": plot_frontier,
    "length.png": plot_length,
}
