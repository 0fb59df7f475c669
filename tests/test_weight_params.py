"""weight_params: separate weights saved in the dtype and layout the kernels read them in."""

from __future__ import annotations

import json

import numpy as np
import tvm
from tvm import relax

from pipeline.compiler.weight_params import cast_weight_params_once
from test_tvm_graph_rewrites import _ops, _powers_module, _run


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


def test_lifted_weight_layouts_give_the_same_outputs_with_the_saved_arrays(tmp_path):
    """The micro ConvNeXt with separate weights, channels-last: every depthwise kernel's
    HWOI transpose and bias reshape moves from the graph to the saved arrays."""
    import onnx

    from pipeline.compiler.weight_params import PARAM_TRANSFORMS_ATTR, apply_param_transforms, lift_weight_layouts
    from pipeline.compiler.layout import to_channels_last
    from pipeline.compiler.onnx_import import import_relax
    from pipeline.model import create_model
    from pipeline.stages.export import export_onnx

    shape = (1, 3, 32, 32)
    path = tmp_path / "micro.onnx"
    export_onnx(create_model("micro", num_classes=10).eval(), path, shape, opset=17, dynamic_batch=False)
    mod, names, values = import_relax(onnx.load(str(path)), path, "input", shape, "float32")
    before = relax.transform.DecomposeOpsForInference()(mod)
    before = to_channels_last(before)
    after = lift_weight_layouts(before)

    transforms = json.loads(str(after["main"].attrs[PARAM_TRANSFORMS_ATTR]))
    assert any(step[0] == "permute_dims" for steps in transforms.values() for step in steps)
    permutes = lambda m: sum(op == "relax.permute_dims" for op in _ops(m))  # noqa: E731
    assert permutes(after) < permutes(before) - 2  # the depthwise kernels' transposes are gone

    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    weights = [v.numpy() for v in values]
    lifted = [apply_param_transforms(w, transforms.get(n, [])) for n, w in zip(names, weights)]
    np.testing.assert_allclose(_run(after, x, *lifted), _run(before, x, *weights), rtol=1e-5, atol=1e-5)
