"""Schedules at compile time on CPU targets: tuning records where a database has them, and a
default schedule for every other kernel (tiled GEMMs, VNNI matmuls, NHWC depthwise).

Like the rest of pipeline.compiler this imports TVM's moving internals (MetaSchedule lives in
``tvm.s_tir.meta_schedule`` in TVM 0.27); quirks of the pinned version carry a comment that
starts with "TVM 0.27:".
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import tvm
from tvm import relax

# TVM 0.27: MetaSchedule and the TensorIR schedule moved to tvm.s_tir.
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir import Schedule

from pipeline.compiler.schedules import depthwise
from pipeline.compiler import prepack
from pipeline.compiler.tensor_intrinsics import load_tensor_intrinsics
from pipeline.compiler.tuning.database import open_database, read_curve, tuning_cost
from targets import Target


# Bump when the default schedules change, so compiled artifacts are rebuilt.
DEFAULT_SCHEDULE_VERSION = 4

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# Applying schedules at compile time: tuning records first, defaults for the rest


def _is_scheduled(func) -> bool:
    return bool(func.attrs is not None and func.attrs.get("tirx.is_scheduled", False))


def schedule_module(
    mod: tvm.IRModule, tvm_target: tvm.target.Target, target: Target, database_dir: Path | None,
) -> tuple[tvm.IRModule, dict[str, Any]]:
    """Give every PrimFunc a schedule: its tuning record where the database has one, a
    default schedule (``apply_default_schedules``) otherwise. Call inside ``with tvm_target``.

    Returns the module and the counts compile reports."""
    total = sum(isinstance(f, tvm.tirx.PrimFunc) and not _is_scheduled(f) for f in mod.functions.values())
    # find_database chose it, records of another CPU model included.
    database = (open_database(database_dir, target, strict=False, similar_ok=True)
                if database_dir is not None else None)
    from_records = 0
    if database is not None:
        with database:
            # Looks each PrimFunc up by structure; found ones get "tirx.is_scheduled".
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        # Records made before weights were marked layout free (pipeline/compiler/prepack.py).
        mod = prepack.apply_unmarked_records(mod, database)
        from_records = sum(isinstance(f, tvm.tirx.PrimFunc) and _is_scheduled(f) for f in mod.functions.values())
    mod, defaults = apply_default_schedules(mod, tvm_target)
    return mod, {
        "database": str(database_dir) if database is not None else None,
        "tasks_total": total,
        "tasks_from_records": from_records,
        "tasks_default": total - from_records,
        # Of the defaults: tiled (dense contractions), VNNI matmuls, depthwise convolutions and
        # kept as lowered (see below).
        "default_tiled": defaults["tiled"],
        "default_vnni": defaults["vnni"],
        "default_depthwise": defaults["depthwise"],
        "default_as_lowered": defaults["as_lowered"],
        "default_schedule_version": DEFAULT_SCHEDULE_VERSION,
        "cost": tuning_cost(read_curve(database_dir)) if database is not None else None,
    }


# Default schedules, chosen by measurement (znver4, 2 busy cores: every PrimFunc of
# ConvNeXt-atto at 224 built alone and timed with time_evaluator, lowered vs candidates):
#
#   * Dense contractions (the 1x1-conv matmuls with their bias/GELU epilogues, the 2x2
#     downsampling convolutions) are 6-60x faster with MetaSchedule's own CPU sketch
#     (multi-level tiling "SSRSRS", epilogue fused, outer loops parallel, inner vectorized)
#     and these fixed decisions: innermost output tile = one vector register of lanes,
#     4 rows x 8 row-blocks, inner reduction 4, unroll 64. A randomly sampled sketch was
#     2-10x worse than these on the same tasks; fixed decisions also make builds repeatable.
#   * Since compile computes channels-last (pipeline/compiler/layout.py), the stem and the
#     downsampling layers are patch GEMMs (tiled as above) and the depthwise 7x7
#     convolutions get their own register-tiled schedule (pipeline/compiler/schedules/depthwise.py).
#   * LayerNorms, means and the data movement tasks were as fast or faster as lowered
#     (LLVM vectorizes the plain loops) than with any generic schedule tried: the same
#     sketch, parallel+vectorize+unroll alone, and random sketches were 1.2-20x slower.
#     They keep the lowered loops.
#
# Whole model, one inference (same machine and load): atto 224 untuned ~1000 ms, with these
# defaults ~71 ms, ONNX Runtime ~65 ms; micro 64: 7.6 ms, 1.2 ms, 0.21 ms. Records replace them.
_MIN_CONV_REDUCTION = 64
# Accumulator types the tiled default was measured for. Integer kernels need it most: the
# int8 x int8 -> int32 kernels of pipeline/compiler/int8.py as lowered took 2.47 s per
# ConvNeXt-T image (znver4, 2 threads), tiled 0.12 s; micro at 32: 0.28 -> 0.20 ms.
_TILED_ACCUMULATORS = ("float32", "int32")
_UNROLL_STEPS = (0, 16, 64, 512)
_DEFAULT_DECISIONS = {"rows": 4, "row_blocks": 8, "inner_reduction": 4, "unroll": 64}


def _dense_contraction(func) -> bool:
    """Whether the function's main computation is a dense contraction worth tiling: every
    operand is reused across some output axis (so not depthwise), and it is a matmul (one
    reduction axis) or a convolution with a reduction of at least _MIN_CONV_REDUCTION."""
    from tvm.s_tir.analysis import find_anchor_sblock
    from tvm.tirx.analysis import undefined_vars

    block = find_anchor_sblock(tvm.IRModule({"main": func}))
    if block is None:
        return False
    # TVM 0.27: IterVar.iter_type 0 = data parallel, 2 = commutative reduction.
    # Unit axes (keepdims of a mean) index nothing and reuse nothing.
    spatial = {iv.var.name for iv in block.iter_vars if int(iv.iter_type) == 0 and int(iv.dom.extent) > 1}
    reduce = [iv for iv in block.iter_vars if int(iv.iter_type) == 2]
    if not reduce or not spatial:
        return False
    if any(str(region.source.dtype) not in _TILED_ACCUMULATORS for region in block.writes):
        return False
    written = {region.source.name for region in block.writes}
    operands = [region for region in block.reads if region.source.name not in written]
    if len(operands) < 2:  # a reduction of one tensor (mean, sum) contracts nothing
        return False
    reused = all(
        not spatial <= {var.name for r in region.region for var in undefined_vars(r.min)}
        for region in operands
    )
    extent = math.prod(int(iv.dom.extent) for iv in reduce)
    return reused and (len(reduce) == 1 or extent >= _MIN_CONV_REDUCTION)


def _largest_divisor(n: int, cap: int) -> int:
    return max(d for d in range(1, max(1, min(n, cap)) + 1) if n % d == 0)


def _vector_lanes(tvm_target: tvm.target.Target, bits: int = 32) -> int:
    try:
        width = int(tvm.target.codegen.llvm_get_vector_width(tvm_target))
    except Exception:  # an LLVM without this target: assume 128-bit vectors
        width = 128
    return max(1, width // bits)


def _default_space_generator() -> "ms.space_generator.PostOrderApply":
    """MetaSchedule's CPU sketch reduced to one design space: inline elementwise ops,
    multi-level tiling with the epilogue fused at the second level, then
    parallelize/vectorize/unroll, and the weights' layout rewritten to match the tiles."""
    rule = ms.schedule_rule
    return ms.space_generator.PostOrderApply(
        sch_rules=[
            rule.AutoInline(
                into_producer=False, into_consumer=True, inline_const_tensor=True,
                disallow_if_then_else=True, require_injective=True, require_ordered=True,
                disallow_op=["tirx.exp"],
            ),
            rule.MultiLevelTiling(
                structure="SSRSRS", tile_binds=None, max_innermost_factor=64, reuse_read=None,
                reuse_write=rule.ReuseType(req="must", levels=[2], scope="global"),
            ),
            rule.ParallelizeVectorizeUnroll(
                max_jobs_per_core=16, max_vectorize_extent=64, unroll_max_steps=list(_UNROLL_STEPS),
                unroll_explicit=True,
            ),
        ],
        postprocs=[
            ms.postproc.DisallowDynamicLoop(),
            ms.postproc.RewriteParallelVectorizeUnroll(),
            ms.postproc.RewriteReductionBlock(),
            # Weights packed in the tiles' order (pipeline/compiler/prepack.py).
            ms.postproc.RewriteLayout(),
        ],
        mutator_probs={},
    )


