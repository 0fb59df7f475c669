"""tvm_depthwise: the default schedule of channels-last depthwise convolutions."""

from __future__ import annotations

import numpy as np
import pytest

import tvm
from tvm import relax
from tvm.s_tir.meta_schedule.arg_info import ArgInfo

from pipeline.compiler.kernel_kinds import is_depthwise_nhwc
from pipeline.compiler.schedules.depthwise import depthwise_nhwc_schedule
from pipeline.compiler.schedules.cpu import default_schedule
from targets import get_target


def _conv_primfunc(height: int, channels: int, groups: int, out_dtype: str | None = None) -> tvm.tirx.PrimFunc:
    """conv2d NHWC/HWOI + bias, legalized and fused as compile makes it."""
    in_dtype = "int8" if out_dtype == "int32" else "float32"
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, height, height, channels), in_dtype))
    w = relax.Var("w", relax.TensorType((7, 7, channels, channels // groups), in_dtype))
    b = relax.Var("b", relax.TensorType((channels,), out_dtype or "float32"))
    with bb.function("main", [x, w, b]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(
                x, w, padding=[3, 3, 3, 3], groups=groups, data_layout="NHWC", kernel_layout="HWOI",
                out_layout="NHWC", out_dtype=out_dtype,
            ))
            out = bb.emit_output(relax.op.add(y, b))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    mod = relax.transform.FuseTIR()(relax.transform.FuseOps()(relax.transform.AnnotateTIROpPattern()(mod)))
    (func,) = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    return func.with_attr("global_symbol", "main")


def _run(func: tvm.tirx.PrimFunc, arrays: list[np.ndarray]) -> np.ndarray:
    target = tvm.target.Target(get_target("x86").tvm_target)
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    tensors = [tvm.runtime.tensor(a) for a in arrays]
    (lib.mod if hasattr(lib, "mod") else lib)["main"](*tensors)
    return tensors[-1].numpy()


def _inputs(func: tvm.tirx.PrimFunc) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = []
    for info in ArgInfo.from_prim_func(func):
        shape, dtype = [int(s) for s in info.shape], str(info.dtype)
        if dtype.startswith("int"):
            arrays.append(rng.integers(-128, 128, shape).astype(dtype))
        else:
            arrays.append(rng.standard_normal(shape).astype(dtype))
    return arrays


@pytest.mark.parametrize("height,channels,out_dtype", [(14, 48, None), (7, 40, None), (8, 32, "int32")])
def test_schedule_matches_the_lowered_loops(height, channels, out_dtype):
    func = _conv_primfunc(height, channels, channels, out_dtype)
    assert is_depthwise_nhwc(func)
    sch = depthwise_nhwc_schedule(tvm.IRModule({"main": func}), vector_lanes=16)
    assert sch is not None
    arrays = _inputs(func)
    expected = _run(func, [a.copy() for a in arrays])
    got = _run(sch.mod["main"], [a.copy() for a in arrays])
    if out_dtype == "int32":
        np.testing.assert_array_equal(got, expected)
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_default_schedule_picks_it_for_depthwise_only():
    target = tvm.target.Target(get_target("x86").tvm_target)
    _, kind = default_schedule(tvm.IRModule({"main": _conv_primfunc(14, 32, 32)}), target)
    assert kind == "depthwise"
    grouped = _conv_primfunc(14, 32, 8)  # 4 channels per group: not depthwise
    assert not is_depthwise_nhwc(grouped)
    assert default_schedule(tvm.IRModule({"main": grouped}), target)[1] != "depthwise"
