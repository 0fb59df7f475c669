"""Schedules at compile time on CPU targets: tuning records where a database has them, and a
default schedule for every other kernel (tiled GEMMs, VNNI matmuls, NHWC depthwise).

Like the rest of pipeline.compiler this imports TVM's moving internals (MetaSchedule lives in
``tvm.s_tir.meta_schedule`` in TVM 0.27); quirks of the pinned version carry a comment that
starts with "TVM 0.27:".
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tvm
from tvm import relax

# TVM 0.27: MetaSchedule and the TensorIR schedule moved to tvm.s_tir.
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir import Schedule

from pipeline.compiler.schedules import cpu_rows, depthwise
from pipeline.compiler import prepack
from pipeline.compiler.tensor_intrinsics import load_tensor_intrinsics
from pipeline.compiler.tuning.database import (
    defaults_version, open_database, read_curve, read_meta, tuning_cost, warn_once,
)
from targets import Target


# Bump when the default schedules change, so compiled artifacts are rebuilt.
DEFAULT_SCHEDULE_VERSION = 7

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
    mod, opened = apply_tuning_records(mod, target, database_dir)
    from_records = kernels_scheduled(mod) if opened else 0
    if from_records:
        _note_records_older_than_defaults(database_dir)
    # Where each kernel's schedule comes from: "record", or its default's kind (below).
    origins = {gv.name_hint: "record" for gv, f in mod.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc) and _is_scheduled(f)}
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
    return sum(isinstance(f, tvm.tirx.PrimFunc) and _is_scheduled(f) for f in mod.functions.values())


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


# Default schedules, chosen from the target's vector registers and caches rather than by
# search (the way MLAS and oneDNN block their GEMMs), and checked against tuned records:
#
#   * Dense contractions (the 1x1-conv matmuls with their bias/GELU epilogues, the stem and
#     the downsampling patch GEMMs) take MetaSchedule's own CPU sketch (multi-level tiling
#     "SSRSRS", epilogue fused, outer loops parallel, inner vectorized) with decisions from
#     ``RegisterBlock``: a register tile of `rows` x 2 vectors of outputs, as many rows as
#     the vector registers hold accumulators for (a FMA chain per accumulator hides the FMA
#     latency; AVX-512 and NEON have 32 registers, AVX2 16), 64 reduction steps per pass
#     over the tile. Where the weights do not fit in a core's L2 (stage 3's 768x3072) a
#     parallel job takes up to 128 rows, image rows of a [1, H, W, C] map included, so each
#     weight panel is read from memory once per job instead of once per register tile.
#   * The depthwise 7x7 convolutions (channels-last since pipeline/compiler/layout.py) get
#     their register-tiled schedule (pipeline/compiler/schedules/depthwise.py).
#   * LayerNorms and means over channels, and the elementwise and data movement kernels
#     (pipeline/compiler/schedules/cpu_rows.py): pixels parallel, channels vectorized, the
#     reductions as vector partial sums.
#   * Matrix-vector products (the head at batch 1; cpu_rows.gemv_schedule): the weights
#     streamed once, parallel over vectors of output columns.
#
# ConvNeXt-T 224, batch 1, 2 threads (Xeon, rocketlake), kernel time summed over the model,
# these defaults vs. the znver5 tuned records replayed on the same machine: the 12 tiled
# GEMMs 39.4 vs 41.6 ms (the records faster on 4 of them, by up to 1.2x); LayerNorms and
# means 0.38 vs 0.67 ms; every kernel 42.4 vs 45.4 ms. Before these defaults (4 rows x
# 1 vector, reduction 4; reductions and elementwise kernels single-threaded scalar loops)
# the GEMMs took 62.9 ms and the LayerNorms and means 3.6 ms. Records replace defaults
# where a database has them.
_MIN_CONV_REDUCTION = 64
# Accumulator types the tiled default was measured for. Integer kernels need it most: the
# int8 x int8 -> int32 kernels of pipeline/compiler/int8.py as lowered took 2.47 s per
# ConvNeXt-T image (znver4, 2 threads), tiled 0.12 s; micro at 32: 0.28 -> 0.20 ms.
_TILED_ACCUMULATORS = ("float32", "int32")
_UNROLL_STEPS = (0, 16, 64, 512)


@dataclass(frozen=True)
class RegisterBlock:
    """The tiling decisions of the tiled default, from the CPU's vector unit and caches."""

    vector_lanes: int  # outputs per vector register
    vector_registers: int
    # A core's L2; 1 MiB is typical of the CPUs targeted (512 KiB-2 MiB): only whether a
    # GEMM's weights fit in it matters, and ConvNeXt's are 0.15-0.6 MiB or 2.4-9.4 MiB.
    l2_bytes: int = 1 << 20
    vectors_wide: int = 2  # output columns of the register tile, in vectors
    reduction_step: int = 64  # K steps per pass over the register tile (its weights stay in L1)
    rows_per_job: int = 128  # rows of a parallel job where the weights exceed L2
    unroll: int = 64

    @property
    def accumulators(self) -> int:
        # Left for the tile's weight vectors, the broadcast input and one spare.
        return self.vector_registers - self.vectors_wide - 2

    def columns(self, extent: int) -> int:
        """Whole vectors where the extent allows (atto's 40 and 80 channels: not 20 lanes,
        which LLVM would split into a vector and scalars, but 8 and 16)."""
        for vectors in range(self.vectors_wide, 0, -1):
            if extent % (vectors * self.vector_lanes) == 0:
                return vectors * self.vector_lanes
        power_of_two = extent & -extent
        return min(power_of_two, self.vector_lanes)

    def rows(self, extent: int, columns: int) -> int:
        vectors = max(1, columns // self.vector_lanes)
        return _largest_divisor(extent, max(1, self.accumulators // vectors))

    def row_blocks(self, extent: int, rows: int, weight_bytes: int) -> int:
        if weight_bytes <= self.l2_bytes:
            return 1
        return _largest_divisor(extent // rows, max(1, self.rows_per_job // rows))

    def outer_rows(self, row_extents: list[int], columns: int, weight_bytes: int) -> int:
        """How many rows of the axes outside the register tile's a job may take, where the
        weights exceed L2 (a job per image row of stage 3's 7x7 read all 9.4 MiB of weights
        7 times: 3.45 ms, 1.18 ms when one job takes all 49 rows)."""
        if weight_bytes <= self.l2_bytes or len(row_extents) < 2:
            return 1
        tile = self.rows(row_extents[-1], columns)
        per_job = tile * self.row_blocks(row_extents[-1], tile, weight_bytes)
        return max(1, self.rows_per_job // per_job)

    def inner_reduction(self, extent: int) -> int:
        return _largest_divisor(extent, self.reduction_step)


def register_block(tvm_target: tvm.target.Target) -> RegisterBlock:
    """AVX-512 and AArch64 (NEON, SVE) have 32 vector registers, AVX2 and SSE 16."""
    bits = _vector_bits(tvm_target)
    registers = 32 if _is_arm(tvm_target) or bits >= 512 else 16
    return RegisterBlock(vector_lanes=max(1, bits // 32), vector_registers=registers)


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


def _is_arm(tvm_target: tvm.target.Target) -> bool:
    triple = str(tvm_target.attrs.get("mtriple", "")) if tvm_target.attrs else ""
    return triple.startswith(("aarch64", "arm"))


def _vector_bits(tvm_target: tvm.target.Target) -> int:
    codegen = tvm.target.codegen
    if not _is_arm(tvm_target):
        # TVM 0.27: llvm_get_vector_width says 512 for every x86 CPU (core2 and haswell too).
        if codegen.target_has_features("avx512f", tvm_target):
            return 512
        return 256 if codegen.target_has_features("avx", tvm_target) else 128
    try:
        return int(codegen.llvm_get_vector_width(tvm_target))
    except Exception:  # an LLVM without this target: assume 128-bit vectors
        return 128


def _vector_lanes(tvm_target: tvm.target.Target, bits: int = 32) -> int:
    return max(1, _vector_bits(tvm_target) // bits)


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


def _weight_panel_bytes(func) -> tuple[int, list[int]]:
    """Bytes of the weights one sweep over the output columns reads (the reduction extent
    times the contiguous output extent, at the widest operand's element size), and the
    extents of the output axes, the contiguous one last."""
    from tvm.s_tir.analysis import find_anchor_sblock

    anchor = find_anchor_sblock(tvm.IRModule({"main": func}))
    spatial = [int(iv.dom.extent) for iv in anchor.iter_vars if int(iv.iter_type) == 0]
    reduction = math.prod(int(iv.dom.extent) for iv in anchor.iter_vars if int(iv.iter_type) == 2)
    element = max(tvm.runtime.DataType(str(region.source.dtype)).bits for region in anchor.reads) // 8
    return reduction * spatial[-1] * element, spatial


# Cores assumed where a target does not say (the Arm boards: Raspberry Pi 3-5 have 4).
_ASSUMED_CORES = 4


def _with_core_count(tvm_target: tvm.target.Target) -> tvm.target.Target:
    """The target with "num-cores" (it bounds the sketch's parallel jobs). TVM 0.27: without
    it MetaSchedule asks psutil for this machine's cores, which is not installed (every Arm
    target's tiled default failed on it and fell back to the lowered loops) and would make a
    cross build depend on the machine it runs on."""
    if tvm_target.attrs.get("num-cores"):
        return tvm_target
    return tvm.target.Target({**tvm_target.export(), "num-cores": _ASSUMED_CORES})


def _tiled_default(func, tvm_target: tvm.target.Target) -> Schedule | None:
    """The tiled default schedule of a dense contraction, or None if the sketch fails."""
    load_tensor_intrinsics()
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    context = ms.TuneContext(
        mod=mod, target=_with_core_count(tvm_target), space_generator=_default_space_generator(),
        task_name="default", num_threads=1, rand_state=1,
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
    block = register_block(tvm_target)
    weight_bytes, spatial = _weight_panel_bytes(func)
    columns = block.columns(spatial[-1])
    # Rows in the outer output axes (the image rows of a [1, 7, 7, C] GEMM) may join a job
    # too, up to rows_per_job in all: as parallel jobs each would read the weights again.
    outer_rows = [block.outer_rows(spatial[:-1], columns, weight_bytes)]

    def decide(inst, inputs, attrs, decision):
        kind = inst.kind.name
        if kind == "SamplePerfectTile":
            role = next(position)
            extent = int(sch.get(inputs[0]).extent)
            if role == "lanes":
                inner = block.columns(extent)
                return [extent // inner, 1, 1, inner]
            if role == "rows":
                rows = block.rows(extent, columns)
                blocks = block.row_blocks(extent, rows, weight_bytes)
                return [extent // rows // blocks, 1, blocks, rows]
            if role == "reduction":
                inner = block.inner_reduction(extent)
                return [extent // inner, inner]
            blocks = _largest_divisor(extent, outer_rows[0])
            outer_rows[0] //= blocks
            return [extent // blocks, 1, blocks, 1]
        if kind == "SampleCategorical":
            candidates = [int(c) for c in attrs[0]]
            return candidates.index(block.unroll) if block.unroll in candidates else decision
        return decision

    trace.apply_to_schedule(sch, remove_postproc=True, decision_provider=decide)
    _fuse_epilogue(sch)
    # Marked as postprocessing in the trace, as MetaSchedule does: a search seeded with this
    # record replays it without them and runs them again (RewriteLayout twice fails).
    sch.enter_postproc()
    if not all(postproc.apply(sch) for postproc in context.space_generator.postprocs):
        return None
    return sch


def _fuse_epilogue(sch: Schedule) -> None:
    """The sketch writes each job's tile back through a cache-write block but leaves the
    epilogue (bias, GELU, layer scale, residual; in int8 kernels the requantization) to a
    pass of its own over the whole output, after all the jobs. Inlined into the write-back,
    each job finishes its tile while the tile is in cache: ConvNeXt-T 224 b1 43.96 -> 42.32
    ms, ConvNeXt-B 141.9 -> 138.6 ms (rocketlake, 2 threads, the builds timed in turns);
    ConvNeXt-T int8 18.8 ms either way (its GEMMs are VNNI kernels with their own schedule)."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if len(blocks) < 3:  # the contraction and its write-back: no epilogue
        return
    try:
        sch.reverse_compute_inline(blocks[-1])
    except Exception:  # noqa: BLE001 -- TVM's ScheduleError: an epilogue that does not inline keeps its pass
        pass


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
    convolutions (pipeline/compiler/schedules/depthwise.py), "gemv" for matrix-vector products,
    "reduction" and "elementwise" for LayerNorms, means and the kernels between
    (pipeline/compiler/schedules/cpu_rows.py), else
    "as_lowered" (an empty schedule: kernels too small to parallelize).
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
            sch = _tiled_default(func, tvm_target)
            if sch is not None:
                return sch, "tiled"
        except Exception as exc:  # a sketch that does not apply keeps the lowered loops
            log.info("no tiled default: %s", exc)
    if is_cpu:
        rules = (
            ("gemv", cpu_rows.gemv_schedule),
            ("reduction", cpu_rows.reduction_rows_schedule),
            ("elementwise", cpu_rows.injective_schedule),
        )
        for kind, rule in rules:
            try:
                sch = rule(func, _vector_lanes(tvm_target))
            except Exception as exc:  # noqa: BLE001 -- a rule that does not apply
                log.info("no %s default: %s", kind, exc)
                sch = None
            if sch is not None:
                return sch, kind
    sch = Schedule(task_mod, seed=1)
    # TVM 0.27: a record with an empty trace is "invalid" and never looked up; fetching the
    # root block changes nothing and makes the lowered loops a record like any other.
    sch.get_sblock("root")
    return sch, "as_lowered"


def apply_default_schedules(
    mod: tvm.IRModule, tvm_target: tvm.target.Target, origins: dict[str, str] | None = None,
) -> tuple[tvm.IRModule, dict[str, int]]:
    """Default schedules for every PrimFunc not scheduled yet (see the notes above); each
    one's kind goes into ``origins`` by kernel name. Returns the module and counts by kind.

    CPU (LLVM) targets only: GPU targets get their rules in compile's schedule phase."""
    origins = {} if origins is None else origins
    counts = {"tiled": 0, "vnni": 0, "depthwise": 0, "gemv": 0, "reduction": 0, "elementwise": 0, "as_lowered": 0}
    pending = [(gv, f) for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and not _is_scheduled(f)]
    if tvm_target.kind.name != "llvm" or "gpu" in tvm_target.keys:
        counts["as_lowered"] = len(pending)
        return mod, counts
    for gv, func in pending:
        sch, kind = default_schedule(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), tvm_target)
        counts[kind] += 1
        origins[gv.name_hint] = kind
        if kind != "as_lowered":
            scheduled = sch.mod["main"]
            symbol = func.attrs.get("global_symbol") if func.attrs is not None else None
            scheduled = scheduled.with_attr("global_symbol", symbol) if symbol else scheduled.without_attr("global_symbol")
            mod[gv] = scheduled.with_attr("tirx.is_scheduled", True)
    return mod, counts
