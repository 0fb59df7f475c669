"""pipeline/verify/cuda_emulator: CUDA kernels run on this CPU. Hand-written kernels in
TVM's style show what the emulator computes and which faults it reports; then every kernel
of the micro ConvNeXt, as compile schedules it for an H200, matches its CPU build, and the
whole model with every kernel emulated computes ONNX Runtime's logits."""

from __future__ import annotations

import numpy as np
import pytest

from edge_models import seeded_simplified_onnx

from pipeline.verify.cuda_emulator import gpu_build, kernel_check, model_run
from pipeline.verify.cuda_emulator.program import build_program
from pipeline.verify.cuda_emulator.source import UnsupportedCuda, emulation_source, kernel_signatures
from targets import get_target

# The cp.async helpers as TVM 0.27 writes them into its CUDA source.
_CP_ASYNC_HELPERS = r'''
__forceinline__ __device__ void tvm_builtin_ptx_cp_async_wait_group_async_wait_group_0() {
  asm volatile("cp.async.wait_group 0;" :  :  : "memory");
}
__forceinline__ __device__ void tvm_builtin_ptx_cp_async_commit_group_async_commit_group() {
  asm volatile("cp.async.commit_group;" :  : );
}
__forceinline__ __device__ void ptx_cp_async_legacy_cg_16_4_4(void* dst, int dst_off, void* src, int src_off) {
  uint8_t* dst_p = (uint8_t*)dst + dst_off * 4;
  uint8_t* src_p = (uint8_t*)src + src_off * 4;
  unsigned int dst_addr = __cvta_generic_to_shared(dst_p);
  asm volatile("cp.async.cg.shared.global [%0], [%1], %2;"
    :: "r"(dst_addr), "l"(src_p), "n"(16));
}
'''


def _run(source: str, kernel: str, grid, block, *arrays):
    # TVM's preamble defines uchar; the kernels here are written without one.
    return build_program("#define uchar unsigned char\n" + source).launch(kernel, grid, block, list(arrays))


def test_a_warp_sums_with_shuffles_and_every_lane_reads_lane_zero():
    source = r'''
extern "C" __global__ void __launch_bounds__(64) warp_sum_kernel(float* __restrict__ out_ptr, float* __restrict__ x_ptr) {
  float v = x_ptr[((int)threadIdx.y) * 32 + ((int)threadIdx.x)];
  uint mask = __activemask();
  for (int offset = 16; offset > 0; offset >>= 1) v = v + __shfl_down_sync(mask, v, offset, 32);
  v = __shfl_sync(mask, v, ((int)threadIdx.y) * 32, 32);
  out_ptr[((int)threadIdx.y) * 32 + ((int)threadIdx.x)] = v;
}
'''
    x = np.arange(64, dtype=np.float32)
    out = np.zeros(64, np.float32)
    assert _run(source, "warp_sum_kernel", (1, 1, 1), (32, 2, 1), out, x).ok
    np.testing.assert_array_equal(out, np.repeat([x[:32].sum(), x[32:].sum()], 32))


def test_a_barrier_some_threads_never_reach_is_a_deadlock_not_a_hang():
    source = r'''
extern "C" __global__ void __launch_bounds__(32) divergent_kernel(float* __restrict__ out_ptr) {
  if (((int)threadIdx.x) < 16) { __syncthreads(); }
  out_ptr[((int)threadIdx.x)] = 1.0f;
}
'''
    result = _run(source, "divergent_kernel", (1, 1, 1), (32, 1, 1), np.zeros(32, np.float32))
    assert not result.ok and "deadlock" in result.error and "16 threads wait at __syncthreads" in result.error


def test_a_missing_barrier_shows_as_results_that_depend_on_the_order_threads_run_in():
    """Lane 0 writes a sum into shared memory that every lane then reads, with no barrier
    between (the race TVM 0.27's sync planner made of shared reduction results)."""
    source = r'''
extern "C" __global__ void __launch_bounds__(32) broadcast_kernel(float* __restrict__ out_ptr, float* __restrict__ x_ptr) {
  __shared__ float total_ptr[1];
  if (((int)threadIdx.x) == 0) { total_ptr[0] = x_ptr[0] * 2.0f; }
  out_ptr[((int)threadIdx.x)] = total_ptr[0];
}
'''
    x = np.ones(1, np.float32)
    forward, reverse = np.zeros(32, np.float32), np.zeros(32, np.float32)
    program = build_program("#define uchar unsigned char\n" + source)
    assert program.launch("broadcast_kernel", (1, 1, 1), (32, 1, 1), [forward, x]).ok
    assert program.launch("broadcast_kernel", (1, 1, 1), (32, 1, 1), [reverse, x], reverse=True).ok
    assert (forward == 2).all()  # lane 0 ran first
    assert np.isnan(reverse[1:]).all() and reverse[0] == 2  # lanes 31..1 read before lane 0 wrote


