"""Weights packed once, at compile time, in the layout each tuned CPU kernel reads them in.

A tuned GEMM walks its weight matrix tile by tile. Row-major, a tile of ConvNeXt-T's
stage-4 project weights (3072 x 768 floats, 3 KiB rows) is a strided walk that touches a
new 4 KiB page almost every row, which the hardware prefetcher does not follow. ONNX Runtime packs constant GEMM operands
when it loads a model; MetaSchedule's equivalent is its layout rewrite: kernel parameters
that are constants are marked "layout free", the RewriteLayout postprocessor gives the
schedule the weight layout that matches its tiles, and after the records are applied the
rewrite moves into a function of its own (SplitLayoutRewritePreproc) that FoldConstant runs
on the embedded weights. The artifact then holds the packed weights; nothing is repacked
at run time. Measured on znver5 with the same schedules, packed vs row-major weights: the
stage-3 project GEMM 0.59 -> 0.51 ms, the stage-3 expand GEMM 0.80 -> 0.72 ms.

Marking the weights changes the kernels' workloads (the attribute is part of the structure
MetaSchedule looks records up by). Records made before kernels were marked still apply:
``schedule_from_unmarked_record`` replays such a record on the marked kernel and runs
RewriteLayout after it, as tuning would have.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms

LAYOUT_FREE = "layout_free_buffers"


def mark_weights() -> tvm.transform.Pass:
    """Mark every PrimFunc parameter that is a constant of the model as layout free."""
    return relax.transform.AttachAttrLayoutFreeBuffers()


def pack_weights() -> list[tvm.transform.Pass]:
    """After scheduling: split each weight's layout rewrite out of its kernel and apply it
    to the embedded constant now. (Weights kept outside the library, params_mode
    "separate", are rewritten by those functions on every call instead.)"""
    # DeadCodeElimination: the unpacked kernels and the folded rewrites are no longer
    # called; left in, they would be compiled into the library.
    return [relax.transform.SplitLayoutRewritePreproc(), relax.transform.FoldConstant(),
            relax.transform.DeadCodeElimination()]


def _main(mod: tvm.IRModule) -> tvm.tirx.PrimFunc:
    return mod["main"]


def unmarked(mod: tvm.IRModule) -> tvm.IRModule | None:
    """The kernel as it was before its weights were marked; None if none are marked."""
    func = _main(mod)
    if func.attrs is None or LAYOUT_FREE not in func.attrs:
        return None
    return tvm.IRModule({"main": func.without_attr(LAYOUT_FREE)})


def stored_marked(database, mod: tvm.IRModule) -> tvm.IRModule | None:
    """The database's copy of the kernel's unmarked workload, marked like `mod`; None if
    the database has none. Replays use it because a trace names blocks as they were
    named when it was recorded."""
    plain = unmarked(mod)
    # has_workload first: commit_workload on a database it lacks would add it there.
    if plain is None or not database.has_workload(plain):
        return None
    stored = _main(database.commit_workload(plain).mod)
    return tvm.IRModule({"main": stored.with_attr(LAYOUT_FREE, _main(mod).attrs[LAYOUT_FREE])})


def replay_best_record(database, workload: tvm.IRModule, onto: tvm.IRModule) -> Schedule | None:
    """The database's best record of `workload` (which it must hold), replayed on `onto`;
    None if it has no record. A trace that does not fit `onto` raises TVM's error."""
    records = database.get_top_k(database.commit_workload(workload), 1)
    if not records:
        return None
    sch = Schedule(onto)
    records[0].trace.apply_to_schedule(sch, remove_postproc=False)
    return sch


def schedule_from_unmarked_record(database, mod: tvm.IRModule) -> Schedule | None:
    """The best record of the unmarked kernel in `database`, replayed on the marked kernel
    (``stored_marked``) with the layout rewrite applied; None when there is no such record
    or it does not replay."""
    marked = stored_marked(database, mod)
    if marked is None:
        return None
    try:
        sch = replay_best_record(database, unmarked(mod), marked)
    except Exception:  # TVMError: a trace that does not fit this kernel
        return None
    if sch is None:
        return None
    # As a postprocessor (see schedules/cpu_tiled.tiled_default): a search seeded with this
    # record replays the trace without it and rewrites the layout itself.
    sch.enter_postproc()
    if not ms.postproc.RewriteLayout().apply(sch):
        return None
    return sch


def apply_unmarked_records(mod: tvm.IRModule, database) -> tvm.IRModule:
    """Schedule the marked kernels that MetaScheduleApplyDatabase left unscheduled from
    records of their unmarked workloads."""
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, tvm.tirx.PrimFunc) or (func.attrs is not None and func.attrs.get("tirx.is_scheduled", False)):
            continue
        # Looked up as tuning extracted it: alone in a module, named main.
        sch = schedule_from_unmarked_record(database, tvm.IRModule({"main": func.with_attr("global_symbol", "main")}))
        if sch is None:
            continue
        # As MetaScheduleApplyDatabase does: the kernel's own attributes, marked scheduled.
        mod[gv] = _main(sch.mod).with_attrs(func.attrs).with_attr("tirx.is_scheduled", True)
    return mod
