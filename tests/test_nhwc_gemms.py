"""nhwc_gemms: ConvNeXt's pointwise GEMMs on the NHWC maps, without the flatten around them."""

from __future__ import annotations

import numpy as np
import pytest

import tvm
from tvm import relax

from pipeline.compiler.layout import to_channels_last
from pipeline.compiler.nhwc_gemms import gemms_on_maps
from test_tvm_layout import SHAPE, _calls, _imported, _run, convnext_onnx  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def simplified_onnx(convnext_onnx, tmp_path_factory):  # noqa: F811
    """The micro ConvNeXt as compile sees it: simplified by onnxsim, whose Gemm is 2-D."""
    import onnx
    import onnxsim

    model, ok = onnxsim.simplify(onnx.load(str(convnext_onnx)), check_n=0)
    assert ok
    path = tmp_path_factory.mktemp("nhwc-gemms") / "micro.sim.onnx"
    onnx.save(model, str(path))
    return path


def test_convnext_outputs_unchanged(simplified_onnx):
    channels_last = to_channels_last(_imported(simplified_onnx))
    x = np.random.default_rng(0).standard_normal(SHAPE).astype("float32")
    np.testing.assert_allclose(_run(gemms_on_maps(channels_last), x), _run(channels_last, x), rtol=1e-5, atol=1e-5)


def test_convnext_gemms_read_and_write_maps_with_no_flatten_left(simplified_onnx):
    before = to_channels_last(_imported(simplified_onnx))
    after = gemms_on_maps(before)
    def gemms_on_rows(mod):  # GEMMs whose activations were flattened to (N*H*W, C) rows
        return [g for g in _calls(mod, "relax.matmul")
                if len(g.args[0].ty.shape) == 2 and int(g.args[0].ty.shape[0]) > SHAPE[0]]

    assert gemms_on_rows(before)  # the exporter's Gemm flattens each block's map
    assert not gemms_on_rows(after)
    gemms = _calls(after, "relax.matmul")
    pointwise = [g for g in gemms if len(g.args[0].ty.shape) == 4]
    assert len(pointwise) >= 2 * 2  # two GEMMs per block, at least two blocks in the micro model


def test_a_flattened_value_read_elsewhere_is_materialized():
    """A flattened map also read by an op the pass does not convert keeps its 2-D value."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 4, 8), "float32"))
    w = relax.Var("w", relax.TensorType((8, 16), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            flat = bb.emit(relax.op.reshape(x, (16, 8)))
            gemm = bb.emit(relax.op.matmul(flat, w))
            other = bb.emit(relax.op.sum(flat, axis=[1]))  # not converted: reads the 2-D value
            out = bb.emit_output(relax.Tuple([gemm, other]))
        bb.emit_func_output(out)
    mod = bb.get()
    rng = np.random.default_rng(0)
    args = [rng.standard_normal((1, 4, 4, 8)).astype("float32"), rng.standard_normal((8, 16)).astype("float32")]

    def run(m):
        vm = relax.VirtualMachine(tvm.compile(m, target="llvm"), tvm.cpu())
        return [t.numpy() for t in vm["main"](*[tvm.runtime.tensor(a) for a in args])]

    for got, expected in zip(run(gemms_on_maps(mod)), run(mod)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
