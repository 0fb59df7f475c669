"""Tuning curves as the reports show them.

A tuning database's curve (``tune_curve.jsonl``, copied into a report's ``tuning.json``)
has one point per tuning round: trials so far, and the model latency estimated from the
best time of every kernel measured so far. A resumed run appends to the same file with
its clock started again, so the file joins runs; and the first points of a run cover only
the kernels measured by then. What the reports draw and claim therefore comes from one run
at a time, from the points that cover all of that run's kernels, as the best so far.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from reports.warn import warn


@dataclass(frozen=True)
class TuningPoint:
    trials: int
    best_ms: float
    seconds: float | None = None
    kernels: int | None = None  # kernels measured when the point was taken


def read_tuning_curve(path: Path, warnings: list[str] | None = None) -> list[TuningPoint] | None:
    """The curve in a tuning.json ({"curve": [{"trials", "best_ms", "seconds", "kernels_measured"}, ...]});
    None when the file is absent, or unreadable (with a warning naming it)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data: Any = json.loads(path.read_text())
        points = [
            TuningPoint(int(p["trials"]), float(p["best_ms"]),
                        None if p.get("seconds") is None else float(p["seconds"]),
                        None if p.get("kernels_measured") is None else int(p["kernels_measured"]))
            for p in data["curve"]
        ]
    except json.JSONDecodeError as exc:
        warn(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); skipped", warnings)
        return None
    except (OSError, KeyError, TypeError, ValueError, AttributeError) as exc:
        warn(f"{path}: not a tuning curve ({type(exc).__name__}: {exc}); "
             'expected {"curve": [{"trials": n, "best_ms": x, "seconds": s}, ...]}; skipped', warnings)
        return None
    if any(not math.isfinite(p.best_ms) for p in points):
        warn(f"{path}: best_ms must be finite numbers; skipped", warnings)
        return None
    return points


def curve_database(path: Path) -> str | None:
    """The database a readable tuning.json says its curve came from."""
    try:
        database = json.loads(Path(path).read_text()).get("database")
    except (OSError, ValueError, AttributeError):
        return None
    return database if isinstance(database, str) else None


def split_runs(points: Iterable[TuningPoint]) -> list[list[TuningPoint]]:
    """The runs a curve joins, in file order: a run starts where the clock went back."""
    runs: list[list[TuningPoint]] = []
    last = None
    for point in points:
        if not runs or (point.seconds is not None and last is not None and point.seconds < last):
            runs.append([])
        runs[-1].append(point)
        last = point.seconds if point.seconds is not None else last
    return runs


def best_so_far(run: Sequence[TuningPoint]) -> list[TuningPoint]:
    """One run's points that cover all the kernels it measured, in trial order, each with the
    lowest estimate up to it (an estimate that leaves kernels out is not the model's)."""
    counts = [p.kernels for p in run if p.kernels is not None]
    complete = [p for p in run if p.kernels is None or not counts or p.kernels == max(counts)]
    result: list[TuningPoint] = []
    for point in sorted(complete, key=lambda p: p.trials):
        if result and result[-1].best_ms < point.best_ms:
            point = TuningPoint(point.trials, result[-1].best_ms, point.seconds, point.kernels)
        result.append(point)
    return result


def count_runs(curve: Sequence[dict[str, Any]]) -> int:
    """How many runs a database's curve (the dicts of tune_curve.jsonl) joins."""
    return len(split_runs(TuningPoint(int(p["trials"]), float(p["best_ms"]), p.get("seconds")) for p in curve))
