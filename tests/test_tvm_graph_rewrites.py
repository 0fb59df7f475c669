"""graph_rewrites: integer powers and divisions by constants as multiplications, on real builds."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from pipeline.compiler.graph_rewrites import integer_power_to_multiply


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


def test_division_by_a_constant_becomes_a_multiplication_within_one_rounding():
    from pipeline.compiler.graph_rewrites import divide_by_constant_to_multiply

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((64,), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.divide(x, relax.const(np.float32(1.4142135381698608))))
        bb.emit_func_output(out)
    mod = bb.get()
    rewritten = divide_by_constant_to_multiply(mod)
    assert _ops(rewritten) == ["relax.multiply"] and _ops(mod) == ["relax.divide"]
    values = np.random.default_rng(0).standard_normal(64).astype("float32") * 10
    np.testing.assert_allclose(_run(rewritten, values), _run(mod, values), rtol=2.5e-7, atol=0)


def test_division_by_a_tensor_or_by_zero_stays_a_division():
    from pipeline.compiler.graph_rewrites import divide_by_constant_to_multiply

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4,), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.divide(x, x))
            out = bb.emit_output(relax.op.divide(a, relax.const(np.float32(0.0))))
        bb.emit_func_output(out)
    assert _ops(divide_by_constant_to_multiply(bb.get())) == ["relax.divide", "relax.divide"]


@pytest.mark.parametrize("weights", ["fresh", "seeded"])
def test_channels_first_layer_norms_in_parts_become_layer_norm_ops_with_the_same_outputs(tmp_path, weights):
    """The micro ConvNeXt's stem and downsampling LayerNorms, exported in parts, once
    channels-last: each becomes one layer_norm, and the outputs stay the same; with a fresh
    model's unit gamma and zero beta (which onnxsim drops) and with weights like trained ones."""
    import onnx
    import onnxsim
    from tvm.relax.frontend.onnx import from_onnx

    from pipeline.compiler.graph_rewrites import layer_norm_from_parts, power_to_multiply
    from pipeline.compiler.layout import to_channels_last
    from pipeline.model import create_model
    from pipeline.stages.export import export_onnx

    shape = (2, 3, 32, 32)
    path = tmp_path / "micro.onnx"
    torch_model = create_model("micro", num_classes=10).eval()
    if weights == "seeded":
        import torch

        from pipeline.seeded_weights import seeded_state

        state = seeded_state(((n, tuple(t.shape)) for n, t in torch_model.state_dict().items()), seed=0)
        torch_model.load_state_dict({n: torch.from_numpy(v) for n, v in state.items()})
    export_onnx(torch_model, path, shape, opset=17, dynamic_batch=False)
    model, ok = onnxsim.simplify(onnx.load(str(path)), check_n=0)
    # As compile's phases have it: x ** 2 as x * x (simplify), then channels-last.
    before = to_channels_last(power_to_multiply(relax.transform.DecomposeOpsForInference()(from_onnx(model))))
    after = layer_norm_from_parts(before)

    layer_norms = lambda m: _ops(m).count("relax.nn.layer_norm")  # noqa: E731
    means = lambda m: _ops(m).count("relax.mean")  # noqa: E731
    assert means(before) >= 2 * 2  # two means per LayerNorm in parts: the stem's and the downsamplings'
    assert layer_norms(after) - layer_norms(before) == means(before) // 2
    assert means(after) <= 1  # only the global average pool before the head is left
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    np.testing.assert_allclose(_run(after, x), _run(before, x), rtol=1e-4, atol=1e-4)
