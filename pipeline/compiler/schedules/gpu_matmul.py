"""Default GPU schedule for float16 GEMMs on tensor cores, tiled for ConvNeXt's shapes.

ConvNeXt's pointwise convolutions, patchify stem and downsampling layers are GEMMs with M
(pixels) from 49 to 3136 per image and K, N (channels) from 48 to 3072. dlight's tensor-core
rule uses one 128x128 block tile for every shape, so at batch 1 stage 3's GEMMs ran on 24
of an H200's 132 SMs, stages them through registers (no asynchronous copies) and skips M
or N up to 64 (stage 4 at batch 1 got no tensor cores at all).

Here each thread block computes a TM x TN tile of C with WMMA 16x16x16 fragments (fp16
in, fp32 accumulators), its warps each up to 2x2 fragments. The tile is the largest of
``TILES`` (64x64 down to 16x16) whose grid still gives every SM (``sm_count``) a block,
else the smallest; M, N and K are padded to the tile. The A and B tiles of each K step
(16 to 128 deep) are copied global -> shared with cp.async (16 bytes per thread per copy)
in a two- or three-stage software pipeline (``choose_pipeline``), so the next steps' loads
overlap this step's math; the epilogue (bias, GELU, layer scale, residual, casts) is
applied on the way out of the accumulators. Where M is small and K deep, split_k.py
first splits the GEMM over K (``split_k_factor``, by ``modeled_steps``); its partial
GEMMs are a batch here, tiled by the same model. The tiles, pipelines and that model are
pure integer planning in pipeline/compiler/gpu_cost_model.py, which split_k.py asks too.
Measured on an H200 before split-K (reports/cuda-sm90-fp16*): ConvNeXt-T fp16 0.58 ms at
batch 1, 1.47 ms at batch 8, with the depthwise kernel of gpu_depthwise.py.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import ScheduleError
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
from tvm.s_tir.dlight.gpu.matmul import (
    auto_inline_consumer_chain,
    auto_inline_producers,
    get_in_out_dtypes,
    get_index_map,
    get_reduction_blocks,
)

from pipeline.compiler.gpu_cost_model import (
    FRAGMENT, ROW_PAD, choose_pipeline, choose_tile, modeled_steps, takes_arch, tile_shape,
)

_WARP = 32
_VECTOR = 8  # float16 lanes per 16-byte copy


def _swap_last_two(indices):
    return [*indices[:-2], indices[-1], indices[-2]]


def _static_extent(extent) -> int | None:
    return int(extent.value) if isinstance(extent, tirx.IntImm) else None


def _normalized_gemm(func: tirx.PrimFunc):
    """(schedule, its GEMM block in the form C[S, I, J] += A[S, I, K] * B[S, K, J], the
    extents (S, M, N, K), the output dtype) of a float16 GEMM kernel with static shapes,
    else None."""
    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(get_root_block(sch))
    reduction_blocks = get_reduction_blocks(sch, blocks)
    if reduction_blocks is None or not get_index_map(sch.get(reduction_blocks[0])):
        return None
    main_block = reduction_blocks[0]
    in_dtype, out_dtype = get_in_out_dtypes(sch.get(main_block))
    if in_dtype != "float16" or out_dtype not in ("float16", "float32"):
        return None

    # C[S, I, J] += A[S, I, K] * B[S, K, J], whatever the layouts of the operands. B is
    # K-major as ConvNeXt's weights are ([in, out]), so that its tile rows are contiguous
    # in global memory and copy as 16-byte vectors.
    reindex_a = sch.reindex(main_block, ("read", 0))
    reindex_b = sch.reindex(main_block, ("read", 1))
    reindex_c = sch.reindex(main_block, ("write", 0))
    matmul_map, a_map, b_map, c_map = get_index_map(sch.get(main_block))
    b_k_major = tirx.IndexMap.from_func(
        lambda *indices: _swap_last_two(b_map.map_indices(indices)), ndim=len(b_map.initial_indices),
    )
    sch.transform_layout(reindex_a, ("write", 0), a_map)
    sch.transform_layout(reindex_b, ("write", 0), b_k_major)
    sch.transform_layout(reindex_c, ("read", 0), c_map)
    sch.transform_block_layout(main_block, matmul_map)

    extents = [_static_extent(v.dom.extent) for v in sch.get(main_block).iter_vars]
    if any(extent is None for extent in extents):
        return None
    return sch, main_block, tuple(extents), out_dtype


def gemm_plan(func: tirx.PrimFunc, sm_count: int) -> dict | None:
    """What the schedule makes of a GEMM kernel, for compile's info: its extents (S, M, N,
    K), the block tile and ``modeled_steps``, which a GPU run's kernel times calibrate."""
    normalized = _normalized_gemm(func)
    if normalized is None:
        return None
    batches, m, n, k = normalized[2]
    tile = choose_tile(m, n, sm_count, batches, k)
    return {"gemm": [batches, m, n, k], "tile": list(tile_shape(tile)),
            "modeled_steps": round(modeled_steps(m, n, k, batches, tile, sm_count), 1)}


