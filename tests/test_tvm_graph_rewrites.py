"""tvm_graph_rewrites: integer powers as multiplications, weights cast once, on real builds."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from pipeline.compiler.graph_rewrites import cast_weight_params_once, integer_power_to_multiply


def _ops(mod: tvm.IRModule) -> list[str]:
    names = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            if isinstance(binding.value, relax.Call) and isinstance(binding.value.op, tvm.ir.Op):
                names.append(binding.value.op.name)
    return names


def _run(mod: tvm.IRModule, *args: np.ndarray) -> np.ndarray:
    executable = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return vm["main"](*(tvm.runtime.tensor(a) for a in args)).numpy()


def _powers_module(exponents: list[float]) -> tvm.IRModule:
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 8), "float32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            total = None
            for exponent in exponents:
                term = builder.emit(relax.op.power(x, relax.const(exponent, "float32")))
                total = term if total is None else builder.emit(relax.op.add(total, term))
            out = builder.emit_output(total)
        builder.emit_func_output(out)
    return builder.get()


def test_small_integer_powers_become_multiplications_exact_for_negative_bases():
    mod = _powers_module([2.0, 3.0, 4.0])
    rewritten = integer_power_to_multiply()(mod)
    assert "relax.power" not in _ops(rewritten)
    assert _ops(rewritten).count("relax.multiply") >= 3
    x = np.linspace(-3, 3, 16, dtype=np.float32).reshape(2, 8)
    np.testing.assert_allclose(_run(rewritten, x), x**2 + x**3 + x**4, rtol=1e-6)


@pytest.mark.parametrize("exponent", [0.5, 2.5, 7.0, -2.0])
def test_other_exponents_stay_a_power(exponent):
    rewritten = integer_power_to_multiply()(_powers_module([exponent]))
    assert _ops(rewritten) == ["relax.power"]


def _cast_weight_module() -> tvm.IRModule:
    """main(x, w, b): matmul(cast16(x), cast16(w)) + b, with w and b weights (num_input=1)."""
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    w = relax.Var("w", relax.TensorType((8, 16), "float32"))
    b = relax.Var("b", relax.TensorType((16,), "float32"))
    with builder.function("main", [x, w, b], attrs={"num_input": 1}):
        with builder.dataflow():
            x16 = builder.emit(relax.op.astype(x, "float16"))
            w16 = builder.emit(relax.op.astype(w, "float16"))
            y = builder.emit(relax.op.matmul(x16, w16, out_dtype="float32"))
            out = builder.emit_output(builder.emit(relax.op.add(y, b)))
        builder.emit_func_output(out)
    return builder.get()


def test_weights_that_are_only_cast_become_parameters_of_the_cast_dtype():
    mod = _cast_weight_module()
    rewritten = cast_weight_params_once()(mod)
    params = {str(p.name): str(p.ty.dtype) for p in rewritten["main"].params}
    # The input keeps its dtype (it is not a weight); b is read as float32, so it stays.
    assert params == {"x": "float32", "w": "float16", "b": "float32"}
    assert _ops(rewritten).count("relax.astype") == 1

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8), dtype=np.float32)
    w = rng.standard_normal((8, 16), dtype=np.float32)
    b = rng.standard_normal(16, dtype=np.float32)
    np.testing.assert_array_equal(_run(rewritten, x, w.astype(np.float16), b), _run(mod, x, w, b))


def test_a_module_without_weight_parameters_is_unchanged():
    mod = _powers_module([2.0])
    assert cast_weight_params_once()(mod).script() == mod.script()
