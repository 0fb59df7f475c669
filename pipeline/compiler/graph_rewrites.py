"""Graph rewrites that make the imported Relax graph numerically safe on every target.

``x ** 2`` in ConvNeXt's channels-first LayerNorm arrives from ONNX as ``Pow(x, 2.0)``,
which legalizes to ``pow(x, 2.0f)`` in the generated code. A C ``pow`` is defined for
negative bases with integer exponents, but fast-math lowerings compute it as
``exp2(y * log2(x))``: NaN for every x < 0, which is half of a centred tensor (every
CUDA output of ConvNeXt was NaN under nvcc's ``--use_fast_math``). Small integer
exponents become multiplications instead: exact for any sign, and a multiply is
cheaper than a pow on every target.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from pipeline.compiler.layout import static_shape

# Exponents written out as multiplications; a larger one would be a longer chain than pow.
_MAX_EXPONENT = 4


def _integer_exponent(constant: relax.Expr) -> int | None:
    """The exponent of a scalar (or all-equal) constant when it is an integer 1..4."""
    # TVM 0.27: relax.Constant is gone; a constant is a tvm.ir.expr.GenericConst whose
    # .value is a runtime tensor.
    values = constant.value.numpy()
    if values.size == 0 or values.dtype.kind not in "fiu":
        return None
    first = values.flat[0]
    if not np.all(values == first) or first != np.round(first) or not 1 <= first <= _MAX_EXPONENT:
        return None
    return int(first)


def _power_as_multiplies(base: relax.Expr, exponent: int) -> relax.Expr:
    # Square-and-multiply keeps x**4 at two multiplications.
    if exponent == 1:
        return base
    half = _power_as_multiplies(base, exponent // 2)
    square = relax.op.multiply(half, half)
    return relax.op.multiply(square, base) if exponent % 2 else square


def _output_shape_kept(call: relax.Call, base: relax.Expr) -> bool:
    # pow(x, c) broadcasts x against c; x * x does not, so only rewrite when c adds no axes.
    shape = static_shape(call)
    return shape is not None and shape == static_shape(base) and call.ty.dtype == base.ty.dtype


def power_to_multiply(mod: tvm.IRModule) -> tvm.IRModule:
    """``power(x, c)`` with a constant integer c in 1..4 -> x * x * ... (see module doc)."""
    base, exponent = wildcard(), is_const()
    pattern = is_op("relax.power")(base, exponent)

    def rewrite(call: relax.Call, matches) -> relax.Expr:
        power = _integer_exponent(matches[exponent])
        if power is None or not _output_shape_kept(call, matches[base]):
            return call
        return _power_as_multiplies(matches[base], power)

    result = mod.clone()  # a pass must not change the module it is given
    for gvar, func in mod.functions.items():
        if isinstance(func, relax.Function):
            result.update_func(gvar, rewrite_call(pattern, rewrite, func))
    return result


def integer_power_to_multiply() -> tvm.transform.Pass:
    """``power_to_multiply`` as a module pass, for a Relax pass list."""

    @tvm.transform.module_pass(opt_level=0, name="IntegerPowerToMultiply")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return power_to_multiply(mod)

    return _pass


# ---------------------------------------------------------------------------
# Weights passed in (params_mode="separate") in the dtype the kernels read them in


def _weight_params(func: relax.Function) -> list[relax.Var]:
    # The ONNX importer marks how many leading parameters are real inputs; the rest are
    # weights (keep_params_in_input=True).
    num_input = func.attrs.get("num_input") if func.attrs is not None else None
    return list(func.params[int(num_input):]) if num_input is not None else []


def _readers(func: relax.Function) -> tuple[dict[relax.Var, list], dict[relax.Var, relax.Expr]]:
    """Each variable -> the binding variables whose value reads it (None: the function's
    result), and each binding variable -> its value."""
    readers: dict[relax.Var, list] = {}
    values: dict[relax.Var, relax.Expr] = {}

    def note(reader: relax.Var | None, expr: relax.Expr) -> None:
        if isinstance(expr, relax.Var):
            readers.setdefault(expr, []).append(reader)
        elif isinstance(expr, relax.Call):
            for arg in expr.args:
                note(reader, arg)
        elif isinstance(expr, relax.Tuple):
            for item in expr.fields:
                note(reader, item)
        elif isinstance(expr, relax.TupleGetItem):
            note(reader, expr.tuple_value)

    for block in func.body.blocks:
        for binding in block.bindings:
            values[binding.var] = binding.value
            note(binding.var, binding.value)
    note(None, func.body.body)
    return readers, values


def _cast_dtype(expr: relax.Expr) -> str | None:
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.astype":
        return str(expr.attrs.dtype)
    return None


@relax.expr_functor.mutator
class _ReadCastParams(relax.PyExprMutator):
    """Replaces each ``lv = astype(weight)`` binding by the weight parameter in its new dtype."""

    def __init__(self, mod: tvm.IRModule, cast_to_param: dict[relax.Var, relax.Var]):
        super().__init__(mod)
        self.cast_to_param = cast_to_param

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        param = self.cast_to_param.get(binding.var)
        if param is None:
            super().visit_var_binding_(binding)
        else:
            self.set_var_remap(binding.var, param)


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
    readers, values = _readers(func)
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