def _staged_copy_source(wait: bool) -> str:
    """Each thread copies 4 floats into shared memory with cp.async; then all read a neighbour's."""
    return "#include <cstdint>\n" + _CP_ASYNC_HELPERS + r'''
extern "C" __global__ void __launch_bounds__(8) staged_kernel(float* __restrict__ out_ptr, float* __restrict__ x_ptr) {
  extern __shared__ __align__(64) uchar buf_dyn_shmem_ptr[];
  ptx_cp_async_legacy_cg_16_4_4(buf_dyn_shmem_ptr, ((int)threadIdx.x) * 4, x_ptr, ((int)threadIdx.x) * 4);
  tvm_builtin_ptx_cp_async_commit_group_async_commit_group();
''' + ("  tvm_builtin_ptx_cp_async_wait_group_async_wait_group_0();\n" if wait else "") + r'''
  __syncthreads();
  for (int i = 0; i < 4; ++i) {
    out_ptr[((int)threadIdx.x) * 4 + i] = ((float*)buf_dyn_shmem_ptr)[((((int)threadIdx.x) + 1) & 7) * 4 + i];
  }
}
'''


def test_asynchronous_copies_land_at_their_wait_and_not_before():
    x = np.arange(32, dtype=np.float32)
    waited, not_waited = np.zeros(32, np.float32), np.zeros(32, np.float32)
    assert _run(_staged_copy_source(wait=True), "staged_kernel", (1, 1, 1), (8, 1, 1), waited, x).ok
    np.testing.assert_array_equal(waited, np.roll(x, -4))
    # Without cp.async.wait_group the barrier does not make the copies visible: NaN-filled
    # shared memory is what the other threads read.
    assert _run(_staged_copy_source(wait=False), "staged_kernel", (1, 1, 1), (8, 1, 1), not_waited, x).ok
    assert np.isnan(not_waited).all()


def test_a_misaligned_vector_load_stops_the_kernel_as_it_faults_on_a_gpu():
    source = r'''
extern "C" __global__ void __launch_bounds__(1) vector_kernel(float* __restrict__ out_ptr, float* __restrict__ x_ptr) {
  float4 v = *(float4*)(x_ptr + 1);
  out_ptr[0] = v.x;
}
'''
    result = _run(source, "vector_kernel", (1, 1, 1), (1, 1, 1), np.zeros(1, np.float32), np.zeros(8, np.float32))
    assert not result.ok and "misaligned address" in result.error and "float4" in result.error


_WMMA_SOURCE = r'''
extern "C" __global__ void __launch_bounds__(32) wmma_kernel(float* __restrict__ c_ptr, half* __restrict__ a_ptr, half* __restrict__ b_ptr) {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[1];
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, half, nvcuda::wmma::row_major> a[1];
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, half, nvcuda::wmma::col_major> b[1];
  nvcuda::wmma::fill_fragment(acc[0], 0x0p+0f);
  nvcuda::wmma::load_matrix_sync(a[0], (&(a_ptr[0])), 16);
  nvcuda::wmma::load_matrix_sync(b[0], (&(b_ptr[0])), 16);
  nvcuda::wmma::mma_sync(acc[0], a[0], b[0], acc[0]);
  if (STORING_LANES) {
    nvcuda::wmma::store_matrix_sync((&(c_ptr[0])), acc[0], 16, nvcuda::wmma::mem_row_major);
  }
}
'''


def test_wmma_computes_a_16x16x16_product_and_a_store_by_half_the_lanes_leaves_holes():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((16, 16)).astype(np.float16)
    b_transposed = rng.standard_normal((16, 16)).astype(np.float16)  # col_major B
    expected = a.astype(np.float32) @ b_transposed.T.astype(np.float32)
    full, half_stored = np.full((16, 16), -1, np.float32), np.full((16, 16), -1, np.float32)
    assert _run(_WMMA_SOURCE.replace("STORING_LANES", "true"), "wmma_kernel", (1, 1, 1), (32, 1, 1),
                full, a, b_transposed).ok
    np.testing.assert_allclose(full, expected, rtol=1e-5, atol=1e-5)
    assert _run(_WMMA_SOURCE.replace("STORING_LANES", "((int)threadIdx.x) < 16"), "wmma_kernel", (1, 1, 1),
                (32, 1, 1), half_stored, a, b_transposed).ok
    assert (half_stored == -1).sum() == 128  # the elements lanes 16-31 hold were never written


