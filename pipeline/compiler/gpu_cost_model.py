"""The GPU cost model of the tensor-core GEMM schedule (schedules/gpu_matmul.py): which block
tile and K pipeline a GEMM gets, its modeled time, and into how many partial sums over K
split_k.py splits it. Pure integer planning, no TVM: the graph pass that splits GEMMs and
the schedule rule that tiles them both ask it, so neither imports the other.

Each thread block computes a TM x TN tile of C with WMMA 16x16x16 fragments, its warps each
up to 2x2 fragments; the A and B tiles of each K step are staged in shared memory in a two-
or three-stage pipeline (``choose_pipeline``).
"""

from __future__ import annotations

FRAGMENT = 16  # WMMA m16n16k16
# Block tiles, largest first: (warps along M, warps along N, fragments per warp along M,
# along N). 64x64 (4 warps of 32x32) down to one warp of one 16x16 fragment. A 64x128
# tile would need more than the 48 KB of shared memory a block gets without opting in
# (two stages of its A and B tiles, 27 KB, beside its 33 KB float32 output stage).
TILES = ((2, 2, 2, 2), (1, 2, 2, 2), (1, 1, 2, 2), (1, 1, 1, 2), (1, 1, 1, 1))
# K steps (in fragments of 16) and pipeline depths, preferred first. At batch 1 a block has
# little math per K step and few warps per SM hide nothing, so each step waits for global
# memory: fewer, deeper steps and a third stage in flight are what hide that latency.
_K_STEPS = (8, 4, 2, 1)
_STAGES = (3, 2)
_SHARED_BYTES = 40 * 1024  # of the 48 KB a block gets without opting in, with room for alignment
ROW_PAD = 8  # float16 elements after each shared row (storage_align), against bank conflicts


def shared_bytes(rows: int, columns: int, k_step: int, stages: int) -> int:
    """Shared memory of a block: ``stages`` copies of its A (rows x k) and B (k x columns)
    float16 tiles, and its float32 output stage."""
    operands = rows * (k_step + ROW_PAD) + k_step * (columns + ROW_PAD)
    return stages * operands * 2 + rows * (columns + 4) * 4


def choose_pipeline(rows: int, columns: int, k: int) -> tuple[int, int]:
    """(K step in fragments, stages): the deepest K step dividing K, then the most stages,
    that fit a block's shared memory; the K step is at most a quarter of K, so that the
    pipeline has steps to overlap."""
    for k_fragments in _K_STEPS:
        step = k_fragments * FRAGMENT
        if k % step or (k_fragments > 1 and 4 * step > k):
            continue
        for stages in _STAGES:
            if shared_bytes(rows, columns, step, stages) <= _SHARED_BYTES:
                return k_fragments, stages
    return 1, 2


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def tile_shape(tile: tuple[int, int, int, int]) -> tuple[int, int]:
    """(rows, columns) of C one block computes."""
    warps_m, warps_n, frags_m, frags_n = tile
    return warps_m * frags_m * FRAGMENT, warps_n * frags_n * FRAGMENT


def grid_blocks(m: int, n: int, tile: tuple[int, int, int, int]) -> int:
    rows, columns = tile_shape(tile)
    return _ceil_div(m, rows) * _ceil_div(n, columns)


def choose_tile(m: int, n: int, sm_count: int, batch: int = 1, k: int | None = None) -> tuple[int, int, int, int]:
    """The block tile of an M x N output (``batch`` of them, each K = ``k`` deep): for one,
    the largest whose grid has at least ``sm_count`` blocks, else the smallest (the tiles
    measured on an H200); for a batch (a split-K GEMM's partial sums), the one of least
    ``modeled_steps``, the larger of equals."""
    if batch == 1 or k is None:
        return next((tile for tile in TILES if grid_blocks(m, n, tile) >= sm_count), TILES[-1])
    return min(TILES, key=lambda tile: modeled_steps(m, n, k, batch, tile, sm_count))


