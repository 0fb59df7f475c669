"""pipeline/compiler/split_k.py and the split-K choice in gpu_cost_model.py: GEMMs of
few rows and deep K become partial GEMMs plus one kernel that adds them and applies the
epilogue; the model computes the same (CPU builds), and both GPU kernels compute on the
CUDA emulator what their CPU builds do."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import relax as R

from pipeline.compiler import phases, split_k
from pipeline.verify.cuda_emulator import gpu_build, kernel_check
from pipeline.compiler.schedules import gpu as gpu_schedules
from pipeline.compiler import gpu_cost_model
from targets import SM_COUNTS, get_target

H200_SMS = SM_COUNTS["sm_90"]


@pytest.mark.parametrize("batch, m, n, k", [
    (1, 49, 768, 3072),  # ConvNeXt-T stage 3 project, batch 1: 16x16 tiles walking K = 3072
    (8, 49, 768, 3072),  # the same at batch 8
])
def test_small_m_deep_k_gemms_are_split_into_slices_of_at_least_256(batch, m, n, k):
    splits = gpu_cost_model.split_k_factor(batch * m, n, k, H200_SMS)
    assert splits in gpu_cost_model.SPLITS
    assert k % splits == 0 and k // splits >= 256
    tile = gpu_cost_model.choose_tile(batch * m, n, H200_SMS, splits, k // splits)
    assert splits * gpu_cost_model.grid_blocks(batch * m, n, tile) >= H200_SMS


@pytest.mark.parametrize("m, n, k", [
    (8 * 3136, 384, 96),  # stage 0 expand, batch 8: K too shallow to slice
    (8 * 3136, 96, 384),  # many waves of blocks already
    (3136, 384, 96),
    (1, 1000, 768),  # the classifier at batch 1: a GEMV, not a tensor-core GEMM
])
def test_gemms_with_enough_blocks_or_shallow_k_are_not_split(m, n, k):
    assert gpu_cost_model.split_k_factor(m, n, k, H200_SMS) == 1
    if m == 1:
        assert gpu_cost_model.split_k_factor(m, n, k, SM_COUNTS["sm_87"]) == 1  # Orin's 16 SMs too


def test_a_split_is_modeled_faster_than_the_gemm_unsplit():
    m, n, k = 49, 768, 3072
    splits = gpu_cost_model.split_k_factor(m, n, k, H200_SMS)
    depth = k // splits
    unsplit = gpu_cost_model.modeled_steps(m, n, k, 1, gpu_cost_model.choose_tile(m, n, H200_SMS), H200_SMS)
    split = gpu_cost_model.modeled_steps(m, n, depth, splits, gpu_cost_model.choose_tile(m, n, H200_SMS, splits, depth),
                                     H200_SMS)
    assert split < unsplit


_X, _K, _N = (1, 7, 7, 3072), 3072, 768


def _model(out_dtype: str = "float32") -> tvm.IRModule:
    """ConvNeXt-T's stage-3 project GEMM with its epilogue: x @ w + bias, times the layer
    scale, plus the residual (float16 operands, float32 accumulation; ``out_dtype`` "" is
    the matmul's default, a float16 result)."""
    builder = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor(_X, "float16"))
    w = relax.Var("w", R.Tensor((_K, _N), "float16"))
    bias = relax.Var("bias", R.Tensor((_N,), "float32"))
    residual = relax.Var("residual", R.Tensor((*_X[:3], _N), "float32"))
    with builder.function("main", [x, w, bias, residual]):
        with builder.dataflow():
            gemm = builder.emit(relax.op.astype(relax.op.matmul(x, w, out_dtype=out_dtype or None), "float32"))
            scaled = builder.emit(relax.op.multiply(relax.op.add(gemm, bias), relax.const(0.5, "float32")))
            result = builder.emit_output(relax.op.add(scaled, residual))
        builder.emit_func_output(result)
    return builder.get()


def _arguments() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(_X).astype("float16"), (rng.standard_normal((_K, _N)) / 32).astype("float16"),
            rng.standard_normal(_N).astype("float32"), rng.standard_normal((*_X[:3], _N)).astype("float32")]


def _run_on_cpu(mod: tvm.IRModule, arguments: list[np.ndarray]) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return vm["main"](*(tvm.runtime.tensor(a) for a in arguments)).numpy()