def _tiled_default(func, tvm_target: tvm.target.Target, lanes: int) -> Schedule | None:
    """The tiled default schedule of a dense contraction, or None if the sketch fails."""
    load_tensor_intrinsics()
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    context = ms.TuneContext(
        mod=mod, target=tvm_target, space_generator=_default_space_generator(), task_name="default",
        num_threads=1, rand_state=1,
    )
    spaces = context.space_generator.generate_design_space(mod)
    if len(spaces) != 1:
        return None
    trace = spaces[0].trace
    # Each tiled block's loops are split in loop order: 4-way for spatial loops, 2-way for
    # reduction loops. Its last spatial loop is the contiguous output axis (vector lanes),
    # the one before it gives the rows of the register tile.
    roles: list[str] = []
    group: list[int] = []
    for inst in trace.insts:
        kind = inst.kind.name
        if kind == "GetLoops" and group:
            roles[group[-1]] = "lanes"
            if len(group) > 1:
                roles[group[-2]] = "rows"
            group = []
        if kind == "SamplePerfectTile":
            if int(inst.attrs[0]) == 4:
                group.append(len(roles))
                roles.append("outer")
            else:
                roles.append("reduction")
    if group:
        roles[group[-1]] = "lanes"
        if len(group) > 1:
            roles[group[-2]] = "rows"
    if not roles:
        return None
    sch = Schedule(mod, seed=1)
    position = iter(roles)
    decisions = _DEFAULT_DECISIONS

    def decide(inst, inputs, attrs, decision):
        kind = inst.kind.name
        if kind == "SamplePerfectTile":
            role = next(position)
            extent = int(sch.get(inputs[0]).extent)
            if role == "lanes":
                inner = _largest_divisor(extent, lanes)
                return [extent // inner, 1, 1, inner]
            if role == "rows":
                rows = _largest_divisor(extent, decisions["rows"])
                blocks = _largest_divisor(extent // rows, decisions["row_blocks"])
                return [extent // rows // blocks, 1, blocks, rows]
            if role == "reduction":
                inner = _largest_divisor(extent, decisions["inner_reduction"])
                return [extent // inner, inner]
            return [extent, 1, 1, 1]
        if kind == "SampleCategorical":
            candidates = [int(c) for c in attrs[0]]
            return candidates.index(decisions["unroll"]) if decisions["unroll"] in candidates else decision
        return decision

    trace.apply_to_schedule(sch, remove_postproc=True, decision_provider=decide)
    # Marked as postprocessing in the trace, as MetaSchedule does: a search seeded with this
    # record replays it without them and runs them again (RewriteLayout twice fails).
    sch.enter_postproc()
    if not all(postproc.apply(sch) for postproc in context.space_generator.postprocs):
        return None
    return sch


def _vnni_default(func, tvm_target: tvm.target.Target) -> Schedule | None:
    """The VNNI matmul kernels of pipeline/compiler/int8.py (x86 with AVX-512 VNNI) have their own
    schedule (pipeline/compiler/vnni.py): the generic sketch would not tensorize them."""
    from pipeline.compiler import vnni

    if tvm_target.kind.name != "llvm" or "gpu" in tvm_target.keys:
        return None
    try:
        return vnni.schedule_vnni_matmul(func)
    except Exception as exc:  # a fused shape the schedule does not handle: the generic default
        log.warning("VNNI matmul keeps the generic schedule: %s", exc)
        return None


def default_schedule(task_mod: tvm.IRModule, tvm_target: tvm.target.Target) -> tuple[Schedule, str]:
    """The default schedule of a task ({"main": PrimFunc}) and its kind: "tiled" for dense
    contractions, "vnni" for the int8 VNNI matmuls, "depthwise" for channels-last depthwise
    convolutions (pipeline/compiler/schedules/depthwise.py), else "as_lowered" (an empty schedule).
    Its trace is a tuning record's."""
    func = task_mod["main"]
    sch = _vnni_default(func, tvm_target)
    if sch is not None:
        return sch, "vnni"
    is_cpu = tvm_target.kind.name == "llvm" and "gpu" not in tvm_target.keys
    if is_cpu and depthwise.is_depthwise_nhwc(func):
        sch = depthwise.depthwise_nhwc_schedule(task_mod, _vector_lanes(tvm_target))
        if sch is not None:
            return sch, "depthwise"
    if is_cpu and _dense_contraction(func):
        try:
            sch = _tiled_default(func, tvm_target, _vector_lanes(tvm_target))
            if sch is not None:
                return sch, "tiled"
        except Exception as exc:  # a sketch that does not apply keeps the lowered loops
            log.info("no tiled default: %s", exc)
    sch = Schedule(task_mod, seed=1)
    # TVM 0.27: a record with an empty trace is "invalid" and never looked up; fetching the
    # root block changes nothing and makes the lowered loops a record like any other.
    sch.get_sblock("root")
    return sch, "as_lowered"


def apply_default_schedules(mod: tvm.IRModule, tvm_target: tvm.target.Target) -> tuple[tvm.IRModule, dict[str, int]]:
    """Default schedules for every PrimFunc not scheduled yet (see the notes above).

    CPU (LLVM) targets only: GPU targets get dlight's rules in compile's schedule phase."""
    counts = {"tiled": 0, "vnni": 0, "depthwise": 0, "as_lowered": 0}
    pending = [(gv, f) for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and not _is_scheduled(f)]
    if tvm_target.kind.name != "llvm" or "gpu" in tvm_target.keys:
        counts["as_lowered"] = len(pending)
        return mod, counts
    for gv, func in pending:
        sch, kind = default_schedule(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), tvm_target)
        counts[kind] += 1
        if kind != "as_lowered":
            scheduled = sch.mod["main"]
            symbol = func.attrs.get("global_symbol") if func.attrs is not None else None
            scheduled = scheduled.with_attr("global_symbol", symbol) if symbol else scheduled.without_attr("global_symbol")
            mod[gv] = scheduled.with_attr("tirx.is_scheduled", True)
    return mod, counts
