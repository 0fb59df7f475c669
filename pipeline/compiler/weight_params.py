"""Weights passed in at run time (``--params separate``) in the dtype and layout the kernels
read them in: what the graph would otherwise cast, permute and reshape on every call is
done once, to the arrays, when compile saves them. Embedded weights need none of this:
FoldConstant folds those ops on constants.
"""

from __future__ import annotations

import json

import numpy as np
import tvm
from tvm import relax

from pipeline.compiler.relax_graph import Bindings


def _weight_params(func: relax.Function) -> list[relax.Var]:
    # The ONNX importer marks how many leading parameters are real inputs; the rest are
    # weights (keep_params_in_input=True).
    num_input = func.attrs.get("num_input") if func.attrs is not None else None
    return list(func.params[int(num_input):]) if num_input is not None else []


def _cast_dtype(expr: relax.Expr) -> str | None:
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.astype":
        return str(expr.attrs.dtype)
    return None


@relax.expr_functor.mutator
class _ReadCastParams(relax.PyExprMutator):
    """Replaces each ``lv = astype(weight)`` binding by the weight parameter in its new dtype
    (and drops the bindings in ``dropped``: the earlier links of a lifted chain)."""

    def __init__(self, mod: tvm.IRModule, cast_to_param: dict[relax.Var, relax.Var],
                 dropped: frozenset = frozenset()):
        super().__init__(mod)
        self.cast_to_param = cast_to_param
        self.dropped = dropped

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        param = self.cast_to_param.get(binding.var)
        if param is not None:
            self.set_var_remap(binding.var, param)
        elif binding.var not in self.dropped:
            super().visit_var_binding_(binding)


def cast_weights_once(mod: tvm.IRModule) -> tvm.IRModule:
    """Weight parameters that ``main`` only ever casts (to one dtype) become parameters of
    that dtype, so that the cast happens once when the weights are saved, not per call.

    FP16 artifacts with separate weights cast every float32 weight to float16 on each call
    (25 cast kernels for the micro model) and stored twice the bytes; with this pass the
    weights file holds float16 and the kernels read it directly. Embedded weights need no
    such pass: FoldConstant folds their casts.
    """
    func = mod["main"]
    weights = _weight_params(func)
    if not weights:
        return mod
    bindings = Bindings(func)
    readers, values = bindings.readers, bindings.value
    new_params = {}
    cast_to_param = {}
    for param in weights:
        casts = readers.get(param, [])
        dtypes = {_cast_dtype(values[var]) if var in values else None for var in casts}
        if not casts or len(dtypes) != 1 or None in dtypes:
            continue
        new = relax.Var(param.name, relax.TensorType(param.ty.shape, dtypes.pop()))
        new_params[param] = new
        cast_to_param.update((var, new) for var in casts)
    if not new_params:
        return mod
    body = _ReadCastParams(mod, cast_to_param).visit_expr(func.body)
    params = [new_params.get(param, param) for param in func.params]
    result = mod.clone()  # a pass must not change the module it is given
    result.update_func(
        result.get_global_var("main"),
        relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs, func.span),
    )
    return result


def cast_weight_params_once() -> tvm.transform.Pass:
    """``cast_weights_once`` as a module pass, for the precision phase."""

    @tvm.transform.module_pass(opt_level=0, name="CastWeightParamsOnce")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return cast_weights_once(mod)

    return _pass


# ---------------------------------------------------------------------------
# Layouts

# Attribute of ``main`` naming, per weight parameter, the layout changes made to it:
# [[op, argument], ...] with op "permute_dims" (axes), "reshape" (shape) or "astype" (dtype).
PARAM_TRANSFORMS_ATTR = "pipeline.param_transforms"


def param_transforms(func: relax.Function) -> dict[str, list]:
    """``func``'s PARAM_TRANSFORMS_ATTR: weight name -> its layout changes ({} if none)."""
    attrs = func.attrs
    if attrs is None or PARAM_TRANSFORMS_ATTR not in attrs:
        return {}
    return json.loads(str(attrs[PARAM_TRANSFORMS_ATTR]))


