"""Channels-last (NHWC) compute for imported NCHW graphs, with the transposes cancelled.

ONNX convolutions are NCHW, while ConvNeXt's LayerNorm and pointwise GEMMs want the
channels last, so the exported graph transposes twice per block (NCHW -> NHWC before the
LayerNorm, back after the layer scale) and normalizes the downsampling layers over the
strided channel axis. On x86 those transposes and channel-axis reductions cost ConvNeXt-T
~7 ms of ~66 ms per image. TVM's own ConvertLayout stops at the first op it cannot convert
(a (C,1,1) constant broadcast, a reshape) and leaves identity transposes behind.

This pass keeps every 4-D NCHW value's NHWC "twin" instead of the value itself:
convolutions compute in NHWC (weights OHWI, permuted once as constants), elementwise ops,
channel reductions, padding and (de)quantization compute on the twins, and a transpose
to NHWC of a twin is the twin itself. The NCHW value is materialized (one transpose) only
where an op this pass does not know reads it, so the result is always correct; for
ConvNeXt no transpose is left but the one of the input image.
"""

from __future__ import annotations

import tvm
from tvm import relax

from pipeline.compiler.relax_graph import TwinRewriter, op_name, rewrite_functions, static_shape

NCHW_TO_NHWC = (0, 2, 3, 1)
NHWC_TO_NCHW = (0, 3, 1, 2)
# Where an NCHW axis sits in NHWC.
AXIS_IN_NHWC = (0, 3, 1, 2)

_UNARY = {
    "relax.sqrt", "relax.rsqrt", "relax.erf", "relax.exp", "relax.tanh", "relax.sigmoid",
    "relax.negative", "relax.abs", "relax.round", "relax.floor", "relax.ceil", "relax.square",
    "relax.astype", "relax.clip", "relax.nn.relu", "relax.nn.gelu", "relax.nn.gelu_tanh",
    "relax.nn.silu",
}
_BINARY = {
    "relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.power",
    "relax.maximum", "relax.minimum",
}
_REDUCE = {"relax.mean", "relax.sum", "relax.max", "relax.min", "relax.variance"}


