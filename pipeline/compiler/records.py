"""Reading a tuning database (the directory MetaSchedule's records live in, with the
``meta.json`` naming the target and TVM version that made it; the files below): whether its
records fit a target, opening it (without the lines TVM cannot read back), its tuning curve.

Compile's schedule phase reads records through this module (schedules/apply.py); where
databases live, which one compile uses, and writing, merging and shipping them is
pipeline/compiler/tuning/database.py's, above it.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import tvm
from tvm.s_tir import meta_schedule as ms

from pipeline import artifacts
from pipeline.engine import log
from pipeline.errors import PipelineError
from pipeline.compiler.tensor_intrinsics import load_tensor_intrinsics
from targets import Target


WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
META_FILE = "meta.json"
STATE_FILE = "tune_state.json"
CURVE_FILE = "tune_curve.jsonl"


def warn(message: str) -> None:
    log(f"warning: {message}")


@functools.lru_cache(maxsize=None)
def note_once(message: str) -> None:
    """Said once per process, as warn_once, but news rather than a problem."""
    log(message)


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    """A warning about a database, said once per process: compile looks it up twice (for
    its cache key and to build)."""
    warn(message)


def _without_cpu_model(tvm_target: dict[str, Any]) -> dict[str, Any]:
    stripped = {k: v for k, v in tvm_target.items() if k not in ("mcpu", "num-cores")}
    if isinstance(stripped.get("host"), dict):
        stripped["host"] = _without_cpu_model(stripped["host"])
    return stripped


def target_fit(made_for: dict[str, Any], target: Target) -> str:
    """How records made for the TVM target `made_for` fit `target`: "same"; "similar"
    (another CPU model or core count of the same kind and triple: a trace replays there
    and gives correct code, compiled for this CPU, but was timed on another one); else
    "foreign". A GPU target's records time its GPU kernels, so another host CPU of the same
    GPU architecture is "same"."""
    if made_for == target.tvm_target:
        return "same"
    if _without_cpu_model(made_for) == _without_cpu_model(target.tvm_target):
        return "same" if made_for.get("kind") == "cuda" else "similar"
    return "foreign"


def read_meta(db_dir: Path) -> dict[str, Any]:
    return json.loads((Path(db_dir) / META_FILE).read_text())


def meta_problem(db_dir: Path) -> str | None:
    """Why the database's meta.json cannot say what its records were made for (None: it
    can), with what to do: without it the records cannot be checked against the target."""
    path = Path(db_dir) / META_FILE
    try:
        meta = read_meta(db_dir)
        if not (isinstance(meta, dict) and isinstance(meta.get("target_json"), dict)
                and isinstance(meta.get("tvm_version"), str)):
            raise ValueError("no target_json and tvm_version")
    except (OSError, ValueError) as exc:
        why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        return (f"{path} is unreadable ({why}), so its records cannot be checked against the target; "
                f"restore it (`git checkout {path}` for shipped records) or delete {Path(db_dir)}")
    return None


def database_problem(db_dir: Path, target: Target | None, *, similar_ok: bool = False) -> str | None:
    """Why the database in db_dir cannot be used for target (None: it can).

    Records made by another TVM version may not replay (schedule primitives and the IR
    printer change between releases), and records made for another target would be
    applied anyway, since MetaSchedule looks records up by workload only. With
    `similar_ok`, records of another CPU model of the same target kind are usable."""
    db_dir = Path(db_dir)
    missing = [name for name in (WORKLOAD_FILE, RECORD_FILE, META_FILE) if not (db_dir / name).is_file()]
    if missing:
        return f"{db_dir} is not a tuning database (no {', '.join(missing)})"
    unreadable = meta_problem(db_dir)
    if unreadable is not None:
        return unreadable
    meta = read_meta(db_dir)
    made_for, made_with = meta["target_json"], meta["tvm_version"]
    if made_with != tvm.__version__:
        return f"{db_dir} was tuned with TVM {made_with}, this is TVM {tvm.__version__}"
    fit = target_fit(made_for, target) if target is not None else "same"
    if fit == "foreign" or (fit == "similar" and not similar_ok):
        return (f"{db_dir} was tuned for {json.dumps(made_for, sort_keys=True)}, "
                f"not for target '{target.name}' {target.target_json()}")
    return None


def timed_against(db_dir: Path) -> int:
    """The version of the default schedules (schedules/cpu.py, gpu.py) a database's records were
    timed against and beat; 0 for records made before versions were recorded."""
    version = read_meta(db_dir).get("default_schedule_version", 0)
    return version if isinstance(version, int) else 0


def _loads(workloads: str, records: list[str]) -> bool:
    with tempfile.TemporaryDirectory(prefix="tvm-db-check-") as scratch:
        (Path(scratch) / WORKLOAD_FILE).write_text(workloads)
        (Path(scratch) / RECORD_FILE).write_text("".join(records))
        try:
            ms.database.JSONDatabase(str(Path(scratch) / WORKLOAD_FILE), str(Path(scratch) / RECORD_FILE),
                                     allow_missing=False)
            return True
        except Exception:
            return False


def _unreplayable(workloads: str, records: list[str], indices: list[int]) -> list[int]:
    """The records among `indices` that do not load, by bisection (few are expected)."""
    if not indices or _loads(workloads, [records[i] for i in indices]):
        return []
    if len(indices) == 1:
        return indices
    middle = len(indices) // 2
    return _unreplayable(workloads, records, indices[:middle]) + _unreplayable(workloads, records, indices[middle:])


def _table(path: Path, is_row) -> tuple[list[tuple[int, str, Any]], list[int]]:
    """The lines of one of MetaSchedule's JSON tables that are rows of the shape TVM writes
    (`is_row`), as (line number, text, value), and the numbers of the other, non-blank lines."""
    rows, bad = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            value = None
        if is_row(value):
            rows.append((number, line, value))
        else:
            bad.append(number)
    return rows, bad


def _is_workload(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)


def _is_record(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], int)
            and not isinstance(value[0], bool) and isinstance(value[1], list))


def _line_numbers(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:10])
    more = f", ... ({len(numbers)} in all)" if len(numbers) > 10 else ""
    return f"line{'s' if len(numbers) > 1 else ''} {shown}{more}"


def _open_without_bad_records(db_dir: Path, *, repair: bool) -> "ms.database.JSONDatabase | None":
    """A database without the lines TVM cannot read, or None when no record is left.

    A line that is not JSON (a garbage line, a line cut short when a run was killed) costs
    that line only, and so does a record TVM 0.27 wrote but its own reader rejects (seen:
    rfactor traces of ConvNeXt-T's last LayerNorm, on 1 x 768), rather than failing the
    whole database. Each file's bad lines are named in a warning. They are dropped from the
    files themselves when `repair` (the database being tuned), else from a copy read once
    (compile, merge), leaving the files as they are."""
    workload_rows, bad_workloads = _table(db_dir / WORKLOAD_FILE, _is_workload)
    record_rows, bad_records = _table(db_dir / RECORD_FILE, _is_record)
    # A record names its workload by line (0-based, as TVM counts them); with lines left
    # out, the records after them are renumbered, and a record of a bad line has none.
    renumbered = {number - 1: index for index, (number, _, _) in enumerate(workload_rows)}
    records: list[tuple[int, str]] = []
    for number, line, (workload, body) in record_rows:
        if workload not in renumbered:
            bad_records.append(number)
        elif renumbered[workload] == workload:
            records.append((number, line + "\n"))
        else:
            records.append((number, json.dumps([renumbered[workload], body], separators=(",", ":")) + "\n"))
    workloads = "".join(line + "\n" for _, line, _ in workload_rows)
    if not _loads(workloads, []):
        return None  # a workload that parses but TVM rejects: not a matter of lines
    lines = [line for _, line in records]
    dropped = set(_unreplayable(workloads, lines, list(range(len(lines)))))
    kept = [line for i, line in enumerate(lines) if i not in dropped]
    bad_records = sorted(bad_records + [records[i][0] for i in dropped])
    if not bad_records and not bad_workloads:
        return None  # every line reads alone: what fails is not one record
    done = "removed" if repair else "skipped"
    if bad_workloads:
        warn(f"{db_dir / WORKLOAD_FILE}: {_line_numbers(bad_workloads)} not a workload TVM can read; {done}")
    if bad_records:
        warn(f"{db_dir / RECORD_FILE}: {_line_numbers(bad_records)} not a record TVM {tvm.__version__} can load "
             f"(or of an unreadable workload); {done}, {len(kept)} of {len(kept) + len(bad_records)} records kept")
    if not kept or not _loads(workloads, kept):
        return None
    if repair:
        # Records first: they are renumbered only with workload lines left out, and then a
        # kill between the two renames leaves records numbered for a table not yet written.
        artifacts.atomic_write_text(db_dir / RECORD_FILE, "".join(kept))
        if bad_workloads:
            artifacts.atomic_write_text(db_dir / WORKLOAD_FILE, workloads)
        for name in (WORKLOAD_FILE, RECORD_FILE):
            (db_dir / name).chmod(0o644)
        return ms.database.JSONDatabase(str(db_dir / WORKLOAD_FILE), str(db_dir / RECORD_FILE), allow_missing=False)
    with tempfile.TemporaryDirectory(prefix="tvm-db-") as scratch:
        (Path(scratch) / WORKLOAD_FILE).write_text(workloads)
        (Path(scratch) / RECORD_FILE).write_text("".join(kept))
        # Read now, into memory: nothing is committed to a database opened for reading.
        return ms.database.JSONDatabase(str(Path(scratch) / WORKLOAD_FILE), str(Path(scratch) / RECORD_FILE),
                                        allow_missing=False)


def open_database(db_dir: Path, target: Target | None, *, strict: bool,
                  repair: bool = False, similar_ok: bool = False) -> "ms.database.JSONDatabase | None":
    """Load a database; a foreign or corrupt one raises (strict) or warns and gives None.
    Records TVM cannot load back are skipped (removed from the files with `repair`)."""
    db_dir = Path(db_dir)
    problem = database_problem(db_dir, target, similar_ok=similar_ok)
    if problem is None:
        # Reading a record replays its trace, and a trace that tensorizes (the int8 VNNI
        # kernels: the pipeline's default, and MetaSchedule's own VNNI candidates) needs its
        # intrinsic registered. Loading them costs seconds, so only for such records.
        if "Tensorize" in (db_dir / RECORD_FILE).read_text():
            load_tensor_intrinsics()
        try:
            return ms.database.JSONDatabase(
                str(db_dir / WORKLOAD_FILE), str(db_dir / RECORD_FILE), allow_missing=False,
            )
        except Exception as exc:  # TVMError/ValueError from the JSON reader or the IR parser
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            problem = f"{db_dir} is corrupt ({first[:200]})"
            database = _open_without_bad_records(db_dir, repair=repair)
            if database is not None:
                return database
    if strict:
        raise PipelineError(f"{problem}; delete it, or point to a database made by `pipeline tune`")
    warn(f"ignoring tuning records: {problem}; building with default schedules")
    return None


def read_curve(db_dir: Path) -> list[dict[str, Any]]:
    """The points _append_curve wrote; [] when there are none or the file is unreadable."""
    try:
        lines = (Path(db_dir) / CURVE_FILE).read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError):
        return []


def tuning_cost(curve: list[dict[str, Any]], within: float = 0.10) -> dict[str, Any] | None:
    """What tuning cost: trials and wall time in all, and to first come within ``within``
    (10%) of the final estimated latency. None without a curve.

    Only points that cover every kernel measured by the end count (before that the
    estimate leaves kernels out); the clock restarts with each resumed run, so seconds
    are summed across runs."""
    if not curve:
        return None
    offset, last, points = 0.0, 0.0, []
    for point in curve:
        seconds = float(point.get("seconds") or 0.0)
        if seconds < last:  # a new (resumed) run started its clock again
            offset += last
        last = seconds
        points.append((int(point["trials"]), offset + seconds, float(point["best_ms"]), point.get("kernels_measured")))
    kernels = points[-1][3]
    complete = [p for p in points if p[3] == kernels] or points
    final_ms = complete[-1][2]
    reached = next(p for p in complete if p[2] <= final_ms * (1 + within))
    return {
        "final_estimate_ms": round(final_ms, 3),
        "trials": points[-1][0],
        "seconds": round(points[-1][1], 1),
        "within": within,
        "trials_to_within": reached[0],
        "seconds_to_within": round(reached[1], 1),
    }
