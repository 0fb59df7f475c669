"""cpu_rows: default CPU schedules of LayerNorms, means and elementwise kernels; and the
register blocking of cpu's tiled default, from the target's vector unit."""

from __future__ import annotations

import re

import numpy as np
import pytest

import tvm
from tvm import relax
from tvm.s_tir.meta_schedule.arg_info import ArgInfo

from pipeline.compiler.schedules import cpu_rows
from pipeline.compiler.schedules.cpu import default_schedule
from pipeline.compiler.schedules.cpu_tiled import register_block
from targets import get_target

X86 = tvm.target.Target(get_target("x86").tvm_target)


def _primfunc(build, shapes: list[tuple[int, ...]]) -> tvm.tirx.PrimFunc:
    """One fused PrimFunc of ``build(*vars)``, legalized and fused as compile makes it."""
    bb = relax.BlockBuilder()
    params = [relax.Var(f"p{i}", relax.TensorType(shape, "float32")) for i, shape in enumerate(shapes)]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(build(bb, *params))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    mod = relax.transform.FuseTIR()(relax.transform.FuseOps()(relax.transform.AnnotateTIROpPattern()(mod)))
    (func,) = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    return func.with_attr("global_symbol", "main")


def _layer_norm(pixels: int, channels: int) -> tvm.tirx.PrimFunc:
    return _primfunc(
        lambda bb, x, g, b: relax.op.nn.layer_norm(x, g, b, axes=[-1], epsilon=1e-6),
        [(1, pixels, pixels, channels), (channels,), (channels,)],
    )


def _mean_subtract(pixels: int, channels: int) -> tvm.tirx.PrimFunc:
    """The first half of a LayerNorm exported in parts (ONNX ReduceMean, Sub)."""
    def build(bb, x):
        mean = bb.emit(relax.op.mean(x, axis=[-1], keepdims=True))
        return relax.op.subtract(x, mean)
    return _primfunc(build, [(1, pixels, pixels, channels)])


def _layer_scale(pixels: int, channels: int) -> tvm.tirx.PrimFunc:
    """Layer scale and residual: (x * gamma) + shortcut, after a reshape."""
    def build(bb, x, gamma, shortcut):
        scaled = bb.emit(relax.op.multiply(relax.op.reshape(x, (1, pixels, pixels, channels)), gamma))
        return relax.op.add(scaled, shortcut)
    return _primfunc(build, [(pixels * pixels, channels), (channels,), (1, pixels, pixels, channels)])


def _run(func: tvm.tirx.PrimFunc, arrays: list[np.ndarray]) -> np.ndarray:
    lib = tvm.compile(tvm.IRModule({"main": func}), target=X86)
    tensors = [tvm.runtime.tensor(a) for a in arrays]
    lib.jit()["main"](*tensors)
    return tensors[-1].numpy()


def _inputs(func: tvm.tirx.PrimFunc) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(rng.standard_normal([int(s) for s in info.shape]) * 3 + 1).astype(str(info.dtype))
            for info in ArgInfo.from_prim_func(func)]


def _same_as_lowered(func: tvm.tirx.PrimFunc, scheduled: tvm.tirx.PrimFunc) -> None:
    arrays = _inputs(func)
    expected = _run(func, [a.copy() for a in arrays])
    np.testing.assert_allclose(_run(scheduled, arrays), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make,pixels,channels", [
    (_layer_norm, 14, 384), (_layer_norm, 16, 40), (_mean_subtract, 16, 96), (_mean_subtract, 8, 64),
])
def test_reductions_over_channels_are_parallel_vectorized_and_exact(make, pixels, channels):
    func = make(pixels, channels)
    with X86:
        sch, kind = default_schedule(tvm.IRModule({"main": func}), X86)
    assert kind == "reduction"
    text = sch.mod.script()
    assert "T.parallel" in text and "T.vectorized" in text
    if channels % 16 == 0:  # whole vectors: the sums are vector partial sums (rfactor)
        assert "_rf" in text
    _same_as_lowered(func, sch.mod["main"])


def test_elementwise_kernels_are_parallel_vectorized_and_exact():
    func = _layer_scale(28, 192)
    with X86:
        sch, kind = default_schedule(tvm.IRModule({"main": func}), X86)
    assert kind == "elementwise"
    assert "T.parallel" in sch.mod.script() and "T.vectorized" in sch.mod.script()
    _same_as_lowered(func, sch.mod["main"])


def test_a_kernel_whose_blocks_cannot_be_inlined_is_declined_not_an_error():
    """A softmax keeps its reductions: the elementwise rule declines it (TVM 0.27 raises
    ScheduleError on the inline; tvm.TVMError, caught here before, no longer exists)."""
    softmax = _primfunc(lambda bb, x: relax.op.nn.softmax(x, axis=-1), [(64, 1024)])
    assert cpu_rows.injective_schedule(softmax, 16) is None


