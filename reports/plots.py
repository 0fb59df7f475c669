"""PNG plots for reports/README.md.

Drawn on matplotlib's Agg canvas through `Figure` directly (no pyplot, no display,
no global state). The plots take plain records, not report rows, so that they can
be tested and reused without the aggregation around them. PNGs are written without
the matplotlib version in their metadata, so unchanged inputs give unchanged files
and CI commits no noise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from reports.tuning_curve import TuningPoint, best_so_far, read_tuning_curve, split_runs  # noqa: F401 (re-exported)

PRECISION_MARKERS = {"fp32": "o", "fp16": "s", "int8": "^"}
# Beyond this ratio between the slowest and fastest value, an axis is logarithmic
# (a GPU and an ARM board in one plot differ by far more than this).
LOG_SCALE_RATIO = 30.0


@dataclass(frozen=True)
class LatencySummary:
    """One target x precision's latencies: raw samples when bench recorded them, else percentiles."""

    label: str
    min_ms: float | None
    median_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    samples_ms: tuple[float, ...] = ()


@dataclass(frozen=True)
class AccuracyPoint:
    label: str
    precision: str
    median_ms: float
    accuracy: float  # a fraction: top-1, or top-1 agreement with the FP32 reference


def _save(figure: Figure, path: Path) -> Path:
    """Write a PNG atomically: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    figure.tight_layout()
    figure.savefig(temp, format="png", dpi=100, metadata={"Software": None})
    os.replace(temp, path)
    return path


def _log_if_spread(axis_setter, values: Sequence[float]) -> None:
    positive = [v for v in values if v is not None and v > 0]
    if positive and max(positive) / min(positive) > LOG_SCALE_RATIO:
        axis_setter("log")


def latency_distribution(summaries: Sequence[LatencySummary], path: Path, title: str) -> Path | None:
    """Per-run latency of each target: a box plot of the samples when present, otherwise
    a percentile strip (min-max line, median-p90 bar, p99 mark); None when nothing to draw."""
    drawable = [s for s in summaries if s.samples_ms or s.median_ms is not None]
    if not drawable:
        return None
    figure = Figure(figsize=(max(6.0, 1.2 * len(drawable) + 2.5), 4.2))
    ax = figure.add_subplot()
    values: list[float] = []
    any_samples = any_summary_only = False
    for x, summary in enumerate(drawable, start=1):
        if summary.samples_ms:
            ax.boxplot([list(summary.samples_ms)], positions=[x], widths=0.5, showfliers=True,
                       medianprops={"color": "C1"}, flierprops={"markersize": 3})
            values += list(summary.samples_ms)
            any_samples = True
            continue
        any_summary_only = True
        low = summary.min_ms if summary.min_ms is not None else summary.median_ms
        high = summary.max_ms if summary.max_ms is not None else summary.median_ms
        ax.vlines(x, low, high, color="C0", linewidth=1)
        if summary.p90_ms is not None:
            ax.vlines(x, summary.median_ms, summary.p90_ms, color="C0", linewidth=10, alpha=0.45)
        ax.plot([x], [summary.median_ms], marker="_", markersize=22, markeredgewidth=2, color="C1")
        if summary.p99_ms is not None:
            ax.plot([x], [summary.p99_ms], marker="x", color="C3")
        values += [v for v in (low, high, summary.p99_ms) if v is not None]
    ax.set_xticks(range(1, len(drawable) + 1), [s.label for s in drawable])
    ax.set_xlim(0.4, len(drawable) + 0.6)
    ax.set_ylabel("TVM latency per call (ms)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    _log_if_spread(ax.set_yscale, values)
    handles = []
    if any_samples:
        handles.append(Line2D([], [], color="black", marker="s", markerfacecolor="none", markersize=9,
                              linestyle="", label="samples: quartiles,\n1.5 IQR whiskers"))
    if any_summary_only:
        handles += [
            Line2D([], [], color="C0", linewidth=1, label="min - max"),
            Line2D([], [], color="C0", linewidth=8, alpha=0.45, label="median - p90"),
            Line2D([], [], color="C1", marker="_", markersize=14, linestyle="", label="median"),
            Line2D([], [], color="C3", marker="x", linestyle="", label="p99"),
        ]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(figure, path)


def latency_vs_accuracy(points: Sequence[AccuracyPoint], path: Path, title: str, metric: str) -> Path | None:
    """Median latency against accuracy, one marker shape per precision; None when no points."""
    if not points:
        return None
    figure = Figure(figsize=(6.5, 4.2))
    ax = figure.add_subplot()
    known = list(PRECISION_MARKERS)
    precisions = sorted({p.precision for p in points},
                        key=lambda p: (known.index(p) if p in known else len(known), p))
    for index, precision in enumerate(precisions):
        chosen = [p for p in points if p.precision == precision]
        ax.scatter([p.median_ms for p in chosen], [100 * p.accuracy for p in chosen],
                   marker=PRECISION_MARKERS.get(precision, "D"), color=f"C{index}", label=precision, s=45)
        for p in chosen:
            ax.annotate(p.label, (p.median_ms, 100 * p.accuracy), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)
    ax.set_xlabel("TVM median latency (ms)")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    _log_if_spread(ax.set_xscale, [p.median_ms for p in points])
    accuracies = [100 * p.accuracy for p in points]
    # A flat 100% line otherwise sits on the frame, where it cannot be seen.
    margin = max(1.0, 0.1 * (max(accuracies) - min(accuracies)))
    ax.set_ylim(min(accuracies) - margin, max(accuracies) + margin)
    ax.legend(title="precision", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(figure, path)


def tuning_curves(curves: dict[str, Sequence[TuningPoint]], path: Path, title: str,
                  measured_ms: dict[str, float] | None = None) -> Path | None:
    """The model latency tuning estimated against trials: one line per tuning run (a resumed
    run's curve file joins several), best so far; a dashed line at each label's measured
    median in the same milliseconds. None when there are no curves."""
    curves = {label: points for label, points in curves.items() if points}
    if not curves:
        return None
    figure = Figure(figsize=(6.5, 4.2))
    ax = figure.add_subplot()
    values: list[float] = []
    for index, (label, points) in enumerate(curves.items()):
        runs = [best_so_far(run) for run in split_runs(points)]
        for number, run in enumerate(runs, start=1):
            name = label if len(runs) == 1 else f"{label}, run {number}"
            ax.plot([p.trials for p in run], [p.best_ms for p in run], drawstyle="steps-post", marker=".",
                    color=f"C{index}", alpha=1.0 if number == len(runs) else 0.5, label=name)
            values += [p.best_ms for p in run]
        median = (measured_ms or {}).get(label)
        if median is not None:
            ax.axhline(median, color=f"C{index}", linestyle="--", linewidth=1, label=f"{label}: measured median")
            values.append(median)
    ax.set_xlabel("tuning trials")
    ax.set_ylabel("model latency (ms)")
    ax.set_title(f"{title}\nsolid: tuning's estimate (sum over kernels of calls x best time), best so far",
                 fontsize=9)
    ax.grid(alpha=0.3)
    _log_if_spread(ax.set_yscale, values)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(figure, path)
