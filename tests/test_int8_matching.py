"""Which dequantize -> conv2d/matmul (+ bias) (-> quantize) chain pipeline/compiler/int8.py
lowers, on hand-built Relax functions: the longest chain whose steps hold, one step shorter
where a value has another reader or a check fails, and the reason for a float conv2d/matmul."""

import numpy as np
import pytest
from tvm import relax

from pipeline.compiler.int8 import Int8Report, _find_matches, compute_ops, lower_qdq_to_integer

CHANNELS = 8


def _const(values, dtype: str) -> relax.Expr:
    return relax.const(np.asarray(values, dtype), dtype)


def conv_chain(*, bias_first: bool = False, conv_read_again: bool = False, add_read_again: bool = False,
               quantize_scale_constant: bool = True, float_input: bool = False) -> relax.Function:
    """xq -> dequantize -> conv2d(dequantized int8 weight) -> + bias -> quantize -> dequantize,
    each binding named after its step; the function's result is a tuple of what is read."""
    rng = np.random.default_rng(0)
    x = relax.Var("xq", relax.TensorType((1, 4, 8, 8), "float32" if float_input else "int8"))
    sy = relax.Var("sy", relax.TensorType((), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, sy]):
        with bb.dataflow():
            data = x
            if not float_input:
                data = bb.emit(relax.op.dequantize(x, _const(0.05, "float32"), _const(3, "int8")), "x")
            weight = bb.emit(relax.op.dequantize(
                _const(rng.integers(-128, 128, (CHANNELS, 4, 3, 3)), "int8"),
                _const(np.linspace(0.01, 0.02, CHANNELS), "float32"), _const(np.zeros(CHANNELS), "int8"), axis=0,
            ), "w")
            conv = bb.emit(relax.op.nn.conv2d(data, weight, padding=[1, 1, 1, 1]), "conv")
            bias = bb.emit(relax.op.reshape(_const(rng.random(CHANNELS), "float32"), (1, CHANNELS, 1, 1)), "bias")
            added = bb.emit(relax.op.add(bias, conv) if bias_first else relax.op.add(conv, bias), "add")
            scale = _const(0.1, "float32") if quantize_scale_constant else sy
            quantized = bb.emit(relax.op.quantize(added, scale, _const(0, "int8")), "quantize")
            outputs = [bb.emit(relax.op.dequantize(quantized, scale, _const(0, "int8")), "y")]
            if conv_read_again:
                outputs.append(bb.emit(relax.op.negative(conv), "conv_again"))
            if add_read_again:
                outputs.append(bb.emit(relax.op.negative(added), "add_again"))
            result = bb.emit_output(relax.Tuple(outputs))
        bb.emit_func_output(result)
    return bb.get()["main"]


def chain_ends(func: relax.Function) -> tuple[dict[str, tuple[bool, bool]], list[str]]:
    """For each lowered chain, the name of its last binding -> (bias taken, output requantized);
    and the reasons of the conv2d/matmuls left float."""
    report = Int8Report()
    matches = _find_matches(func, report)
    ends = {str(var.name): (m.bias_int is not None or m.bias_float is not None, m.sy is not None)
            for var, m in matches.items()}
    return ends, report.float_kept


def test_the_whole_chain_is_lowered_when_every_step_holds():
    assert chain_ends(conv_chain()) == ({"quantize": (True, True)}, [])


def test_a_conv_read_elsewhere_too_ends_its_chain_at_the_conv():
    # The float conv value must stay for its other reader: no bias, no quantize.
    assert chain_ends(conv_chain(conv_read_again=True)) == ({"conv": (False, False)}, [])


def test_a_bias_add_read_elsewhere_too_ends_the_chain_at_the_add():
    assert chain_ends(conv_chain(add_read_again=True)) == ({"add": (True, False)}, [])


def test_a_quantize_with_a_non_constant_scale_ends_the_chain_at_the_add():
    assert chain_ends(conv_chain(quantize_scale_constant=False)) == ({"add": (True, False)}, [])


def test_an_add_with_the_bias_first_is_the_same_chain():
    assert chain_ends(conv_chain(bias_first=True)) == ({"quantize": (True, True)}, [])


def test_a_float_conv_is_kept_with_its_reason():
    assert chain_ends(conv_chain(float_input=True)) == ({}, ["input is float"])


@pytest.mark.parametrize("variant", [
    {}, {"conv_read_again": True}, {"add_read_again": True}, {"quantize_scale_constant": False},
    {"bias_first": True},
])
def test_each_chain_lowers_to_int8_compute_that_equals_the_float_graph(variant):
    """The integer rewrite of each chain computes what the float QDQ graph does."""
    import tvm

    func = conv_chain(**variant)
    mod = tvm.IRModule({"main": func})
    lowered = lower_qdq_to_integer(mod)
    assert [op["inputs"] for op in compute_ops(lowered)] == [["int8", "int8"]]

    def run(module):
        executable = relax.build(module, target="llvm")
        vm = relax.VirtualMachine(executable, tvm.cpu())
        xq = np.random.default_rng(1).integers(-128, 128, (1, 4, 8, 8)).astype("int8")
        out = vm["main"](tvm.runtime.tensor(xq), tvm.runtime.tensor(np.array(0.1, "float32")))
        return [o.numpy() for o in out]

    for want, got in zip(run(mod), run(lowered)):
        # The integer accumulator is exact; float rounding may move a requantized value by one step.
        np.testing.assert_allclose(got, want, atol=0.1 + 1e-4, rtol=0)
