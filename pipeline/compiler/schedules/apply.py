"""Applying schedules at compile time: every kernel gets its tuning record where a database
has one, else its default (on CPU chosen by schedules/cpu.py; GPU kernels get the rules of
schedules/gpu.py in compile's schedule phase). Records are read through
pipeline/compiler/records.py, below this package, not through tuning/, which drives
MetaSchedule from above.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tvm
from tvm import relax

from pipeline.compiler import prepack
from pipeline.compiler.records import open_database, read_curve, read_meta, tuning_cost, warn_once
from pipeline.compiler.schedules import cpu, gpu
from targets import Target


def defaults_version(tvm_target: dict[str, Any]) -> int:
    """Today's version of the default schedules that records for `tvm_target` are timed
    against: schedules/gpu.py's for a GPU target, schedules/cpu.py's for a CPU one."""
    if tvm_target.get("kind") == "cuda":
        return gpu.DEFAULT_SCHEDULE_VERSION
    return cpu.DEFAULT_SCHEDULE_VERSION


def is_scheduled(func) -> bool:
    return bool(func.attrs is not None and func.attrs.get("tirx.is_scheduled", False))


def schedule_module(
    mod: tvm.IRModule, tvm_target: tvm.target.Target, target: Target, database_dir: Path | None,
) -> tuple[tvm.IRModule, dict[str, Any]]:
    """Give every PrimFunc a schedule: its tuning record where the database has one, a
    default schedule (``apply_default_schedules``) otherwise. Call inside ``with tvm_target``.

    Returns the module and the counts compile reports."""
    total = sum(isinstance(f, tvm.tirx.PrimFunc) and not is_scheduled(f) for f in mod.functions.values())
    mod, opened = apply_tuning_records(mod, target, database_dir)
    from_records = kernels_scheduled(mod) if opened else 0
    if from_records:
        _note_records_older_than_defaults(database_dir)
    # Where each kernel's schedule comes from: "record", or its default's kind (below).
    origins = {gv.name_hint: "record" for gv, f in mod.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc) and is_scheduled(f)}
    mod, defaults = apply_default_schedules(mod, tvm_target, origins)
    return mod, {
        "database": str(database_dir) if opened else None,
        "tasks_total": total,
        "tasks_from_records": from_records,
        "tasks_default": total - from_records,
        # Of the defaults: tiled (dense contractions), VNNI matmuls, depthwise convolutions,
        # reductions over channels (LayerNorms, means), elementwise and data movement kernels,
        # and kept as lowered (see below).
        **{f"default_{kind}": count for kind, count in defaults.items()},
        "default_schedule_version": defaults_version(target.tvm_target),
        "cost": tuning_cost(read_curve(database_dir)) if opened else None,
        "kernel_schedules": dict(sorted(origins.items())),
    }


def kernels_scheduled(mod: tvm.IRModule) -> int:
    """How many of ``mod``'s PrimFuncs have a schedule (after ``apply_tuning_records``:
    how many kernels have tuning records)."""
    return sum(isinstance(f, tvm.tirx.PrimFunc) and is_scheduled(f) for f in mod.functions.values())


def apply_tuning_records(mod: tvm.IRModule, target: Target,
                         database_dir: Path | None) -> tuple[tvm.IRModule, bool]:
    """``mod`` with each PrimFunc the database holds a record for scheduled by it (marked
    "tirx.is_scheduled"), and whether there was a database to open. Call inside ``with
    tvm_target``. The database is find_database's choice (this CPU model's records), or one
    of another CPU a caller passed."""
    database = (open_database(database_dir, target, strict=False, similar_ok=True)
                if database_dir is not None else None)
    if database is None:
        return mod, False
    with database:
        # Looks each PrimFunc up by structure.
        mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    # Records made before weights were marked layout free (pipeline/compiler/prepack.py).
    return prepack.apply_unmarked_records(mod, database), True


def _note_records_older_than_defaults(database_dir: Path) -> None:
    """A record beat the default of its day; once the defaults improve, some records are
    slower than today's (the rocketlake ConvNeXt-T head: 0.092 ms, its new default 0.052 ms)
    and compile would still apply them."""
    meta = read_meta(database_dir)
    version, today = meta.get("default_schedule_version", 0), defaults_version(meta["target_json"])
    if version >= today:
        return
    made = f"version {version}" if version else "a version before versions were recorded"
    warn_once(f"the tuning records in {database_dir} were timed against older default schedules ({made}; "
              f"today's are version {today}); `pipeline tune-db remeasure {database_dir}` "
              f"on the CPU they were made for drops the records today's defaults beat")


def apply_default_schedules(
    mod: tvm.IRModule, tvm_target: tvm.target.Target, origins: dict[str, str] | None = None,
) -> tuple[tvm.IRModule, dict[str, int]]:
    """Default schedules for every PrimFunc not scheduled yet (schedules/cpu.py chooses them); each
    one's kind goes into ``origins`` by kernel name. Returns the module and counts by kind.

    CPU (LLVM) targets only: GPU targets get their rules in compile's schedule phase."""
    origins = {} if origins is None else origins
    counts = {"tiled": 0, "vnni": 0, "depthwise": 0, "gemv": 0, "reduction": 0, "elementwise": 0, "as_lowered": 0}
    pending = [(gv, f) for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and not is_scheduled(f)]
    if tvm_target.kind.name != "llvm" or "gpu" in tvm_target.keys:
        counts["as_lowered"] = len(pending)
        return mod, counts
    for gv, func in pending:
        sch, kind = cpu.default_schedule(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), tvm_target)
        counts[kind] += 1
        origins[gv.name_hint] = kind
        if kind != "as_lowered":
            scheduled = sch.mod["main"]
            symbol = func.attrs.get("global_symbol") if func.attrs is not None else None
            scheduled = scheduled.with_attr("global_symbol", symbol) if symbol else scheduled.without_attr("global_symbol")
            mod[gv] = scheduled.with_attr("tirx.is_scheduled", True)
    return mod, counts
