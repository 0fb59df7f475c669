"""Default CPU schedules of the kernels that are not tiled contractions: LayerNorms and means
over the contiguous (channel) axis, the elementwise and data movement kernels between them, and
matrix-vector products (the classifier head at batch 1).

As lowered, these are one thread of scalar loops. Both schedules here parallelize the outer
(pixel) axes across the cores and vectorize the contiguous axis; a LayerNorm's statistics
are computed per pixel under the same parallel loop (dlight's CPU Reduction rule).
"""

from __future__ import annotations

import math

import tvm
from tvm.s_tir import Schedule, ScheduleError
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.tirx import IterVar

from pipeline.compiler.tvm_compat import prim_func_buffers

# Below this many output elements a parallel loop costs more than it saves (waking the
# thread pool is a few microseconds): the head's 768-channel LayerNorm, the logits.
MIN_PARALLEL_ELEMENTS = 4096


def _output_elements(func: tvm.tirx.PrimFunc) -> int:
    return math.prod(int(dim) for dim in prim_func_buffers(func)[-1].shape)


def _leading_spatial(dom_kind: str) -> int:
    return len(dom_kind) - len(dom_kind.lstrip("S"))


def reduction_rows_schedule(func: tvm.tirx.PrimFunc, vector_lanes: int) -> Schedule | None:
    """LayerNorm-like kernels: reductions over the trailing (contiguous) axes, then
    elementwise blocks, all sharing the leading (pixel) axes. None where that is not the shape.

    Like dlight's CPU Reduction rule (the pixels parallel, every block computed per pixel,
    elementwise blocks vectorized), and each reduction vectorized too: its axis is split
    into vectors and rfactored, so it accumulates ``vector_lanes`` partial sums at once
    and adds them up at the end. A scalar sum over 384 channels is one long chain of
    dependent additions; on ConvNeXt-T that made the LayerNorms 4-7x slower."""
    if _output_elements(func) < MIN_PARALLEL_ELEMENTS:
        return None
    sch = Schedule(tvm.IRModule({"main": func}))
    infos = normalize_prim_func(sch)
    if infos is None or len(infos) < 2 or not infos[-1].is_injective():
        return None
    if all(info.is_injective() for info in infos):
        return None
    leading = min(_leading_spatial(info.dom_kind()) for info in infos)
    if leading == 0:
        return None
    # The partial-sum blocks made by rfactor, to vectorize once they are under the pixel loop.
    partial_sums = []
    for info in infos[:-1]:
        if info.is_injective() or info.dom_kind()[-1] != "R":
            continue
        loops = sch.get_loops(info.block_rv)
        extent = info.iters[-1].dom
        if not isinstance(extent, (int, tvm.tirx.IntImm)) or int(extent) % vector_lanes or int(extent) <= vector_lanes:
            continue
        _, lanes = sch.split(loops[-1], factors=[None, vector_lanes])
        partial_sums.append(sch.rfactor(lanes, factor_axis=len(sch.get(info.block_rv).writes[0].region)))
    last = infos[-1].block_rv
    loops = sch.get_loops(last)
    pixels = sch.fuse(*loops[:leading]) if leading > 1 else loops[0]
    sch.parallel(pixels)
    _vectorize_inner(sch, last, vector_lanes)
    producers = [block for block in sch.get_child_blocks(sch.get_sblock("root")) if sch.get(block) != sch.get(last)]
    for block in reversed(producers):
        sch.compute_at(block, pixels, preserve_unit_loops=True)
    for block in producers:
        if any(sch.get(block).same_as(sch.get(rf)) for rf in partial_sums):
            _vectorize_partial_sums(sch, block, vector_lanes)
        elif all(int(iv.iter_type) == IterVar.DataPar for iv in sch.get(block).iter_vars):
            _vectorize_inner(sch, block, vector_lanes)
    return sch


def _vectorize_partial_sums(sch: Schedule, block, vector_lanes: int) -> None:
    """compute_at gives an rfactor block a loop per block iter, in their order: the vector
    lanes (spatial since rfactor) come before the reduction over vectors. Swapped, the
    lanes are the inner loop and vectorize."""
    lanes, over_vectors = [loop for loop in sch.get_loops(block)[1:] if int(sch.get(loop).extent) > 1]
    if int(sch.get(lanes).extent) != vector_lanes:  # already in order
        lanes, over_vectors = over_vectors, lanes
    else:
        sch.reorder(over_vectors, lanes)
    sch.vectorize(lanes)


