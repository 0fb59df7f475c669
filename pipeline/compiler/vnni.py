"""AVX-512 VNNI kernels for the int8 matmuls of pipeline/compiler/int8.py on x86 (the pointwise
layers, and the stem and downsampling convolutions as matmuls of non-overlapping patches).

`vpdpbusd` multiplies 64 unsigned 8-bit activations by 64 signed 8-bit weights and adds
each group of four products into one of 16 int32 lanes: 64 multiply-adds per instruction,
where the plain int8 x int8 -> int32 kernels (sign-extend, then 32-bit multiply) do 16.

The lowering feeds it `xu8 = xq + 128` (uint8) and a weight packed at compile time into
the layout the instruction reads, [N/16, K/4, 16, 4]: for 16 output columns, the 4
consecutive k of each column are one 32-bit lane. The +128 shift is folded into the
per-channel int32 offset the lowering already adds, so results stay bit-exact.

The kernel is a TE PrimFunc called through `R.call_tir`; TVM's AnnotateTIROpPattern sees
a reduction with an elementwise-fusable output, so FuseOps fuses the requantize epilogue
into it like into any matmul. The fused PrimFunc is recognised by its block name and
scheduled by `schedule_vnni_matmul`: a register tile of rows x 16-lane column vectors
kept in registers across the reduction, its inner 16 columns x 4 k tensorized with a VNNI
intrinsic (VNNI_LOCAL_INTRIN: TVM's own does not verify with this LLVM, and accumulates in
memory), the epilogue computed per tile, tiles in parallel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

import tvm
from tvm import te

if TYPE_CHECKING:
    from tvm.s_tir import Schedule

# The block the kernel's reduction is written in; the schedule finds fused kernels by it.
VNNI_MATMUL_BLOCK = "vnni_matmul"
LANES = 16  # int32 accumulators per vpdpbusd
GROUP = 4  # consecutive k per accumulator lane
ACTIVATION_SHIFT = 128  # int8 -> uint8: the instruction's activations are unsigned
# Register tile: rows x column vectors. 32 zmm registers hold the accumulators, the
# column vectors of the weight being read and a broadcast activation.
_MAX_ROWS = 8
_MAX_ACCUMULATORS = 24
_MAX_COLUMN_VECTORS = 4


def has_vnni(tvm_target: "tvm.target.Target") -> bool:
    """Whether a target compiles to a CPU with AVX-512 VNNI (vpdpbusd on zmm registers):
    x86 LLVM targets whose -mcpu or -mattr has avx512vnni (znver4, icelake, cascadelake,
    sapphirerapids ...). GPU targets run their kernels on the GPU: never."""
    if tvm_target.kind.name != "llvm" or "gpu" in tvm_target.keys:
        return False
    try:
        return bool(tvm.target.codegen.target_has_features("avx512vnni", tvm_target))
    except Exception:  # an LLVM built without this target's backend (ARM on an x86 build)
        return False


def fits(k: int, n: int) -> bool:
    """Whether a (K, N) weight maps onto the instruction without padding."""
    return k % GROUP == 0 and n % LANES == 0


def pack_weight(wq: np.ndarray) -> np.ndarray:
    """(K, N) int8 -> [N/16, K/4, 16, 4]: packed[j, g, lane, i] = wq[4 g + i, 16 j + lane]."""
    k, n = wq.shape
    if not fits(k, n):
        raise ValueError(f"weight {wq.shape}: K must be a multiple of {GROUP}, N of {LANES}")
    # (K, N) -> (K/4, 4, N/16, 16) -> (N/16, K/4, 16, 4)
    return np.ascontiguousarray(wq.reshape(k // GROUP, GROUP, n // LANES, LANES).transpose(2, 0, 3, 1))


def matmul_primfunc(m: int, k: int, n: int) -> "tvm.tirx.PrimFunc":
    """C[m, n] (int32) = sum_k A[m, k] (uint8) * W[n, k] (int8, packed by pack_weight)."""
    # int64 extents, like the PrimFuncs LegalizeOps writes: FuseTIR maps each Relax tensor
    # to one buffer and refuses a fused group whose functions disagree on the index type.
    m, k, n, lanes, group = (tvm.tirx.IntImm("int64", v) for v in (m, k, n, LANES, GROUP))
    a = te.placeholder((m, k), "uint8", name="A")
    w = te.placeholder((n // lanes, k // group, lanes, group), "int8", name="W")
    r = te.reduce_axis((0, k), name="k")
    c = te.compute(
        (m, n),
        lambda i, j: te.sum(
            a[i, r].astype("int32") * w[j // LANES, r // GROUP, j % LANES, r % GROUP].astype("int32"), axis=r
        ),
        name=VNNI_MATMUL_BLOCK,
    )
    # No global symbol: the lowering adds it to the module under a name of its own.
    return te.create_prim_func([a, w, c]).without_attr("global_symbol")


def _divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, max(1, min(n, cap)) + 1) if n % d == 0)


def register_tile(m: int, n: int) -> tuple[int, int]:
    """(rows, column vectors) of the register tile for an (m, n) output: both divide the
    output exactly (a remainder tile would need a predicate, which tensorize refuses)."""
    rows = _divisor_at_most(m, _MAX_ROWS)
    vectors = _divisor_at_most(n // LANES, min(_MAX_COLUMN_VECTORS, _MAX_ACCUMULATORS // rows))
    return rows, vectors


# TVM's own VNNI intrinsic (tvm.s_tir.tensor_intrin.x86.VNNI_DOT_16x4_INTRIN) accumulates
# into a "global" buffer. A tile's accumulators in a global buffer of 1 KiB or more become a
# heap workspace (TVM's stack limit for CPU allocations), which LLVM cannot keep in
# registers; this copy accumulates into a "local" buffer, always a stack array.
VNNI_LOCAL_INTRIN = "pipeline_dot_16x4_vnni_local"


def register_intrinsic() -> None:
    """Register VNNI_LOCAL_INTRIN (idempotent). Replaying a schedule that tensorizes with it
    (a tuning record of a VNNI kernel) needs it registered in that process."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    if TensorIntrin.get(VNNI_LOCAL_INTRIN, allow_missing=True) is not None:
        return

    @T.prim_func(s_tir=True)
    def desc(
        a: T.Buffer((4,), "uint8", offset_factor=1),
        b: T.Buffer((16, 4), "int8", offset_factor=1),
        c: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:4], b[0:16, 0:4])
            T.writes(c[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(
        a: T.Buffer((4,), "uint8", offset_factor=1),
        b: T.Buffer((16, 4), "int8", offset_factor=1),
        c: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:4], b[0:16, 0:4])
            T.writes(c[0:16])
            # The 4 activations as one 32-bit lane, broadcast to all 16 lanes. LLVM 17+
            # declares the intrinsic on bytes (<16 x i32>, <64 x i8>, <64 x i8>), where
            # TVM's own intrinsic still passes <16 x i32> and fails to verify.
            a_i32 = T.reinterpret(a.vload([0], "uint8x4"), dtype="int32")
            c[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                c.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(a_i32, 16), dtype="int8x64"),
                b.vload([0, 0], dtype="int8x64"),
                dtype="int32x16",
            )

    TensorIntrin.register(VNNI_LOCAL_INTRIN, desc, impl)


