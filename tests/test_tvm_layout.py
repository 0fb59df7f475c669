"""tvm_layout: ConvNeXt's NCHW graph computed channels-last, with its transposes cancelled."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import tvm
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from pipeline.model import create_model, get_variant
from pipeline.stages.export import export_onnx
from pipeline.compiler.layout import to_channels_last

SHAPE = (2, 3, 32, 32)


@pytest.fixture(scope="module")
def convnext_onnx(tmp_path_factory) -> Path:
    """A real (micro) ConvNeXt: every op the pass must handle, in the exporter's order."""
    path = tmp_path_factory.mktemp("layout") / "micro.onnx"
    model = create_model("micro", num_classes=10, layer_scale_init_value=0.5).eval()
    export_onnx(model, path, SHAPE, opset=17, dynamic_batch=False)
    return path


def _imported(path: Path) -> tvm.IRModule:
    mod = from_onnx(onnx.load(str(path)))  # weights as constants, as compile embeds them
    return relax.transform.DecomposeOpsForInference()(mod)


def _ops(mod: tvm.IRModule) -> Counter:
    counts = Counter()

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            counts[expr.op.name] += 1

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return counts


def _calls(mod: tvm.IRModule, name: str) -> list[relax.Call]:
    calls = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name:
            calls.append(expr)

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return calls


def _run(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def test_convnext_outputs_unchanged(convnext_onnx):
    mod = _imported(convnext_onnx)
    x = np.random.default_rng(0).standard_normal(SHAPE).astype("float32")
    expected = _run(mod, x)
    np.testing.assert_allclose(_run(to_channels_last(mod), x), expected, rtol=1e-4, atol=1e-4)


def test_convnext_keeps_no_activation_transposes(convnext_onnx):
    before = _imported(convnext_onnx)
    after = to_channels_last(before)
    # Two per block (around LayerNorm + MLP) before; after, only the input image's
    # NCHW -> NHWC (constants' permutes fold away in compile's FoldConstant).
    activation_permutes = [
        call for call in _calls(after, "relax.permute_dims")
        # activations are the tensors with the batch dimension (2) in front
        if len(call.args[0].ty.shape) >= 4 and int(call.args[0].ty.shape[0]) == SHAPE[0]
    ]
    assert len(_calls(before, "relax.permute_dims")) >= 2 * 5
    assert all(tuple(int(a) for a in call.attrs.axes) in ((0, 2, 3, 1), (0, 1, 3, 2, 4, 5)) for call in activation_permutes)
    assert sum(1 for c in activation_permutes if tuple(int(a) for a in c.attrs.axes) == (0, 2, 3, 1)) == 1
    # Channel reductions of the channels-first LayerNorms now run over the last axis.
    for mean in _calls(after, "relax.mean"):
        assert [int(a) for a in mean.attrs.axis] in ([3], [1, 2])


def test_convolutions_become_nhwc_and_patch_gemms(convnext_onnx):
    after = to_channels_last(_imported(convnext_onnx))
    convs = _calls(after, "relax.nn.conv2d")
    # The stem and the three downsampling convolutions (kernel == stride) are GEMMs of
    # their patches; what stays a convolution is the depthwise 7x7 one per block.
    assert len(convs) == sum(get_variant("micro").depths)
    for conv in convs:
        assert (conv.attrs.data_layout, conv.attrs.kernel_layout) == ("NHWC", "HWOI")
        assert int(conv.attrs.groups) > 1
    patch_gemms = [m for m in _calls(after, "relax.matmul") if str(getattr(m.args[1], "name", "")).startswith("patch_weight")]
    assert len(patch_gemms) == 4
    assert all(len(m.ty.shape) == 4 for m in patch_gemms)  # NHWC out: the bias add fuses into it


def test_unknown_consumer_reads_the_nchw_value():
    """An op the pass does not convert (max pooling, NCHW) gets the NCHW tensor back."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 8, 8), "float32"))
    weight = relax.const(np.random.default_rng(1).standard_normal((4, 4, 3, 3)).astype("float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, weight, padding=[1, 1, 1, 1]))
            y = bb.emit(relax.op.add(y, relax.const(np.ones((4, 1, 1), "float32"))))
            pooled = bb.emit(relax.op.nn.max_pool2d(y, pool_size=[2, 2], strides=[2, 2]))
            out = bb.emit_output(relax.op.mean(pooled, axis=[1], keepdims=True))
        bb.emit_func_output(out)
    mod = bb.get()
    after = to_channels_last(mod)
    assert _calls(after, "relax.nn.conv2d")[0].attrs.data_layout == "NHWC"
    assert _calls(after, "relax.nn.max_pool2d")[0].attrs.layout == "NCHW"
    data = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype("float32")
    np.testing.assert_allclose(_run(after, data), _run(mod, data), rtol=1e-5, atol=1e-5)


def test_module_given_is_not_changed(convnext_onnx):
    mod = _imported(convnext_onnx)
    script = mod.script()
    to_channels_last(mod)
    assert mod.script() == script
