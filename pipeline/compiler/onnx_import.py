"""ONNX -> Relax: the graph input resolved to a static shape, the model imported with its
weights as parameters of "main", and (embedded weights) bound back as constants."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

import tvm
from tvm import relax

from pipeline.errors import PipelineError, first_line


def resolve_input(
    model: onnx.ModelProto, input_name: str | None, input_shape: tuple[int, ...] | None
) -> tuple[str, tuple[int, ...], str]:
    """Pick the graph input and fix its shape: (name, static shape, numpy dtype name)."""
    initializers = {init.name for init in model.graph.initializer}
    # Old exporters list weights among the graph inputs too; those are not real inputs.
    inputs = [i for i in model.graph.input if i.name not in initializers]
    names = [i.name for i in inputs]
    if input_name is None:
        if len(inputs) != 1:
            raise PipelineError(
                f"the ONNX model has {len(inputs)} inputs ({', '.join(names)}); "
                f"name one with input_name"
            )
        graph_input = inputs[0]
    else:
        matches = [i for i in inputs if i.name == input_name]
        if not matches:
            raise PipelineError(
                f"the ONNX model has no input '{input_name}'; its inputs are: {', '.join(names)}"
            )
        graph_input = matches[0]

    tensor_type = graph_input.type.tensor_type
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
    # A dim is either a positive int (static) or a symbol such as "batch" (dynamic).
    dims: list[int | str] = [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
        for d in tensor_type.shape.dim
    ]
    model_shape = "(" + ", ".join(str(d) for d in dims) + ")"

    if input_shape is None:
        dynamic = [d for d in dims if isinstance(d, str)]
        if dynamic:
            raise PipelineError(
                f"input '{graph_input.name}' has dynamic dims {model_shape}; "
                f"pass a static input_shape, e.g. batch 1"
            )
        return graph_input.name, tuple(int(d) for d in dims), dtype

    shape = tuple(int(d) for d in input_shape)
    fits = len(shape) == len(dims) and all(
        isinstance(d, str) or d == s for d, s in zip(dims, shape)
    )
    if not fits or any(s <= 0 for s in shape):
        raise PipelineError(
            f"input_shape {shape} does not match input '{graph_input.name}' of the ONNX model, "
            f"which is {model_shape}"
        )
    return graph_input.name, shape, dtype


def import_relax(
    model: onnx.ModelProto, onnx_path: Path, name: str, shape: tuple[int, ...], dtype: str
) -> tuple[tvm.IRModule, list[str], list[tvm.runtime.Tensor]]:
    """ONNX -> Relax with weights as function inputs: (module, param names, param values)."""
    # Imported here: the frontend pulls in the onnx converter tables only when compiling.
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.onnx import from_onnx

    try:
        # keep_params_in_input=True makes every initializer a parameter of "main" after the
        # real input (its count is in the "num_input" attribute) and puts the values in the
        # function's "params" attribute; detach_params takes them out again.
        mod = from_onnx(
            model, shape_dict={name: list(shape)}, dtype_dict={name: dtype},
            keep_params_in_input=True,
        )
    except tvm.error.OpNotImplemented as exc:
        # TVM 0.27: the message reads "The following operators are not supported for
        # frontend ONNX: Celu, ..." and so already names the operators.
        raise PipelineError(
            f"{onnx_path} uses operators TVM {tvm.__version__} cannot import: "
            f"{str(exc).split(':', 1)[-1].strip().splitlines()[0]}"
        ) from None
    except Exception as exc:  # the importer raises bare ValueError/TVMError on odd graphs
        raise PipelineError(f"TVM could not import {onnx_path}: {first_line(exc)}") from exc
    mod, params = detach_params(mod)
    main = mod["main"]
    num_input = int(main.attrs["num_input"])
    # The frontend strips a leading "onnx::" from weight names.
    param_names = [str(var.name) for var in main.params[num_input:]]
    return mod, param_names, list(params.get("main", []))


def output_spec(mod: tvm.IRModule) -> dict[str, Any]:
    ret = mod["main"].ret_ty
    if not isinstance(ret, relax.TensorType) or ret.shape is None:
        raise PipelineError(f"the model must have exactly one tensor output; TVM sees {ret}")
    return {"shape": [int(d) for d in ret.shape], "dtype": str(ret.dtype)}


def bind_weights(mod: tvm.IRModule, values: list) -> tvm.IRModule:
    """The weight parameters of "main" replaced by their values as constants, so that
    FoldConstant pre-computes their transposes and the executable carries them."""
    main = mod["main"]
    num_input = int(main.attrs["num_input"])
    return relax.transform.BindParams("main", dict(zip(main.params[num_input:], values)))(mod)