def tensor_core_matmul_schedule(func: tirx.PrimFunc, sm_count: int,
                                tile: tuple[int, int, int, int] | None = None) -> s_tir.Schedule | None:
    """The tiled WMMA schedule of a float16 GEMM kernel (fp32 or fp16 accumulation), None
    if ``func`` is not one with static shapes. ``tile`` (one of TILES) instead of
    ``choose_tile``'s: what the GPU check's GEMM sweep times (benchmarks/gemm_sweep.py)."""
    normalized = _normalized_gemm(func)
    if normalized is None:
        return None
    sch, main_block, (batches, m, n, k), out_dtype = normalized
    tile = tile or choose_tile(m, n, sm_count, batches, k)
    warps_m, warps_n, frags_m, frags_n = tile
    rows, columns = tile_shape(tile)
    k_fragments, stages = choose_pipeline(rows, columns, k)
    sch.pad_einsum(main_block, [1, rows, columns, FRAGMENT * k_fragments])

    batch, i, j, kk = sch.get_loops(main_block)
    i, i_fragment = sch.split(i, [None, FRAGMENT])
    j, j_fragment = sch.split(j, [None, FRAGMENT])
    kk, k_fragment = sch.split(kk, [None, FRAGMENT])
    sch.reorder(i, j, kk, i_fragment, j_fragment, k_fragment)
    fragment_block = main_block
    tile_block = sch.blockize(i_fragment)

    i_block, i_warp, i_inner = sch.split(i, [None, warps_m, frags_m])
    j_block, j_warp, j_inner = sch.split(j, [None, warps_n, frags_n])
    k_outer, k_inner = sch.split(kk, [None, k_fragments])
    sch.reorder(i_block, j_block, i_warp, j_warp, k_outer, k_inner, i_inner, j_inner)
    sch.bind(batch, "blockIdx.z")
    sch.bind(sch.fuse(i_block, j_block), "blockIdx.x")
    warp = sch.fuse(i_warp, j_warp)
    sch.bind(warp, "threadIdx.y")
    warps = warps_m * warps_n

    def copy_to_shared(operand: int):
        copy = sch.cache_read(tile_block, operand, "shared.dyn")
        sch.compute_at(copy, k_outer)
        row, col = sch.get_loops(copy)[-2:]
        fused = sch.fuse(row, col)
        _, ty, tx, vector = sch.split(fused, [None, warps, _WARP, _VECTOR])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
        sch.vectorize(vector)
        # A row offset of 8 halves keeps the fragment loads free of bank conflicts.
        sch.storage_align(copy, 0, axis=-2, factor=16, offset=ROW_PAD)
        return copy

    a_copy, b_copy = copy_to_shared(0), copy_to_shared(1)
    auto_inline_producers(sch, a_copy)
    auto_inline_producers(sch, b_copy)

    a_fragment = sch.cache_read(tile_block, 0, "wmma.matrix_a")
    b_fragment = sch.cache_read(tile_block, 1, "wmma.matrix_b")
    sch.compute_at(a_fragment, k_inner)
    sch.compute_at(b_fragment, k_inner)
    # Static shared memory for the output stage: merged into the same dynamic buffer as the
    # float16 operand tiles (where it could reuse their space after the K loop), TVM 0.27
    # fails to build the WMMA store ("tvm_access_ptr element type must match the source
    # buffer", float32 into the float16-typed buffer; seen again on 2026-12-05).
    staged_output = sch.cache_write(tile_block, 0, "shared")
    sch.storage_align(staged_output, 0, axis=-2, factor=16, offset=4)
    accumulator = sch.cache_write(tile_block, 0, "wmma.accumulator")
    sch.reverse_compute_at(accumulator, warp)
    sch.reverse_compute_at(staged_output, warp)
    row, col = sch.get_loops(accumulator)[-2:]
    row_outer, row_fragment = sch.split(row, [None, FRAGMENT])
    col_outer, col_fragment = sch.split(col, [None, FRAGMENT])
    sch.reorder(row_outer, col_outer, row_fragment, col_fragment)
    init = sch.decompose_reduction(tile_block, k_outer)

    for fragment in (a_fragment, b_fragment):
        row, col = sch.get_loops(fragment)[-2:]
        row_outer, row_fragment = sch.split(row, [None, FRAGMENT])
        col_outer, col_fragment = sch.split(col, [None, FRAGMENT])
        sch.reorder(row_outer, col_outer, row_fragment, col_fragment)
        sch.unroll(row_outer)
        sch.unroll(col_outer)

    from tvm.s_tir.tensor_intrin.cuda import get_wmma_intrin_group

    intrinsics = get_wmma_intrin_group(
        load_scope="shared.dyn", store_scope="shared", in_dtype="float16", out_dtype=out_dtype, trans_b=False,
    )
    try:
        sch.tensorize(sch.get_loops(a_fragment)[-2], intrinsics["load_a"])
        sch.tensorize(sch.get_loops(b_fragment)[-2], intrinsics["load_b"])
        sch.tensorize(sch.get_loops(sch.get_child_blocks(init)[0])[-2], intrinsics["init"])
        sch.tensorize(sch.get_loops(accumulator)[-2], intrinsics["store"])
        sch.tensorize(sch.get_loops(fragment_block)[-3], intrinsics["compute"])
    except ScheduleError:
        return None

    # The copies of the next stages - 1 steps (cp.async) are in flight during the math of this one.
    # (The fragment loads from shared memory are not pipelined: TVM 0.27 cannot pipeline
    # the inner K loop once its fragment loops are unrolled.)
    sch.annotate(k_outer, "software_pipeline_stage", [0, 0, stages - 1])
    sch.annotate(k_outer, "software_pipeline_order", [0, 1, 2])
    sch.annotate(k_outer, "software_pipeline_async_stages", [0])

    auto_inline_consumer_chain(sch, staged_output)
    out = sch.fuse(*sch.get_loops(staged_output)[-2:])
    _, tx, vector = sch.split(out, [None, _WARP, 4])
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(vector)
    return sch


class TensorCoreMatmul(GPUScheduleRule):
    """float16 GEMMs on tensor cores with tiles sized for ``sm_count`` SMs (this module)."""

    def __init__(self, sm_count: int):
        self.sm_count = sm_count

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        if not takes_arch(str(target.attrs.get("arch", ""))):
            return None
        return tensor_core_matmul_schedule(func, self.sm_count)