def _vectorize_inner(sch: Schedule, block, vector_lanes: int) -> None:
    loops = sch.get_loops(block)
    if len(loops) <= 1:
        return
    inner = loops[-1]
    extent = int(sch.get(inner).extent)
    if extent % vector_lanes == 0 and extent > vector_lanes:
        _, lanes = sch.split(inner, factors=[None, vector_lanes])
        sch.vectorize(lanes)
    elif 1 < extent <= 4 * vector_lanes:
        sch.vectorize(inner)


def injective_schedule(func: tvm.tirx.PrimFunc, vector_lanes: int) -> Schedule | None:
    """A kernel of one elementwise or data movement block (after inlining the others): its
    loops but the last fused and parallel, the last split into vectors. None where the
    kernel has a reduction or several blocks remain."""
    if _output_elements(func) < MIN_PARALLEL_ELEMENTS:
        return None
    sch = Schedule(tvm.IRModule({"main": func}))
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    for block in blocks[:-1]:
        try:
            sch.compute_inline(block)
        except ScheduleError:
            return None
    block = sch.get_child_blocks(sch.get_sblock("root"))
    if len(block) != 1:
        return None
    block = block[0]
    if any(int(iv.iter_type) != IterVar.DataPar for iv in sch.get(block).iter_vars):
        return None
    loops = sch.get_loops(block)
    if len(loops) < 2:
        return None
    sch.parallel(sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0])
    _vectorize_inner(sch, block, vector_lanes)
    return sch


def gemv_schedule(func: tvm.tirx.PrimFunc, vector_lanes: int) -> Schedule | None:
    """A matrix-vector product and its elementwise epilogue (the classifier head at batch 1:
    768 x 1000 weights, each read once). None where that is not the shape.

    Each weight is used once, so the kernel streams the weight matrix: the output columns in
    vectors, one parallel job per vector of columns, and over the reduction each job adds a
    row of weights times one input into its vector (weights [K, N], N contiguous). As
    lowered, one thread computed one output at a time, striding down a column of weights.
    ConvNeXt-T's head on 2 rocketlake threads, timed alone: 0.70 ms as lowered, 0.05 ms so,
    0.09 ms with its tuned record; in the whole model 0.98 -> 0.19 ms."""
    sch = Schedule(tvm.IRModule({"main": func}))
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    product, epilogue = blocks[0], blocks[1:]
    iters = sch.get(product).iter_vars
    kinds = [int(iv.iter_type) for iv in iters]
    if kinds != [IterVar.DataPar] * (len(iters) - 1) + [IterVar.CommReduce] or len(iters) < 2:
        return None
    if any(int(iv.dom.extent) != 1 for iv in iters[:-2]):  # more than one row: a GEMM
        return None
    columns, reduction = iters[-2].var, iters[-1].var
    weights = [
        region for region in sch.get(product).reads
        if len(region.region) >= 2
        and _indexed_by(region.region[-1], columns)
        and _indexed_by(region.region[-2], reduction)
    ]
    if not weights or any(_block_kinds(sch, block) != {IterVar.DataPar} for block in epilogue):
        return None
    # Whole vectors where the columns allow, else the largest power of two dividing them
    # (1000 classes: 8 lanes), as RegisterBlock.columns picks a narrow tile's width.
    extent = int(iters[-2].dom.extent)
    lanes = min(extent & -extent, vector_lanes)
    if lanes < 4:
        return None
    *rows, column, k = sch.get_loops(product)
    jobs, vector = sch.split(column, factors=[None, lanes])
    sch.reorder(jobs, k, vector)
    jobs = sch.fuse(*rows, jobs) if rows else jobs
    sch.parallel(jobs)
    sch.vectorize(vector)
    for block in epilogue:
        sch.reverse_compute_at(block, jobs)
        sch.vectorize(sch.get_loops(block)[-1])
    sch.decompose_reduction(product, k)
    return sch


def _indexed_by(dim_range, var: tvm.tirx.Var) -> bool:
    return dim_range.min.same_as(var) and int(dim_range.extent) == 1


def _block_kinds(sch: Schedule, block) -> set[int]:
    return {int(iv.iter_type) for iv in sch.get(block).iter_vars}