def test_the_head_at_batch_1_is_a_parallel_vectorized_matrix_vector_product():
    # ConvNeXt-T's classifier: 768 features x 1000 classes (not a multiple of 16 lanes: 8).
    func = _primfunc(lambda bb, x, w, b: relax.op.add(relax.op.matmul(x, w), b), [(1, 768), (768, 1000), (1000,)])
    with X86:
        sch, kind = default_schedule(tvm.IRModule({"main": func}), X86)
    assert kind == "gemv"
    text = sch.mod.script()
    assert "T.parallel" in text and "T.vectorized(T.int64(8))" in text
    _same_as_lowered(func, sch.mod["main"])
    # Several rows reuse the weights: a GEMM, tiled.
    batched = _primfunc(lambda bb, x, w: relax.op.matmul(x, w), [(8, 768), (768, 1000)])
    assert cpu_rows.gemv_schedule(batched, 16) is None
    with X86:
        assert default_schedule(tvm.IRModule({"main": batched}), X86)[1] == "tiled"


def test_kernels_too_small_to_share_keep_the_lowered_loops():
    # The head's LayerNorm: 768 outputs, less than waking the thread pool costs.
    func = _primfunc(lambda bb, x, g, b: relax.op.nn.layer_norm(x, g, b, axes=[-1]), [(1, 768), (768,), (768,)])
    assert cpu_rows.reduction_rows_schedule(func, 16) is None
    with X86:
        _, kind = default_schedule(tvm.IRModule({"main": func}), X86)
    assert kind == "as_lowered"


def test_register_block_follows_the_vector_unit():
    avx512 = register_block(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}))
    avx2 = register_block(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}))
    neon = register_block(tvm.target.Target(get_target("arm-a72").tvm_target))
    assert (avx512.vector_lanes, avx512.vector_registers) == (16, 32)
    assert (avx2.vector_lanes, avx2.vector_registers) == (8, 16)
    assert (neon.vector_lanes, neon.vector_registers) == (4, 32)
    # ConvNeXt-T stage 2 (196 pixels): 14 rows x 2 vectors is 28 of 32 registers with AVX-512,
    # and 4 rows (of 6 that fit) with AVX2; the register tile's columns are 2 vectors.
    assert avx512.columns(1536) == 32 and avx512.rows(196, 32) == 14
    assert avx2.columns(1536) == 16 and avx2.rows(196, 16) == 4
    assert 14 * 2 <= avx512.accumulators and 4 * 2 <= avx2.accumulators
    # ConvNeXt-atto's 40 and 80 channels: whole vectors, and more rows for a narrower tile.
    assert avx512.columns(40) == 8 and avx512.columns(80) == 16 and avx512.rows(256, 16) == 16
    # Weights within L2 (stage 0, 96x384): one register tile per job; beyond (stage 3,
    # 768x3072 fp32 = 9 MiB): all 49 rows in a job, each weight panel read once.
    assert avx512.row_blocks(3136, 14, 96 * 384 * 4) == 1
    assert avx512.row_blocks(49, 7, 768 * 3072 * 4) == 7
    # The same rows as image rows ([1, 7, 7, 768] x [768, 3072]): the 7 image rows join the
    # job too, not a job each reading all the weights.
    assert avx512.outer_rows([1, 7, 7], 32, 768 * 3072 * 4) == 18
    assert avx512.outer_rows([1, 56, 56], 32, 96 * 384 * 4) == 1


def test_arm_targets_get_the_tiled_gemm_without_a_core_count():
    # Arm targets name no "num-cores"; the tiled default must not need this machine's (psutil).
    arm = tvm.target.Target(get_target("arm-a72").tvm_target)
    assert not arm.attrs.get("num-cores")
    func = _primfunc(lambda bb, x, w: relax.op.matmul(x, w), [(196, 384), (384, 1536)])
    with arm:
        sch, kind = default_schedule(tvm.IRModule({"main": func}), arm)
    assert kind == "tiled"


def test_a_job_takes_all_image_rows_where_the_weights_exceed_l2():
    # Stage 3's first block, [1, 7, 7, 768] x [768, 3072] (9 MiB of weights): the parallel
    # jobs split the output columns only, each reading its weight panel once for all 49 rows.
    func = _primfunc(lambda bb, x, w: relax.op.matmul(x, w), [(1, 7, 7, 768), (768, 3072)])
    with X86:
        sch, kind = default_schedule(tvm.IRModule({"main": func}), X86)
    assert kind == "tiled"
    assert re.findall(r"T\.parallel\(T\.int64\((\d+)\)", sch.mod.script()) == [str(3072 // 32)]


def test_a_gemms_epilogue_runs_in_its_jobs_not_in_a_pass_of_its_own():
    # fc1 of a ConvNeXt-T stage-2 block: bias and GELU after the matmul.
    func = _primfunc(lambda bb, x, w, b: relax.op.nn.gelu(relax.op.add(relax.op.matmul(x, w), b)),
                     [(196, 384), (384, 1536), (1536,)])
    with X86:
        sch, kind = default_schedule(tvm.IRModule({"main": func}), X86)
    assert kind == "tiled"
    assert sch.mod.script().count("T.parallel(") == 1
    _same_as_lowered(func, sch.mod["main"])