def test_static_shared_arrays_are_one_per_block_and_apart_from_dynamic_shared_memory():
    source = r'''
extern "C" __global__ void __launch_bounds__(4) shared_kernel(float* __restrict__ out_ptr) {
  extern __shared__ __align__(64) uchar buf_dyn_shmem_ptr[];
  __shared__ alignas(64) float red_buf_ptr[4];
  ((float*)buf_dyn_shmem_ptr)[((int)threadIdx.x)] = 1.0f;
  red_buf_ptr[((int)threadIdx.x)] = (float)((int)blockIdx.x);
  __syncthreads();
  out_ptr[((int)blockIdx.x) * 4 + ((int)threadIdx.x)] = red_buf_ptr[3 - ((int)threadIdx.x)] + ((float*)buf_dyn_shmem_ptr)[0];
}
'''
    out = np.zeros(8, np.float32)
    assert _run(source, "shared_kernel", (2, 1, 1), (4, 1, 1), out).ok
    np.testing.assert_array_equal(out, [1, 1, 1, 1, 2, 2, 2, 2])


def test_inline_ptx_without_an_emulation_is_refused_by_name():
    source = r'''
__forceinline__ __device__ void ptx_ldmatrix_x4(void* dst, void* src) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 ..." :: );
}
extern "C" __global__ void __launch_bounds__(1) k_kernel(float* __restrict__ out_ptr) {}
'''
    with pytest.raises(UnsupportedCuda, match="ptx_ldmatrix_x4"):
        emulation_source(source)


def test_kernel_signatures_read_pointer_parameters_in_order():
    source = 'extern "C" __global__ void __launch_bounds__(32) k_kernel(half* __restrict__ a_ptr, float* __restrict__ b_ptr) {\n}\n'
    (signature,) = kernel_signatures(source)
    assert signature.name == "k_kernel" and signature.parameters == (("half*", "a_ptr"), ("float*", "b_ptr"))


# ---------------------------------------------------------------------------
# Slow: a whole model's kernels, as compile schedules them for an H200


@pytest.mark.slow
def test_every_micro_convnext_kernel_scheduled_for_an_h200_matches_its_cpu_build(tmp_path):
    shape = (2, 3, 64, 64)  # a batch above 1: several images per grid (ConvNeXt-T batch 1: test_gpu_schedules.py)
    onnx_path = seeded_simplified_onnx(tmp_path / "micro.onnx", "micro", 10, shape)
    kernels = gpu_build.model_gpu_kernels(onnx_path, get_target("cuda-sm90"), precision="fp16", input_shape=shape)
    results = kernel_check.check_kernels(kernels)
    assert len(results) == len(kernels.scheduled) >= 20
    failed = [f"{r.kernel} ({r.rule}): {r.status}, {r.detail}" for r in results if r.status != "match"]
    assert not failed, "\n".join(failed)
    rules = {r.rule for r in results}
    assert {"DepthwiseNHWC", "TensorCoreMatmul", "RowReductionPerWarp"} <= rules  # our schedules ran


@pytest.mark.slow
def test_the_micro_convnext_compiled_for_an_h200_and_emulated_computes_onnx_runtimes_logits(tmp_path):
    """The whole fp16 model (compile's GPU graph, every kernel emulated as scheduled) against
    ONNX Runtime float32 on the same ONNX."""
    import onnxruntime as ort

    shape = (2, 3, 64, 64)
    onnx_path = seeded_simplified_onnx(tmp_path / "micro.onnx", "micro", 10, shape)
    model = model_run.emulated_model(onnx_path, get_target("cuda-sm90"), precision="fp16", input_shape=shape)
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    logits = model.run(x)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert model.launches >= 30  # every kernel call went through the emulator
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(logits, expected, rtol=0, atol=2e-2 * np.abs(expected).max())
    assert (logits.argmax(1) == expected.argmax(1)).all()


def test_the_check_script_refuses_a_cpu_target_in_one_line():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cuda_emulation.py"
    done = subprocess.run([sys.executable, str(script), "--target", "x86"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: target 'x86' is not a CUDA target; use e.g. cuda-sm90"
