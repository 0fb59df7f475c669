"""`pipeline tune-db remeasure`: a database's records timed against today's default schedules
on the CPU the records were made for; records that the defaults now beat are dropped.

A record is the best schedule its tuning run found, and that run's baseline was the default
schedule of its day. When the defaults improve (pipeline/compiler/schedules/), an old record
can cost time (ConvNeXt-T's head kept a 0.10 ms record after its default became 0.05 ms), so
compile does not apply a database timed against older defaults (meta.json's
default_schedule_version) until this has re-measured it. Timings only mean something on the
CPU they name, so this refuses a database made for another one.

A record is dropped only where the default is faster by a margin, not where the two tie:
kernels are timed alone here, and records that tied their defaults alone were still faster
in the whole model (ConvNeXt-T b1 on rocketlake: dropping the 35 records within 3% of their
defaults made the model 41.4 -> 42.2 ms).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import tvm
import tvm_ffi
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms

from pipeline.compiler.records import (
    CURVE_FILE, META_FILE, RECORD_FILE, STATE_FILE, WORKLOAD_FILE, database_problem, open_database, read_meta,
)
from pipeline.compiler.schedules.cpu import DEFAULT_SCHEDULE_VERSION, default_schedule
from pipeline.compiler.tensor_intrinsics import load_tensor_intrinsics
from pipeline.compiler.tuning import database as db
from pipeline.compiler.tuning import measuring
from pipeline.compiler.tuning import tuner
from pipeline.engine import log
from pipeline.errors import PipelineError
from targets import get_target

# A record is dropped where its default is at least this much faster: two timings of the
# same kernel on 2 cores differ by a few percent.
DEFAULT_MARGIN = 0.03


def remeasure_database(db_dir: Path, *, margin: float = DEFAULT_MARGIN,
                       say: Callable[[str], None] = log) -> dict[str, Any]:
    """Time each kernel's best record in `db_dir` against its default schedule, here, and
    rewrite the database without the kernels whose default is `margin` faster than the
    record (or whose record no longer builds or runs). The database is replaced only once
    the new one is complete. Returns one row per kernel."""
    db_dir = Path(db_dir)
    if not 0 <= margin < 1:
        raise PipelineError(f"--margin is a fraction of a record's time in [0, 1), got {margin:g}")
    problem = database_problem(db_dir, None)
    if problem is not None:
        raise PipelineError(f"cannot re-measure: {problem}")
    meta = read_meta(db_dir)
    target = get_target(meta["target"])
    if target.cuda_arch is not None or target.runner == "rpc":
        raise PipelineError(
            f"re-measuring is implemented for this machine's CPU; {db_dir} holds records of '{target.name}'"
        )
    made_on, here = db.cpu_tag(meta["target_json"]), db.cpu_tag(target.tvm_target)
    if made_on != here:
        raise PipelineError(
            f"{db_dir} holds records timed on a {made_on} CPU and this machine is {here}; "
            f"re-measure them on a {made_on} machine"
        )
    load_tensor_intrinsics()
    database = open_database(db_dir, None, strict=True)
    tvm_target = tvm.target.Target(target.tvm_target)
    settings = measuring.TuneSettings()
    builder, runner = measuring.make_builder(target, settings), measuring.make_runner(target, settings)
    names = _kernel_names(db_dir)
    workloads = _workloads(database)
    rows: list[dict[str, Any]] = []
    with tvm_target:
        for index, mod in enumerate(workloads, start=1):
            name = names.get(_hash_key(mod), f"kernel {index}")
            rows.append(_compare(database, mod, name, tvm_target, builder, runner, margin, say))
            row = rows[-1]
            say(f"[remeasure] {index}/{len(workloads)} {name}: record {_ms(row['record_ms'])}, "
                f"default ({row['default_kind']}) {_ms(row['default_ms'])}: {row['decision']}")
    kept = [mod for mod, row in zip(workloads, rows) if row["decision"] == "kept"]
    meta = {**meta, "default_schedule_version": DEFAULT_SCHEDULE_VERSION}  # what the kept records beat
    _rewrite(db_dir, database, kept, meta, {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": here,
        "default_schedule_version": DEFAULT_SCHEDULE_VERSION,
        "margin": margin,
        "kernels_kept": len(kept),
        "kernels_dropped": [row["kernel"] for row in rows if row["decision"] != "kept"],
    })
    return {"database": str(db_dir), "kernels": len(rows), "kept": len(kept), "rows": rows}


def _compare(database, mod, name, tvm_target, builder, runner, margin, say) -> dict[str, Any]:
    records = database.get_top_k(database.commit_workload(mod), 1)
    default, kind = default_schedule(mod, tvm_target)
    candidates: list[tuple[Schedule, str]] = [(default, f"default schedule ({kind})")]
    try:
        recorded = Schedule(mod)
        records[0].trace.apply_to_schedule(recorded, remove_postproc=False)
        candidates.insert(0, (recorded, "record"))
    except Exception as exc:  # TVMError: a trace that no longer replays on this TVM
        say(f"[remeasure] {name}: the record does not replay ({str(exc).strip().splitlines()[-1][:160]})")
    timings = tuner.time_schedules(builder, runner, tvm_target, name, candidates, say)
    seconds = {what: tuner.median(run_secs) if run_secs else None for (_, what), run_secs in zip(candidates, timings)}
    record_s, default_s = seconds.get("record"), seconds[candidates[-1][1]]
    if record_s is None:
        decision = "dropped (the record does not build or run)"
    elif default_s is not None and default_s < record_s * (1 - margin):
        decision = f"dropped (the default is {1 - default_s / record_s:.0%} faster)"
    else:
        decision = "kept"
    return {
        "kernel": name, "record_ms": _to_ms(record_s), "default_ms": _to_ms(default_s),
        "default_kind": kind, "decision": decision,
    }


def _workloads(database) -> list[tvm.IRModule]:
    """Each workload with records once (a record names its workload)."""
    seen: dict[int, tvm.IRModule] = {}
    for record in database.get_all_tuning_records():
        mod = record.workload.mod
        seen.setdefault(tvm_ffi.structural_hash(mod), mod)
    return list(seen.values())


def _hash_key(mod: tvm.IRModule) -> str:
    # As Task.key (pipeline/compiler/tuning/tasks.py) ends: the workload's hash.
    return f"{tvm_ffi.structural_hash(mod) % 2**32:08x}"


def _kernel_names(db_dir: Path) -> dict[str, str]:
    """Kernel names by workload hash, from the tuning run's state file (if it has one)."""
    try:
        tasks = json.loads((db_dir / STATE_FILE).read_text())["tasks"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {key.rsplit("#", 1)[1]: key.rsplit("#", 1)[0] for key in tasks if "#" in key}


def _rewrite(db_dir: Path, database, kept: list[tvm.IRModule], meta: dict[str, Any],
             remeasured: dict[str, Any]) -> None:
    temp = Path(tempfile.mkdtemp(prefix=f".{db_dir.name}.tmp-", dir=db_dir.parent))
    try:
        out = ms.database.JSONDatabase(str(temp / WORKLOAD_FILE), str(temp / RECORD_FILE), allow_missing=True)
        for mod in kept:
            workload = out.commit_workload(mod)
            for record in database.get_top_k(database.commit_workload(mod), 1 << 20):
                out.commit_tuning_record(ms.database.TuningRecord(
                    record.trace, workload, record.run_secs, record.target, record.args_info,
                ))
        for name in (WORKLOAD_FILE, RECORD_FILE):
            (temp / name).touch()
            (temp / name).chmod(0o644)
        for name in (STATE_FILE, CURVE_FILE):
            if (db_dir / name).is_file():
                shutil.copyfile(db_dir / name, temp / name)
                (temp / name).chmod(0o644)
        db.write_json(temp / META_FILE, {**meta, "remeasured": remeasured})
        temp.chmod(0o755)
        # Directories cannot be swapped in one rename: the old one steps aside first, and
        # comes back if the new one cannot take its place.
        old = db_dir.with_name(f".{db_dir.name}.old-{os.getpid()}")
        os.replace(db_dir, old)
        try:
            os.replace(temp, db_dir)
        except BaseException:
            os.replace(old, db_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _to_ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 4)


def _ms(value: float | None) -> str:
    return "failed" if value is None else f"{value:.3f} ms"


def format_table(result: dict[str, Any]) -> str:
    lines = ["| kernel | record ms | default ms | default kind | decision |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['kernel']} | {_ms(row['record_ms'])} | {_ms(row['default_ms'])} | "
                     f"{row['default_kind']} | {row['decision']} |")
    lines.append(f"\n{result['kept']} of {result['kernels']} kernels keep their records: {result['database']}")
    return "\n".join(lines)