@pytest.mark.parametrize("out_dtype", ["float32", ""])
def test_the_split_model_computes_what_the_unsplit_one_does(out_dtype):
    split = split_k.split_k(_model(out_dtype), H200_SMS)
    calls = split["main"].script()
    assert split_k.PARTIAL_GEMM_NAME in calls and split_k.PARTIAL_SUM_NAME in calls and "R.matmul" not in calls
    arguments = _arguments()
    expected, result = _run_on_cpu(_model(out_dtype), arguments), _run_on_cpu(split, arguments)
    if out_dtype:  # float32 sums either way, in another order
        np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-4)
        return
    # A float16 result: the unsplit CPU kernel also adds in float16, the split one adds in
    # float32 and rounds once, so it is the nearer to the exact result.
    x, w, bias, residual = (a.astype(np.float64) for a in arguments)
    exact = (np.float64(np.float16(x @ w)) + bias) * 0.5 + residual
    assert np.abs(result - exact).max() <= 2e-3 * np.abs(exact).max()
    assert np.abs(result - exact).max() <= np.abs(expected - exact).max()


def test_a_model_without_such_gemms_is_returned_as_it_is():
    mod = _model()
    assert split_k.split_k(mod, 1) is mod  # one SM: every grid fills it, nothing to gain
    # Before sm_80 GEMMs get dlight's schedules, which the split-K model is not about.
    assert split_k.PARTIAL_GEMM_NAME not in split_k.split_k_pass(get_target("cuda-sm75"))(mod).script()
    assert split_k.PARTIAL_GEMM_NAME in split_k.split_k_pass(get_target("cuda-sm90"))(mod).script()


def _fused_gpu_kernels() -> dict[str, tvm.tirx.PrimFunc]:
    """The model through compile's GPU phases up to scheduling."""
    target = get_target("cuda-sm90")
    mod = _model()
    with tvm.target.Target(target.tvm_target), tvm.transform.PassContext(config=phases.pass_config(target)):
        for name, passes in phases.phases_before(phases.relax_phases(target), "schedule"):
            mod = tvm.transform.Sequential(passes, name=name)(mod)
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def test_on_gpu_the_sum_and_the_epilogue_are_one_kernel_and_both_kernels_compute_on_the_cuda_emulator():
    target = get_target("cuda-sm90")
    kernels = _fused_gpu_kernels()
    assert len(kernels) == 2, sorted(kernels)
    gemm = next(name for name in kernels if name.startswith(split_k.PARTIAL_GEMM_NAME))
    epilogue = next(name for name in kernels if name != gemm)
    assert split_k.PARTIAL_SUM_NAME in epilogue and "add" in epilogue and "multiply" in epilogue
    built = gpu_build.gpu_kernels(kernels, target)
    assert built.rules == {gemm: "TensorCoreMatmul", epilogue: "PartialSums"}
    grid, block = gpu_schedules.launch_dims(built.scheduled[epilogue])
    assert grid[0] >= H200_SMS and block[0] >= 32  # a thread per output, not a block per output
    results = kernel_check.check_kernels(built)
    assert [r.status for r in results] == ["match", "match"], [(r.kernel, r.status, r.detail) for r in results]


def test_the_partial_sums_rule_takes_only_sums_over_the_first_axis():
    from pipeline.compiler.schedules.gpu_partial_sums import partial_sums_schedule

    def legalized(build) -> tvm.tirx.PrimFunc:
        builder = relax.BlockBuilder()
        x = relax.Var("x", R.Tensor((4, 7, 7, 96), "float32"))
        with builder.function("main", [x]):
            with builder.dataflow():
                result = builder.emit_output(build(x))
            builder.emit_func_output(result)
        mod = relax.transform.LegalizeOps()(builder.get())
        return next(f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))

    assert partial_sums_schedule(legalized(lambda x: relax.op.sum(x, axis=[0])), H200_SMS) is not None
    assert partial_sums_schedule(legalized(lambda x: relax.op.sum(x, axis=[3])), H200_SMS) is None  # a row
    assert partial_sums_schedule(legalized(lambda x: relax.op.mean(x, axis=[1, 2])), H200_SMS) is None  # pooling