def _layout_change(expr: relax.Expr, source: relax.Var) -> list | None:
    """[op, argument] when ``expr`` is a layout change or cast of ``source`` alone."""
    if not (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.args
            and expr.args[0].same_as(source)):
        return None
    name = expr.op.name
    if name == "relax.permute_dims" and expr.attrs.axes is not None:
        return ["permute_dims", [int(a) for a in expr.attrs.axes]]
    if name == "relax.reshape":
        shape = expr.ty.shape
        if all(isinstance(d, tvm.tirx.IntImm) for d in shape.values):
            return ["reshape", [int(d) for d in shape.values]]
    if name == "relax.astype":
        return ["astype", str(expr.attrs.dtype)]
    return None


def lift_weight_layouts(mod: tvm.IRModule) -> tvm.IRModule:
    """Weight parameters that ``main`` reads only through a chain of permutes, reshapes and
    casts become parameters in the chain's final layout; the chain is recorded in main's
    PARAM_TRANSFORMS_ATTR, and compile applies it to the arrays when it saves them.

    Embedded weights get this from FoldConstant; separate ones otherwise ran their layout
    changes on every call: for ConvNeXt-T on a GPU, a transpose of each depthwise kernel
    to HWOI and a reshape of each bias, 40 kernel launches per inference.
    """
    func = mod["main"]
    weights = _weight_params(func)
    if not weights:
        return mod
    bindings = Bindings(func)
    readers, values = bindings.readers, bindings.value
    transforms = param_transforms(func)
    new_params: dict[relax.Var, relax.Var] = {}
    chain_end_to_param: dict[relax.Var, relax.Var] = {}
    links: set[relax.Var] = set()
    for param in weights:
        steps, chain, current = [], [], param
        while len(readers.get(current, [])) == 1 and readers[current][0] is not None:
            reader = readers[current][0]
            step = _layout_change(values.get(reader), current)
            if step is None:
                break
            steps.append(step)
            chain.append(reader)
            current = reader
        if not steps:
            continue
        new = relax.Var(param.name, relax.TensorType(current.ty.shape, current.ty.dtype))
        new_params[param] = new
        chain_end_to_param[current] = new
        links.update(chain[:-1])
        transforms[param.name] = [*transforms.get(param.name, []), *steps]
    if not new_params:
        return mod
    body = _ReadCastParams(mod, chain_end_to_param, frozenset(links)).visit_expr(func.body)
    params = [new_params.get(param, param) for param in func.params]
    result = mod.clone()
    lifted = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs, func.span)
    result.update_func(result.get_global_var("main"), lifted.with_attr(PARAM_TRANSFORMS_ATTR, json.dumps(transforms)))
    return relax.transform.DeadCodeElimination()(result)


def lift_weight_layouts_pass() -> tvm.transform.Pass:
    """``lift_weight_layouts`` as a module pass."""

    @tvm.transform.module_pass(opt_level=0, name="LiftWeightLayouts")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return lift_weight_layouts(mod)

    return _pass


def apply_param_transforms(value: np.ndarray, steps: list) -> np.ndarray:
    """A weight array in the layout ``lift_weight_layouts`` gave its parameter."""
    for op, argument in steps:
        if op == "permute_dims":
            value = np.transpose(value, argument)
        elif op == "reshape":
            value = value.reshape(argument)
        elif op == "astype":
            value = value.astype(argument)
        else:
            raise ValueError(f"unknown weight transform {op!r}")
    return np.ascontiguousarray(value)


def saved_weights(names: list[str], values: list, dtypes: list[str], transforms: dict[str, list]) -> dict[str, np.ndarray]:
    """The weights as compile saves them with ``--params separate``: each (a TVM tensor) in
    the layout its parameter was given (``transforms``) and the dtype the kernels read."""
    return {
        name: apply_param_transforms(value.numpy(), transforms.get(name, [])).astype(dtype, copy=False)
        for name, value, dtype in zip(names, values, dtypes)
    }