def patch_kernel(attrs, input_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(kh, kw) of an NCHW/OIHW conv2d over non-overlapping patches that tile its input
    (kernel == stride, no padding, dilation or groups: ConvNeXt's stem and downsampling
    layers), which is a matmul of the patches; None for any other convolution."""
    kernel = tuple(weight_shape[2:])
    if (
        len(input_shape) != 4 or int(attrs.groups) != 1 or tuple(int(s) for s in attrs.strides) != kernel
        or any(int(p) for p in attrs.padding) or any(int(d) != 1 for d in attrs.dilation)
        or input_shape[2] % kernel[0] or input_shape[3] % kernel[1]
    ):
        return None
    return kernel


@relax.expr_functor.mutator
class _ChannelsLast(TwinRewriter):
    """A 4-D NCHW dataflow value's twin is the same tensor in NHWC."""

    def materialize(self, var: relax.Var, twin: relax.Var) -> relax.Expr:
        return self.builder_.emit(relax.op.permute_dims(twin, NHWC_TO_NCHW), "to_nchw")

    def _emit(self, expr: relax.Expr, name: str = "nhwc") -> relax.Var:
        return self.builder_.emit(expr, name)

    def _as_nhwc(self, expr: relax.Expr) -> relax.Expr | None:
        """An operand of an op on NCHW values, as the matching NHWC operand."""
        twin = self.twin_of(expr)
        if twin is not None:
            return twin
        shape = static_shape(expr)
        if shape is None or len(shape) > 4:
            return None
        new = self.visit_expr(expr)
        if len(shape) == 0:
            return new
        if len(shape) < 4:  # broadcasts from the right, as NumPy does
            new = self._emit(relax.op.reshape(new, (1,) * (4 - len(shape)) + shape))
        return self._emit(relax.op.permute_dims(new, NCHW_TO_NHWC))

    def convert(self, value: relax.Expr) -> tuple[str, relax.Expr] | None:
        """("twin", NHWC var) or ("direct", var) for a value computed channels-last, or None."""
        name = op_name(value)
        if name is None:
            return None
        args = list(value.args)
        source = args[0] if args else None
        twin = self.twin_of(source)

        if name == "relax.permute_dims":
            return self._permute(value, source, twin)
        if name == "relax.nn.conv2d":
            return self._conv2d(value)
        if twin is None and name not in _BINARY:
            return None
        if name in _UNARY:
            rest = [self.visit_expr(a) for a in args[1:]]
            return "twin", self._emit(relax.Call(value.op, [twin, *rest], value.attrs, value.ty_args))
        if name in _BINARY:
            return self._binary(value, args)
        if name in _REDUCE:
            return self._reduce(value, name, twin)
        if name == "relax.nn.pad":
            return self._pad(value, twin)
        if name in ("relax.quantize", "relax.dequantize"):
            return self._quantize(value, name, twin, args)
        if name in ("relax.reshape", "relax.squeeze", "relax.flatten"):
            shape, out_shape = static_shape(source), static_shape(value)
            # With one channel or one pixel, NCHW and NHWC hold the elements in the same order.
            if shape is not None and out_shape is not None and (shape[1] == 1 or shape[2] * shape[3] == 1):
                return "direct", self._emit(relax.op.reshape(twin, out_shape))
        return None

    def _permute(self, value, source, twin):
        axes = [int(a) for a in value.attrs.axes] if value.attrs.axes is not None else None
        shape = static_shape(source)
        if axes is None or shape is None or len(shape) != 4:
            return None
        if twin is not None:
            composed = [NHWC_TO_NCHW[a] for a in axes]
            if composed == [0, 1, 2, 3]:
                return "direct", twin
            return "direct", self._emit(relax.op.permute_dims(twin, composed))
        if tuple(axes) == NHWC_TO_NCHW:
            # An NHWC value put back into NCHW: keep the NHWC one as its twin.
            return "twin", self.visit_expr(source)
        return None

    def _conv2d(self, value):
        attrs = value.attrs
        if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW"):
            return None
        data = self._as_nhwc(value.args[0])
        if data is None:
            return None
        patch_gemm = self._patch_gemm(value, data)
        if patch_gemm is not None:
            return "twin", patch_gemm
        # Grouped (depthwise) kernels as HWOI: the channels a vector of outputs needs are
        # adjacent, as they are in the NHWC input.
        kernel_layout, axes = ("HWOI", (2, 3, 0, 1)) if int(attrs.groups) > 1 else ("OHWI", NCHW_TO_NHWC)
        weight = self._emit(relax.op.permute_dims(self.visit_expr(value.args[1]), axes), kernel_layout.lower())
        out_dtype = str(attrs.out_dtype) if attrs.out_dtype is not None else None
        conv = relax.op.nn.conv2d(
            data, weight,
            strides=[int(s) for s in attrs.strides], padding=[int(p) for p in attrs.padding],
            dilation=[int(d) for d in attrs.dilation], groups=int(attrs.groups),
            data_layout="NHWC", kernel_layout=kernel_layout, out_layout="NHWC",
            **({"out_dtype": out_dtype} if out_dtype not in (None, "", "void") else {}),
        )
        return "twin", self._emit(conv, "conv_nhwc")

    def _patch_gemm(self, value, data: relax.Expr) -> relax.Var | None:
        """A convolution over non-overlapping patches (kernel == stride, no padding: the
        ConvNeXt stem and downsampling layers) as one GEMM of the patches, which the GEMM
        schedules and tuning records serve far better than a convolution loop nest."""
        attrs = value.attrs
        in_shape, w_shape = static_shape(value.args[0]), static_shape(value.args[1])
        kernel = patch_kernel(attrs, in_shape, w_shape) if in_shape and w_shape else None
        if kernel is None:
            return None
        (batch, channels, height, width), (kh, kw), out_channels = in_shape, kernel, w_shape[0]
        rows, cols = height // kh, width // kw
        # (N, H, W, C) -> (N, H/kh, kh, W/kw, kw, C) -> (N, H/kh, W/kw, kh, kw, C) -> patches.
        patches = self._emit(relax.op.reshape(data, (batch, rows, kh, cols, kw, channels)))
        if kh * kw > 1:
            patches = self._emit(relax.op.permute_dims(patches, (0, 1, 3, 2, 4, 5)), "patches")
        # Kept 4-D, so that the GEMM's output is the NHWC map and the bias add after the
        # convolution fuses into it as an epilogue.
        patches = self._emit(relax.op.reshape(patches, (batch, rows, cols, kh * kw * channels)))
        # OIHW -> (kh, kw, C, O) -> (kh * kw * C, O): the same (kh, kw, C) order as a patch.
        weight = self._emit(relax.op.permute_dims(self.visit_expr(value.args[1]), (2, 3, 1, 0)))
        weight = self._emit(relax.op.reshape(weight, (kh * kw * channels, out_channels)), "patch_weight")
        out_dtype = str(attrs.out_dtype) if attrs.out_dtype is not None else ""
        return self._emit(relax.op.matmul(patches, weight, out_dtype=out_dtype or None), "patch_gemm")

    def _binary(self, value, args):
        out_shape = static_shape(value)
        if out_shape is None or len(out_shape) != 4 or not any(self.twin_of(a) is not None for a in args):
            return None
        operands = [self._as_nhwc(a) for a in args]
        if any(o is None for o in operands):
            return None
        return "twin", self._emit(relax.Call(value.op, operands, value.attrs, value.ty_args))

    def _reduce(self, value, name, twin):
        if value.attrs.axis is None:
            return None
        axes = sorted(int(a) % 4 for a in value.attrs.axis)
        keepdims = bool(value.attrs.keepdims)
        op = getattr(relax.op, name.split(".")[-1])
        reduced = self._emit(op(twin, [AXIS_IN_NHWC[a] for a in axes], keepdims=keepdims))
        if keepdims:
            return "twin", reduced
        kept_nchw = [a for a in range(4) if a not in axes]
        kept_nhwc = [a for a in NCHW_TO_NHWC if a not in axes]
        if kept_nchw == kept_nhwc:  # e.g. global pooling over H and W: (N, C) either way
            return "direct", reduced
        order = [kept_nhwc.index(a) for a in kept_nchw]
        return "direct", self._emit(relax.op.permute_dims(reduced, order))

    def _pad(self, value, twin):
        width = [int(w) for w in value.attrs.pad_width]
        if len(width) != 8:
            return None
        pairs = [width[2 * a: 2 * a + 2] for a in range(4)]
        nhwc_width = [w for a in NCHW_TO_NHWC for w in pairs[a]]
        return "twin", self._emit(relax.op.nn.pad(
            twin, nhwc_width, pad_mode=str(value.attrs.pad_mode), pad_value=float(value.attrs.pad_value),
        ))

    def _quantize(self, value, name, twin, args):
        op = relax.op.quantize if name == "relax.quantize" else relax.op.dequantize
        axis = AXIS_IN_NHWC[int(value.attrs.axis) % 4]
        scale, zero = (self.visit_expr(a) for a in args[1:3])
        return "twin", self._emit(op(twin, scale, zero, axis=axis, out_dtype=str(value.attrs.out_dtype)))


def to_channels_last(mod: tvm.IRModule) -> tvm.IRModule:
    """Every Relax function of `mod` computing channels-last where it can (module docstring)."""
    result = rewrite_functions(mod, _ChannelsLast)  # a new module: a pass must not change its input
    return relax.transform.DeadCodeElimination()(relax.transform.CanonicalizeBindings()(result))


def channels_last_pass() -> tvm.transform.Pass:
    """`to_channels_last` as a module pass, for a Relax pass list."""

    @tvm.transform.module_pass(opt_level=0, name="ChannelsLast")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return to_channels_last(mod)

    return _pass
