"""pipeline/compiler/cast_fusion.py: the cast of a depthwise convolution's input joins the
convolution's fused kernel, and the model computes the same (built for the CPU here; the
pass runs in GPU compiles, where the fp16 residual stream needs it)."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import relax as R

from pipeline.compiler import cast_fusion


def _model(shared_cast: bool = False) -> tvm.IRModule:
    """x (float32, NHWC) -> float16 -> 7x7 depthwise conv (float32 out) + bias -> + x;
    with ``shared_cast`` the float16 copy also feeds a second kernel."""
    builder = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, 8, 8, 16), "float32"))
    w = relax.Var("w", R.Tensor((7, 7, 16, 1), "float16"))
    b = relax.Var("b", R.Tensor((1, 1, 1, 16), "float32"))
    with builder.function("main", [x, w, b]):
        with builder.dataflow():
            half = builder.emit(relax.op.astype(x, "float16"))
            conv = builder.emit(relax.op.nn.conv2d(half, w, padding=3, groups=16, data_layout="NHWC",
                                                   kernel_layout="HWOI", out_dtype="float32"))
            out = builder.emit(relax.op.add(relax.op.add(conv, b), x))
            if shared_cast:  # a second convolution of the same float16 copy
                out = builder.emit(relax.op.add(out, relax.op.nn.conv2d(
                    half, w, padding=3, groups=16, data_layout="NHWC", kernel_layout="HWOI", out_dtype="float32")))
            result = builder.emit_output(out)
        builder.emit_func_output(result)
    return builder.get()


def _fused(mod: tvm.IRModule, with_pass: bool) -> tvm.IRModule:
    passes = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FuseOps()]
    passes += [cast_fusion.fuse_casts_into_depthwise_pass()] if with_pass else []
    return tvm.transform.Sequential([*passes, relax.transform.FuseTIR()])(mod)


def _kernel_calls(mod: tvm.IRModule) -> list[str]:
    """The kernels ``main`` calls, in order."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    return [binding.value.args[0].name_hint for block in mod["main"].body.blocks for binding in block.bindings
            if isinstance(binding.value, relax.Call) and binding.value.op == call_tir]


def _run(mod: tvm.IRModule, *args: np.ndarray) -> np.ndarray:
    executable = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return vm["main"](*(tvm.runtime.tensor(a) for a in args)).numpy()


def test_the_cast_joins_the_depthwise_kernel_and_the_results_are_bitwise_equal():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 8, 8, 16)).astype("float32")
    w = rng.standard_normal((7, 7, 16, 1)).astype("float16")
    b = rng.standard_normal((1, 1, 1, 16)).astype("float32")
    before, after = _fused(_model(), False), _fused(_model(), True)
    assert [k for k in _kernel_calls(before) if k.startswith("cast")], _kernel_calls(before)
    calls = _kernel_calls(after)
    assert len(calls) == len(_kernel_calls(before)) - 1
    assert not [k for k in calls if k.startswith("cast")] and any(k.startswith("fused_cast") and "conv2d" in k for k in calls)
    np.testing.assert_array_equal(_run(after, x, w, b), _run(before, x, w, b))


def test_a_cast_with_other_users_stays_a_kernel_of_its_own():
    mod = _fused(_model(shared_cast=True), True)
    assert _kernel_calls(mod) == _kernel_calls(_fused(_model(shared_cast=True), False))


def test_a_module_without_such_a_cast_is_returned_as_it_is():
    builder = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, 8, 8, 16), "float32"))
    w = relax.Var("w", R.Tensor((7, 7, 16, 1), "float32"))
    with builder.function("main", [x, w]):
        with builder.dataflow():
            conv = builder.emit_output(builder.emit(relax.op.nn.conv2d(
                x, w, padding=3, groups=16, data_layout="NHWC", kernel_layout="HWOI")))
        builder.emit_func_output(conv)
    grouped = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                        relax.transform.FuseOps()])(builder.get())
    assert cast_fusion.fuse_casts_into_depthwise(grouped) is grouped
