"""Default GPU schedule for the sum of a split-K GEMM's partial sums and its epilogue
(pipeline/compiler/split_k.py): out[..., n] = epilogue(sum over s of partial[s, ..., n]).

A reduction over the first axis of a few (2-16) slices: each thread computes one output
element, adding its slices in a register in order (the same order on every run), then
applies the epilogue (bias, GELU, layer scale, residual, casts) and writes it.
Neighbouring threads take neighbouring channels, so every load and store of a warp is
contiguous. dlight's GeneralReduction rule would give each output a 256-thread block.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import ScheduleError
from tvm.s_tir.dlight.analysis import get_root_block

from pipeline.compiler.gpu_cost_model import SPLITS

THREADS = (256, 128, 64, 32)


def _is_sum_over_first_axis(block) -> bool:
    """``block`` adds its one read buffer over the first axis: out[i...] += in[s, i...]."""
    spatial = [v for v in block.iter_vars if int(v.iter_type) == tirx.IterVar.DataPar]
    reduce = [v for v in block.iter_vars if int(v.iter_type) == tirx.IterVar.CommReduce]
    if len(reduce) != 1 or len(block.reads) != 1 or len(spatial) + 1 != len(block.iter_vars):
        return False
    extent = reduce[0].dom.extent
    if not isinstance(extent, tirx.IntImm) or int(extent) > max(SPLITS):
        return False
    read_indices = [r.min for r in block.reads[0].region]
    expected = [reduce[0].var, *(v.var for v in spatial)]
    return len(read_indices) == len(expected) and all(i.same_as(v) for i, v in zip(read_indices, expected))


def _threads_per_block(elements: int, sm_count: int) -> int:
    """The most threads per block, of THREADS, whose grid still gives every SM a block."""
    return next((t for t in THREADS if -(-elements // t) >= sm_count), THREADS[-1])


def partial_sums_schedule(func: tirx.PrimFunc, sm_count: int) -> s_tir.Schedule | None:
    """The schedule of a sum over the first axis followed by elementwise blocks, None if
    ``func`` is not one with static shapes."""
    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(get_root_block(sch))
    if not blocks or not _is_sum_over_first_axis(sch.get(blocks[0])):
        return None
    reduction, epilogue = blocks[0], blocks[1:]
    if any(int(v.iter_type) != tirx.IterVar.DataPar for b in epilogue for v in sch.get(b).iter_vars):
        return None
    try:
        for block in epilogue[:-1]:
            sch.compute_inline(block)
        last = epilogue[-1] if epilogue else reduction
        loops = sch.get_loops(last)
        spatial = loops if epilogue else loops[:-1]
        extents = [sch.get(loop).extent for loop in spatial]
        if not all(isinstance(e, tirx.IntImm) for e in extents):
            return None
        elements = 1
        for extent in extents:
            elements *= int(extent)
        threads = _threads_per_block(elements, sm_count)
        block_x, thread_x = sch.split(sch.fuse(*spatial), [None, threads])
        sch.bind(block_x, "blockIdx.x")
        sch.bind(thread_x, "threadIdx.x")
        if epilogue:
            sch.compute_at(reduction, thread_x)
            sch.set_scope(reduction, 0, "local")
    except ScheduleError:
        return None
    return sch