# What modeled_steps assumes of a GPU (sm_80 and later): the shared memory, warps and
# blocks an SM holds at once (100 KB is sm_86/sm_89's, the least of them: sm_80 and
# Jetson Orin have 164 KB, sm_90 228 KB), and how many 16x16x16 MMAs an SM completes in
# the time one warp takes for one step of its K loop (a fragment's loads and its MMA):
# two warps per sub-partition hide each other's waits. Assumptions, not measurements;
# the GPU check's kernel table is where they are judged.
_SHARED_PER_SM = 100 * 1024
_WARPS_PER_SM = 48
_BLOCKS_PER_SM = 16
_MMAS_PER_STEP_PER_SM = 8


def resident_blocks(tile: tuple[int, int, int, int], k: int) -> int:
    """How many blocks of ``tile`` (K = ``k`` deep) an SM holds at once."""
    rows, columns = tile_shape(tile)
    k_fragments, stages = choose_pipeline(rows, columns, k)
    warps = tile[0] * tile[1]
    return max(1, min(_SHARED_PER_SM // shared_bytes(rows, columns, k_fragments * FRAGMENT, stages),
                      _WARPS_PER_SM // warps, _BLOCKS_PER_SM))


def modeled_steps(m: int, n: int, k: int, batch: int, tile: tuple[int, int, int, int], sm_count: int) -> float:
    """The modeled time of ``batch`` M x N x K GEMMs in ``tile``s, in one warp's K-loop
    steps: the waves of blocks the SMs hold at once, each as long as a warp's chain of
    MMAs (its fragments times K / 16), or all the MMAs (of the padded tiles) spread
    over the SMs' throughput, whichever is longer."""
    _, _, frags_m, frags_n = tile
    rows, columns = tile_shape(tile)
    blocks = batch * grid_blocks(m, n, tile)
    waves = _ceil_div(blocks, sm_count * resident_blocks(tile, k))
    chain = frags_m * frags_n * k / FRAGMENT
    mmas = blocks * (rows // FRAGMENT) * (columns // FRAGMENT) * k / FRAGMENT
    return max(waves * chain, mmas / (sm_count * _MMAS_PER_STEP_PER_SM))


SPLITS = (2, 4, 8, 16)
_MIN_SPLIT_DEPTH = 256  # K of each partial sum: at least a few pipelined steps of 64
# The kernel that adds the partial sums, in K-loop steps: a launch in the CUDA graph and
# a small memory-bound kernel, about 3-4 us (an H200's ncu profile, ninth session: a
# stage-2 GEMM of 192 modeled steps took 8 us at batch 1). An assumption, like the above.
_PARTIAL_SUM_KERNEL_STEPS = 96


def allowed_splits(k: int) -> list[int]:
    """The splits of SPLITS that leave each partial sum at least _MIN_SPLIT_DEPTH deep, in
    whole 64-deep steps."""
    return [s for s in SPLITS if k % s == 0 and (k // s) % 64 == 0 and k // s >= _MIN_SPLIT_DEPTH]


def split_k_factor(m: int, n: int, k: int, sm_count: int) -> int:
    """Into how many partial sums over K to split an M x N x K GEMM (1: not split).

    Where M is small, the grid of even the smallest tiles leaves SMs idle or each warp a
    long serial chain over K (ConvNeXt-T's stage 3 at batch 1: 16x16 tiles, K = 3072).
    Split S ways, the GEMM is S independent GEMMs over K / S, each writing float32
    partial sums that one more kernel adds before the epilogue. The split of least
    ``modeled_steps`` plus that kernel's cost is taken, where it beats the GEMM unsplit.
    Fewer rows than a fragment (the classifier at batch 1) is a GEMV, which the tensor-core
    rule leaves to dlight's: the model is not about it, and it stays whole.
    """
    if m < FRAGMENT:
        return 1
    best_splits = 1
    best = modeled_steps(m, n, k, 1, choose_tile(m, n, sm_count), sm_count)
    for splits in allowed_splits(k):
        depth = k // splits
        tile = choose_tile(m, n, sm_count, splits, depth)
        steps = modeled_steps(m, n, depth, splits, tile, sm_count) + _PARTIAL_SUM_KERNEL_STEPS
        if steps < best:
            best_splits, best = splits, steps
    return best_splits


def takes_arch(arch: str) -> bool:
    """Whether this schedule runs on CUDA architecture ``arch`` ("sm_90"): cp.async needs sm_80."""
    return arch.startswith("sm_") and arch[3:].isdigit() and int(arch[3:]) >= 80