def find_vnni_block(sch: Schedule) -> "tvm.s_tir.SBlockRV | None":
    """The VNNI matmul block of a scheduled (fused) PrimFunc: one of the root's children,
    or None. FuseTIR keeps block names (a suffix only where two would clash)."""
    found = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
             if str(sch.get(b).name_hint).startswith(VNNI_MATMUL_BLOCK)]
    return found[0] if len(found) == 1 else None


def schedule_vnni_matmul(func: "tvm.tirx.PrimFunc") -> Schedule | None:
    """The schedule of a (fused) PrimFunc holding one VNNI matmul block, or None when the
    function is not one (the caller falls back to its generic schedule).

    Loops of the (M, N, K) reduction, outermost first:
        tile (parallel)  = column tiles x row tiles, fused
        k/4              the reduction, accumulators stay in registers across it
        rows, vectors    the register tile, unrolled
        16 x 4           one vpdpbusd (tensorized)
    then the epilogue of the tile, vectorized over its 16 lanes.
    """
    from tvm.s_tir import Schedule

    sch = Schedule(tvm.IRModule({"main": func}), seed=1)
    matmul = find_vnni_block(sch)
    if matmul is None:
        return None
    register_intrinsic()
    # The epilogue: elementwise blocks after the matmul, inlined into the last one, which
    # is then computed tile by tile right after the tile's reduction.
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    position = next(index for index, block in enumerate(blocks) if sch.get(block).same_as(sch.get(matmul)))
    epilogue = blocks[position + 1:]
    if not epilogue:  # the lowering always ends in a float cast; anything else is not ours
        return None
    for block in epilogue[:-1]:
        sch.compute_inline(block)
    i, j, k = sch.get_loops(matmul)
    m, n = (int(sch.get(loop).extent) for loop in (i, j))
    rows, vectors = register_tile(m, n)
    i_tile, i_row = sch.split(i, [None, rows])
    j_tile, j_vector, j_lane = sch.split(j, [None, vectors, LANES])
    k_group, k_lane = sch.split(k, [None, GROUP])
    sch.reorder(j_tile, i_tile, k_group, i_row, j_vector, j_lane, k_lane)
    tile = sch.fuse(j_tile, i_tile)
    sch.parallel(tile)
    out = epilogue[-1]
    sch.reverse_compute_at(out, tile)
    sch.vectorize(sch.split(sch.get_loops(out)[-1], [None, LANES])[-1])
    # The tile's accumulators: a small local array that LLVM keeps in zmm registers.
    sch.set_scope(matmul, 0, "local")
    init = sch.decompose_reduction(matmul, k_group)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(j_lane, VNNI_LOCAL_INTRIN)
    sch.unroll(i_row)
    sch.unroll(j_vector)
    return sch
