"""The tiled default schedule of dense contractions on CPU (the 1x1-conv GEMMs with their
bias/GELU epilogues, the stem and the downsampling patch GEMMs): MetaSchedule's own CPU
sketch (multi-level tiling "SSRSRS", epilogue fused, outer loops parallel, inner
vectorized), replayed with the decisions of ``RegisterBlock`` instead of sampled ones.

Which loop is which (the register tile's columns, its rows, the axes outside it, the
reduction) comes from the tiled block's iterator types, not from the order of the sketch's
instructions: a sketch that tiles a loop this module cannot place is declined, with a
warning, rather than tiled wrongly.

Like the rest of pipeline.compiler this imports TVM's moving internals (MetaSchedule lives in
``tvm.s_tir.meta_schedule`` in TVM 0.27); quirks of the pinned version carry a comment that
starts with "TVM 0.27:".
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import tvm
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir import Schedule

from pipeline.compiler.tensor_intrinsics import load_tensor_intrinsics

log = logging.getLogger(__name__)

# The sketch's multi-level tiling: each spatial loop split in 4 ("SSRSRS" has four S
# levels), each reduction loop in 2.
_SPATIAL_TILES = 4
_REDUCTION_TILES = 2
_SPATIAL, _REDUCTION = tvm.tirx.IterVar.DataPar, tvm.tirx.IterVar.CommReduce

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


def dense_contraction(func) -> bool:
    """Whether the function's main computation is a dense contraction worth tiling: every
    operand is reused across some output axis (so not depthwise), and it is a matmul (one
    reduction axis) or a convolution with a reduction of at least _MIN_CONV_REDUCTION."""
    from tvm.s_tir.analysis import find_anchor_sblock
    from tvm.tirx.analysis import undefined_vars

    block = find_anchor_sblock(tvm.IRModule({"main": func}))
    if block is None:
        return False
    # Unit axes (keepdims of a mean) index nothing and reuse nothing.
    spatial = {iv.var.name for iv in block.iter_vars if int(iv.iter_type) == _SPATIAL and int(iv.dom.extent) > 1}
    reduce = [iv for iv in block.iter_vars if int(iv.iter_type) == _REDUCTION]
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


def vector_lanes(tvm_target: tvm.target.Target, bits: int = 32) -> int:
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
    spatial = [int(iv.dom.extent) for iv in anchor.iter_vars if int(iv.iter_type) == _SPATIAL]
    reduction = math.prod(int(iv.dom.extent) for iv in anchor.iter_vars if int(iv.iter_type) == _REDUCTION)
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


class SketchMismatch(Exception):
    """The sketch tiled a loop that is not one of the block's spatial or reduction axes, or
    split it into another number of tiles than the tiled default decides for."""


def _tiled_axis(sch: Schedule, loop_rv) -> tuple[int, int, list[int]]:
    """(the iterator type of the block axis the loop ``loop_rv`` runs over, that axis's index
    among the block's axes of its type, the types of all the block's axes), for a loop of the
    untiled nest directly around one block with trivial bindings (as MultiLevelTiling
    requires)."""
    loop = sch.get(loop_rv)
    node = loop.body
    while isinstance(node, tvm.tirx.For):
        node = node.body
    if not isinstance(node, s_tir.SBlockRealize):
        raise SketchMismatch(f"loop {loop.loop_var} is not in the loop nest of one block")
    block = node.block
    axes = [i for i, value in enumerate(node.iter_values) if value.same_as(loop.loop_var)]
    if len(axes) != 1:
        raise SketchMismatch(f"loop {loop.loop_var} is not one axis of block {block.name_hint}")
    types = [int(iv.iter_type) for iv in block.iter_vars]
    kind = types[axes[0]]
    return kind, types[:axes[0]].count(kind), types


def _role(sch: Schedule, loop_rv, tiles: int) -> str:
    """What the tiled default makes of a loop the sketch splits into ``tiles``: the register
    tile's columns ("lanes": the block's last spatial axis, the contiguous output axis), its
    rows ("rows": the spatial axis before it), an axis outside the tile ("outer": the other
    spatial axes) or the reduction ("reduction")."""
    kind, index, types = _tiled_axis(sch, loop_rv)
    if kind not in (_SPATIAL, _REDUCTION):
        raise SketchMismatch(f"a loop over an axis of iterator type {kind} is tiled")
    expected = _SPATIAL_TILES if kind == _SPATIAL else _REDUCTION_TILES
    if tiles != expected:
        axis = "spatial" if kind == _SPATIAL else "reduction"
        raise SketchMismatch(f"a {axis} loop is split in {tiles}, the tiled default splits it in {expected}")
    if kind == _REDUCTION:
        return "reduction"
    spatial = types.count(_SPATIAL)
    if index == spatial - 1:
        return "lanes"
    return "rows" if index == spatial - 2 else "outer"


def tiled_default(func, tvm_target: tvm.target.Target) -> Schedule | None:
    """The tiled default schedule of a dense contraction, or None if the sketch fails or
    tiles loops this module cannot place (SketchMismatch, said as a warning)."""
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
    if not any(inst.kind.name == "SamplePerfectTile" for inst in trace.insts):
        return None
    sch = Schedule(mod, seed=1)
    block = register_block(tvm_target)
    weight_bytes, spatial = _weight_panel_bytes(func)
    columns = block.columns(spatial[-1])
    # Rows in the outer output axes (the image rows of a [1, 7, 7, C] GEMM) may join a job
    # too, up to rows_per_job in all: as parallel jobs each would read the weights again.
    outer_rows = [block.outer_rows(spatial[:-1], columns, weight_bytes)]
    # TVM 0.27: an exception raised in decide reaches the caller as a RuntimeError (through
    # the FFI), so a loop that cannot be placed is noted and keeps the sketch's decision.
    mismatches: list[str] = []

    def decide(inst, inputs, attrs, decision):
        kind = inst.kind.name
        if kind == "SamplePerfectTile":
            try:
                role = _role(sch, inputs[0], int(attrs[0]))
            except SketchMismatch as exc:
                mismatches.append(str(exc))
                return decision
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
    if mismatches:
        # Not an info line like a sketch that does not apply: tiling would have been wrong,
        # and the kernel now gets a slower default.
        log.warning("no tiled default: MetaSchedule's sketch is not the one this default was written for (%s)",
                    "; ".join(mismatches))
        return None
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
