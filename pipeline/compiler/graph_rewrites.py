"""Graph rewrites of arithmetic: numerically safe on every target, cheaper on GPUs.

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
# Division by a constant as a multiplication (GPU)


def divide_by_constant_to_multiply(mod: tvm.IRModule) -> tvm.IRModule:
    """``x / c`` with a scalar float constant c -> ``x * (1 / c)``: within one rounding of the
    division (the reciprocal is rounded once), and a multiply where IEEE division is a
    ~20-instruction sequence with a called slow path. On a GPU GELU's ``x / sqrt(2)`` is
    repeated in every use the erf approximation makes of its input once the epilogue is
    inlined into a GEMM (22 divisions per element, 88 calls in the kernel's SASS); as
    multiplications nvcc merges the copies. CPU kernels keep the division: their tuning
    records are keyed by the kernels as they are.
    """
    numerator, denominator = wildcard(), is_const()
    pattern = is_op("relax.divide")(numerator, denominator)

    def rewrite(call: relax.Call, matches) -> relax.Expr:
        values = matches[denominator].value.numpy()
        if values.size != 1 or values.dtype.kind != "f" or values.flat[0] == 0 or not _output_shape_kept(
                call, matches[numerator]):
            return call
        reciprocal = relax.const(np.asarray(1.0 / values.astype("float64"), dtype=values.dtype).reshape(values.shape))
        return relax.op.multiply(matches[numerator], reciprocal)

    result = mod.clone()
    for gvar, func in mod.functions.items():
        if isinstance(func, relax.Function):
            result.update_func(gvar, rewrite_call(pattern, rewrite, func))
    return result


def divide_by_constant_to_multiply_pass() -> tvm.transform.Pass:
    """``divide_by_constant_to_multiply`` as a module pass."""

    @tvm.transform.module_pass(opt_level=0, name="DivideByConstantToMultiply")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return divide_by_constant_to_multiply(mod)

    return _pass
