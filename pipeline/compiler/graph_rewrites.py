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

from pipeline.compiler.relax_graph import static_shape
from pipeline.compiler.tvm_compat import constant_value

# Exponents written out as multiplications; a larger one would be a longer chain than pow.
_MAX_EXPONENT = 4


def _integer_exponent(constant: relax.Expr) -> int | None:
    """The exponent of a scalar (or all-equal) constant when it is an integer 1..4."""
    values = constant_value(constant)
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
        values = constant_value(matches[denominator])
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


# ---------------------------------------------------------------------------
# A LayerNorm written out in parts as one LayerNorm (GPU)


def _layer_norm_patterns():
    """(with gamma and beta, without them: onnxsim drops a multiply by ones and an add of
    zeros), each as (pattern, x, gamma or None, beta or None, eps, the two means)."""
    x, gamma, beta, eps = wildcard(), wildcard(), wildcard(), is_const()
    mean = is_op("relax.mean")(x)
    centred = is_op("relax.subtract")(x, mean)
    variance = is_op("relax.mean")(is_op("relax.multiply")(centred, centred))
    normed = is_op("relax.divide")(centred, is_op("relax.sqrt")(is_op("relax.add")(variance, eps)))
    scaled = is_op("relax.multiply")(gamma, normed) | is_op("relax.multiply")(normed, gamma)
    affine = is_op("relax.add")(scaled, beta)
    return [(affine, x, gamma, beta, eps, (mean, variance)), (normed, x, None, None, eps, (mean, variance))]


def layer_norm_from_parts(mod: tvm.IRModule) -> tvm.IRModule:
    """``gamma * (x - mean(x)) / sqrt(mean((x - mean(x))**2) + eps) + beta`` over the last
    axis -> ``layer_norm(x, gamma, beta, eps)``. ConvNeXt's channels-first LayerNorm (stem and
    downsampling layers) is exported in parts; once channels-last (layout.py) it reduces
    over the last axis like the others, and as one op it is one kernel instead of four
    (mean-subtract, square, mean with normalize, and their reads of the map in between).
    CPU kernels keep the parts: their tuning records are keyed by them.
    """
    result = mod.clone()
    for pattern, x, gamma, beta, eps, means in _layer_norm_patterns():

        def rewrite(call: relax.Call, matches, x=x, gamma=gamma, beta=beta, eps=eps, means=means) -> relax.Expr:
            shape = static_shape(matches[x])
            if shape is None or static_shape(call) != shape or str(call.ty.dtype) != "float32":
                return call
            channels, last = shape[-1], len(shape) - 1
            for mean in means:
                attrs = matches[mean].attrs
                if attrs.axis is None or [int(a) % len(shape) for a in attrs.axis] != [last] or not attrs.keepdims:
                    return call
            params = []
            for weight, default in ((gamma, 1.0), (beta, 0.0)):
                if weight is None:
                    params.append(relax.const(np.full((channels,), default, dtype="float32")))
                    continue
                weight_shape = static_shape(matches[weight])
                if weight_shape is None or int(np.prod(weight_shape)) != channels or weight_shape[-1] != channels:
                    return call
                params.append(matches[weight] if weight_shape == (channels,)
                              else relax.op.reshape(matches[weight], (channels,)))
            epsilon = float(constant_value(matches[eps]).reshape(-1)[0])
            return relax.op.nn.layer_norm(matches[x], params[0], params[1], axes=[-1], epsilon=epsilon)

        for gvar, func in list(result.functions.items()):
            if isinstance(func, relax.Function):
                result.update_func(gvar, rewrite_call(pattern, rewrite, func))
    return relax.transform.DeadCodeElimination()(result)


def layer_norm_from_parts_pass() -> tvm.transform.Pass:
    """``layer_norm_from_parts`` as a module pass."""

    @tvm.transform.module_pass(opt_level=0, name="LayerNormFromParts")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return layer_norm_from_parts(mod)

    return _pass
