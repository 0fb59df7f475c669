"""pipeline/kernel_profile.py: a profiler trace read into GPU time per kernel per call,
set beside compile's roofline bounds (the GPU check's kernel table)."""

from __future__ import annotations

import pytest

from pipeline import kernel_profile

# Two calls of a model with two kernels, as PyTorch's profiler exports them (Chrome trace,
# microseconds); runtime API and memcpy events are not kernels.
TRACE = {"traceEvents": [
    {"ph": "X", "cat": "kernel", "name": "fused_matmul1_add_kernel", "dur": 30.0},
    {"ph": "X", "cat": "kernel", "name": "fused_layer_norm_cast1_kernel", "dur": 4.0},
    {"ph": "X", "cat": "kernel", "name": "fused_layer_norm_cast1_kernel", "dur": 6.0},
    {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "dur": 12.0},
    {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "dur": 3.0},
    {"ph": "X", "cat": "kernel", "name": "fused_matmul1_add_kernel", "dur": 34.0},
    {"ph": "X", "cat": "kernel", "name": "fused_layer_norm_cast1_kernel", "dur": 5.0},
    {"ph": "X", "cat": "kernel", "name": "fused_layer_norm_cast1_kernel", "dur": 5.0},
]}
COSTS = [
    {"kernel": "fused_matmul1_add", "calls": 1, "roofline_us": 4.0, "rule": "TensorCoreMatmul", "blocks": 196,
     "threads": 128, "flops": 1e9, "bytes": 1e6, "bound": "compute", "gemm": [1, 3136, 384, 96], "tile": [64, 64],
     "modeled_steps": 160.0},
    {"kernel": "fused_layer_norm_cast1", "calls": 2, "roofline_us": 0.5, "rule": "RowReductionPerWarp",
     "blocks": 392, "threads": 256, "flops": 1e6, "bytes": 2e6, "bound": "memory"},
]


def test_kernel_names_are_the_primfuncs_names():
    assert kernel_profile.kernel_name("fused_conv2d_add_kernel") == "fused_conv2d_add"
    assert kernel_profile.kernel_name("fused_conv2d_add_kernel_1") == "fused_conv2d_add"
    assert kernel_profile.kernel_name("fused_conv2d_add_kernel(half*, float*)") == "fused_conv2d_add"
    # Other names keep all but their argument list.
    assert kernel_profile.kernel_name("void at::native::vectorized_elementwise_kernel<4>(int)") \
        == "void at::native::vectorized_elementwise_kernel<4>"


def test_times_are_per_call_of_the_model_largest_first():
    rows = kernel_profile.kernel_times(TRACE, calls=2)
    assert [r["kernel"] for r in rows] == ["fused_matmul1_add", "fused_layer_norm_cast1"]
    matmul, norm = rows
    assert matmul["launches"] == 1 and matmul["us"] == pytest.approx(32.0)
    assert norm["launches"] == 2 and norm["us"] == pytest.approx(10.0) and norm["us_per_launch"] == pytest.approx(5.0)
    with pytest.raises(ValueError):
        kernel_profile.kernel_times(TRACE, calls=0)


def test_each_kernel_is_set_beside_its_roofline_bound_and_the_rest_is_time_between_kernels():
    rows = kernel_profile.with_costs(kernel_profile.kernel_times(TRACE, 2), COSTS)
    matmul, norm = rows
    assert matmul["rule"] == "TensorCoreMatmul" and matmul["x_roofline"] == pytest.approx(8.0)
    assert norm["roofline_us"] == pytest.approx(1.0) and norm["x_roofline"] == pytest.approx(10.0)  # 2 calls
    unknown = kernel_profile.with_costs([{"kernel": "other", "launches": 1, "us": 1.0, "us_per_launch": 1.0}], COSTS)
    assert "rule" not in unknown[0]
    totals = kernel_profile.summary(rows, latency_ms=0.050)
    assert totals == {"kernel_us": pytest.approx(42.0), "launches": 3, "kernels": 2,
                      "latency_us": pytest.approx(50.0), "between_kernels_us": pytest.approx(8.0)}
    text = kernel_profile.markdown(rows, totals, calls=2, top=1)
    assert "2 kernels, 3 launches, 42.0 us of kernel time of a 50.0 us median call (8.0 us between kernels)" in text
    # The GEMM's modeled steps, and the time each took on the GPU: what calibrates the model.
    assert "| fused_matmul1_add | TensorCoreMatmul | 196 x 128 | 1 | 32.0 | 76% | 4.00 | 8.0 | 160 (200) |" in text
    assert "| 1 more | | | 2 | 10.0 | | | | |" in text
    assert "Tensor-core GEMMs: 200 ns per modeled step, median of 1 kernels" in text
