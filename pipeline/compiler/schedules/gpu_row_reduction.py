"""Default GPU schedule for row reductions followed by an elementwise pass: ConvNeXt's
channel LayerNorms (channels-last, so each pixel's C channels are one contiguous row).

dlight's GeneralReduction rule gives each row a 256-thread block and reduces across all
256 threads through shared memory: for ConvNeXt-T's 96-channel rows, 160 of the 256
threads have nothing to do, and 3136 blocks per image at stage 0 each pay two block-wide
reductions with their barriers. Here one warp owns one row: lane l takes the channels
l, l + 32, ..., so a warp's loads are consecutive; each reduction (the sum, then the sum
of squared deviations) is a warp shuffle whose result every lane keeps in a register
(TVM lowers a reduction over a 32-lane threadIdx.x to shuffles and a broadcast), so no
shared memory and no barrier; the elementwise pass (normalize, scale, shift and the
fused neighbours, the cast to float16) runs on the same lanes. A block holds up to 8
rows (threadIdx.y), as many as still leave every SM (``sm_count``) a block.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline_contiguous_spatial

LANES = 32  # a warp
ROWS_PER_BLOCK = (8, 7, 4, 2, 1)


def choose_rows_per_block(rows: int, row_length: int, sm_count: int) -> int:
    """The most rows per block, of ROWS_PER_BLOCK, whose grid still gives every SM a
    block; one row per block where no such grid exists. A block's rows never cross the
    innermost spatial axis (``row_length``: an image row of pixels), so that each
    reduction computes exactly its block's rows, not the rectangle around them."""
    for per_block in ROWS_PER_BLOCK:
        if row_length % per_block == 0 and rows // per_block >= sm_count:
            return per_block
    return 1


def _static_extents(sch: s_tir.Schedule, block) -> list[int] | None:
    extents = [sch.get(loop).extent for loop in sch.get_loops(block)]
    if not all(isinstance(e, tvm.tirx.IntImm) for e in extents):
        return None
    return [int(e) for e in extents]


def _reads_reduced_values_per_column(sch: s_tir.Schedule, reductions, last) -> bool:
    """Whether the elementwise block reads the reductions' results at an index that
    depends on its innermost (column) axis."""
    reduced = [w.source for r in reductions for w in sch.get(r.block_rv).writes]
    block = sch.get(last.block_rv)
    column = block.iter_vars[-1].var
    found = []
    for region in block.reads:
        if any(region.source.same_as(b) for b in reduced):
            for axis in region.region:
                for expr in (axis.min, axis.extent):
                    tvm_ffi.structural_walk(expr, (tvm.tirx.Var, lambda v: found.append(v.same_as(column))), order="post")
    return any(found)


def row_reduction_schedule(func: tvm.tirx.PrimFunc, sm_count: int) -> s_tir.Schedule | None:
    """One warp per row for a kernel of reductions over the innermost axis (all over the
    same loops) and one elementwise block over those loops; None for any other kernel."""
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    infos = try_inline_contiguous_spatial(sch, normalize_prim_func(sch))
    if not infos or len(infos) < 2:
        return None
    reductions, last = infos[:-1], infos[-1]
    kinds = reductions[0].dom_kind()
    if not kinds.endswith("R") or kinds.count("R") != 1 or any(r.dom_kind() != kinds for r in reductions):
        return None
    extents = _static_extents(sch, reductions[0].block_rv)
    if extents is None or len(extents) < 2 or any(_static_extents(sch, r.block_rv) != extents for r in reductions):
        return None  # dynamic shapes, or reductions over different loops: GeneralReduction's
    last_extents = _static_extents(sch, last.block_rv)
    if not last.is_injective() or last_extents is None:
        return None
    if _reads_reduced_values_per_column(sch, reductions, last):
        return None  # not a reduction over the innermost axis, e.g. a softmax over another
    rows = 1
    for extent in extents[:-1]:
        rows *= extent
    per_block = choose_rows_per_block(rows, extents[-2], sm_count)

    loops = sch.get_loops(last.block_rv)
    if last_extents == extents[-1:] and all(e == 1 for e in extents[:-1]):
        # One row (the head's LayerNorm): dlight's normalization dropped its unit loops.
        block_index = sch.add_unit_loop(last.block_rv)
        sch.reorder(block_index, loops[0])
        row_in_block = sch.add_unit_loop(loops[0])
    elif last_extents == extents:
        # The block's rows are split off the innermost spatial axis before the others are
        # fused: each reduction's row then has affine bindings when it is computed at the
        # block (fused first, the row's index came out in a form TVM 0.27 rejects).
        outer, row_in_block = sch.split(loops[-2], [None, per_block])
        block_index = sch.fuse(*loops[:-2], outer)
    else:
        return None
    columns, lane = sch.split(loops[-1], [None, LANES])
    sch.reorder(block_index, row_in_block, lane, columns)
    sch.bind(block_index, "blockIdx.x")
    sch.bind(row_in_block, "threadIdx.y")
    sch.bind(lane, "threadIdx.x")

    # Each reduction runs over the block's rows, a warp per row, before the elementwise
    # pass. Its result stays in registers ("local"): the warp's allreduce hands it to
    # every lane. In shared memory it would need a barrier that TVM 0.27's sync planner
    # leaves out (lane 0 writes sum[threadIdx.y], the other lanes read the same index).
    for reduction in reversed(reductions):
        for index, _ in enumerate(sch.get(reduction.block_rv).writes):
            sch.set_scope(reduction.block_rv, index, "local")
        sch.compute_at(reduction.block_rv, block_index, preserve_unit_loops=True)
        loops = sch.get_loops(reduction.block_rv)
        reduced_row = sch.fuse(*loops[1:-1])
        reduced_columns, reduced_lane = sch.split(loops[-1], [None, LANES])
        sch.reorder(reduced_lane, reduced_columns)
        sch.bind(reduced_row, "threadIdx.y")
        sch.bind(reduced_lane, "threadIdx.x")
    return sch
