"""A GPU kernel's roofline bound is computed at the peaks of the target's own chip, and says whose."""

from __future__ import annotations

import pytest
import tvm
from tvm import relax, te
from tvm.script import relax as R

from pipeline.compiler.cost import kernel_costs, roofline_line
from targets import GPU_PEAKS, get_target


def _matmul_module() -> tvm.IRModule:
    """main calls one 64x128x256 fp32 matmul twice."""
    builder = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((64, 128), "float32"))
    w = relax.Var("w", R.Tensor((128, 256), "float32"))

    def matmul(a, b):
        k = te.reduce_axis((0, 128), "k")
        return te.compute((64, 256), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="matmul")

    with builder.function("main", [x, w]):
        first = builder.emit_te(matmul, x, w, primfunc_name_hint="matmul")
        second = builder.emit_te(matmul, x, w, primfunc_name_hint="matmul")
        builder.emit_func_output(relax.op.add(first, second))
    return builder.get()


def test_an_sm86_compile_is_bounded_at_an_sm86_chips_peaks_and_says_so():
    with tvm.target.Target(get_target("cuda-sm86").tvm_target):
        cost = kernel_costs(_matmul_module())
    peaks = GPU_PEAKS["sm_86"]
    (kernel,) = cost["kernels"]
    assert kernel["calls"] == 2 and kernel["flops"] == 2 * 64 * 128 * 256
    assert kernel["bytes"] == 4 * (64 * 128 + 128 * 256 + 64 * 256)
    expected = max(kernel["flops"] / peaks.fp32_flops, kernel["bytes"] / peaks.memory_bytes) * 1e6
    assert kernel["roofline_us"] == pytest.approx(expected, abs=1e-6)
    line = roofline_line(cost)
    assert line.startswith("roofline bound at the RTX 3090's peak rates (sm_86: GA102 whitepaper): ")
    assert "H200" not in line


def test_an_architecture_without_figures_says_whose_it_borrows():
    cost = kernel_costs(_matmul_module(), arch="sm_120")
    assert cost["chip"] == "H200" and cost["rates"]["fp32_flops"] == GPU_PEAKS["sm_90"].fp32_flops
    assert roofline_line(cost).startswith("roofline bound at the H200's peak rates (no figures for sm_120: sm_90's, ")
