"""Pointwise GEMMs on the NHWC map itself, without flattening it to rows first (GPU targets).

ONNX's Gemm is 2-D, so an exported ConvNeXt block flattens the NHWC map to (N*H*W, C)
before its two pointwise GEMMs and reshapes the result back before the layer scale and the
residual add. TVM fuses nothing across a reshape: on a GPU each block then paid two extra
kernels (the flatten with the cast to float16, and the layer scale with the residual add)
and a round trip of its activations through memory.

A flattened value's "twin" here is the same tensor kept 4-D. Matmuls with a 2-D weight,
elementwise ops whose other operands broadcast along the channels (bias, layer scale,
constants) and casts compute on twins, and the reshape back to the map is the twin itself;
so the cast fuses into the LayerNorm before the GEMM and the layer scale and residual add
into the GEMM's epilogue. A flattened value that something else reads is materialized
(one reshape), so the result is always correct.

CPU targets keep the 2-D GEMMs: their shipped tuning records are keyed by those kernels.
"""

from __future__ import annotations

import tvm
from tvm import relax

from pipeline.compiler.relax_graph import TwinRewriter, op_name, rewrite_functions, static_shape

_ELEMENTWISE = {
    "relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.astype", "relax.erf",
    "relax.tanh", "relax.sigmoid", "relax.nn.gelu", "relax.nn.gelu_tanh", "relax.nn.relu",
    "relax.maximum", "relax.minimum", "relax.power", "relax.sqrt",
}


@relax.expr_functor.mutator
class _GemmsOnMaps(TwinRewriter):
    """A 2-D (rows, channels) dataflow value's twin is the same tensor as (N, H, W, channels)."""

    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.flat_shape: dict[relax.Var, tuple[int, ...]] = {}

    def materialize(self, var: relax.Var, twin: relax.Var) -> relax.Expr:
        return self.builder_.emit(relax.op.reshape(twin, self.flat_shape[var]), "flat")

    def twin_bound(self, var: relax.Var, value: relax.Expr) -> None:
        self.flat_shape[var] = static_shape(value)

    def convert(self, value: relax.Expr) -> tuple[str, relax.Expr] | None:
        name = op_name(value)
        if name is None or not value.args:
            return None
        source = value.args[0]
        twin = self.twin_of(source)
        if name == "relax.reshape":
            return self._reshape(value, source, twin)
        if name == "relax.matmul" and twin is not None:
            weight_shape = static_shape(value.args[1])
            if weight_shape is None or len(weight_shape) != 2 or self.twin_of(value.args[1]) is not None:
                return None
            return "twin", self.builder_.emit(
                relax.Call(value.op, [twin, self.visit_expr(value.args[1])], value.attrs, value.ty_args), "map_gemm")
        if name in _ELEMENTWISE:
            return self._elementwise(value)
        return None

    def _reshape(self, value, source, twin):
        shape, out_shape = static_shape(source), static_shape(value)
        if shape is None or out_shape is None:
            return None
        if twin is None:
            # (N, H, W, C) -> (N*H*W, C): the flattened value's twin is the map itself.
            if len(shape) == 4 and len(out_shape) == 2 and out_shape == (shape[0] * shape[1] * shape[2], shape[3]):
                return "twin", self.visit_expr(source)
            return None
        # Back to a map of the twin's pixels: the twin itself.
        twin_shape = static_shape(twin)
        if len(out_shape) == 4 and out_shape == twin_shape:
            return "direct", twin
        return None

    def _elementwise(self, value):
        operands, any_twin, out_shape = [], False, static_shape(value)
        if out_shape is None or len(out_shape) != 2:
            return None
        for arg in value.args:
            twin = self.twin_of(arg)
            if twin is not None:
                operands.append(twin)
                any_twin = True
                continue
            shape = static_shape(arg) if isinstance(arg, relax.Expr) else None
            # Scalars and per-channel vectors broadcast the same way against the map.
            if shape is None or len(shape) > 1 or (len(shape) == 1 and shape[0] not in (1, out_shape[1])):
                return None
            operands.append(self.visit_expr(arg))
        if not any_twin:
            return None
        return "twin", self.builder_.emit(relax.Call(value.op, operands, value.attrs, value.ty_args), "map")


def gemms_on_maps(mod: tvm.IRModule) -> tvm.IRModule:
    """Every Relax function of ``mod`` with its flattened GEMM chains on the NHWC maps."""
    return relax.transform.DeadCodeElimination()(relax.transform.CanonicalizeBindings()(
        rewrite_functions(mod, _GemmsOnMaps)))


def gemms_on_maps_pass() -> tvm.transform.Pass:
    """``gemms_on_maps`` as a module pass, for a Relax pass list."""

    @tvm.transform.module_pass(opt_level=0, name="GemmsOnMaps")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return gemms_on_maps(mod)

    return _pass
