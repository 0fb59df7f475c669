"""Integer compute for QDQ models in TVM Relax: dequantize -> conv2d/matmul -> quantize
becomes int8 x int8 -> int32 plus a requantize epilogue.

TVM 0.27's ONNX importer turns a QDQ model (what `pipeline quantize` writes) into float
ops between `R.quantize` and `R.dequantize`: the convolutions and matmuls still run in
float32 on dequantized values, so nothing is gained but rounding. No built-in pass makes
them integer. This pass does, for every pattern

    x  = dequantize(xq, sx, zx)                   xq int8, per-tensor sx, zx
    w  = dequantize(wq, sw, 0)                    constant int8 weights, per-channel sw
    y  = conv2d(x, w) | matmul(x, w)              (matmul: w may be transposed, Gemm)
    y  = y + dequantize(bq, sb, zb)               optional bias (reshaped for conv2d)
    q  = quantize(y, sy, zy)                      optional int8 output

it writes

    acc = conv2d(pad(xq, zx), wq, out_dtype=int32) | matmul(xq, wq, out_dtype=int32)
    acc = acc + (bq - zb - zx * sum(wq))           one int32 constant per output channel
    q   = cast<int8>(clip(round(acc * sx * sw / sy) + zy, -128, 127))

which is exact up to the final rounding: the zero point of x is handled by padding with
zx (so the border sees the real value 0) and by subtracting zx * sum(wq) per output
channel, and an int32 bias in ORT's scale sx * sw adds without rescaling. Without an int8
output (the layer's consumers compute in float: see quantize.float_consumers_read_float)
the epilogue dequantizes instead: `acc * sx * sw (+ float bias)`. Either epilogue is
elementwise, so TVM's FuseOps fuses it into the convolution's PrimFunc. Layers that stay
float in the QDQ model (excluded, or LayerNorm/GELU) have no such pattern and are left
alone, as are patterns this pass cannot prove exact (non-constant scales, weight zero
points, layouts other than NCHW/OIHW): those keep computing in float and are counted.

On x86 CPUs with AVX-512 VNNI (`vnni=True`, which compile decides from the
target: phases.precision_phases) a matmul whose weight fits the instruction computes instead

    xu8 = cast<uint8>(xq + 128)                   elementwise: fuses into xq's producer
    acc = vnni_matmul(xu8, pack(wq))              R.call_tir, pipeline/compiler/vnni.py
    acc = acc + (bq - zb - (zx + 128) * sum(wq))

the same integers (the shift is one more zero point), at 64 multiply-adds per instruction.

Everything constant is computed here in NumPy, so the weights must be bound as constants
(params "embedded"). Compile with precision "int8" (backend.compile_onnx), or use
`lower_qdq_to_integer` on an IRModule.

The chain is written once in the pattern language (tvm.relax.dpl, as graph_rewrites.py
uses it: _patterns), and matched against every binding from the last one back. A match
holds where each of its variables has one reader, the next step (a value read elsewhere
too must stay), and its values pass the checks the pattern cannot state (constants, int8,
per-channel weight scales and biases, NCHW/OIHW); the first chain that holds for a
conv2d/matmul claims it. Going backwards, its quantize is tried before its bias add and
the add before the conv2d/matmul alone, so each gets the longest chain that holds, and
a rejected quantize or bias leaves the shorter one. Every conv2d/matmul is first checked
alone, with the sub-patterns of its weight and its input in that order; one that fails
stays float and is reported with the first check it failed (float_compute_reasons).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

import tvm
from tvm import relax
from tvm.relax.dpl import DFPattern, is_op, wildcard

from pipeline.compiler import layout, pass_results
from pipeline.compiler.relax_graph import Bindings, op_name, static_shape
from pipeline.compiler import vnni as vnni_kernel
from pipeline.compiler.tvm_compat import constant_value, is_constant, prim_func_buffers
from pipeline.errors import PipelineError

INT8_MIN, INT8_MAX = -128, 127
COMPUTE_OPS = ("relax.nn.conv2d", "relax.matmul")


# ---------------------------------------------------------------------------
# Matching


@dataclass
class _Match:
    """One dequantize -> conv2d/matmul (+bias) (-> quantize) chain to rewrite."""

    op: str  # "relax.nn.conv2d" or "relax.matmul"
    call: relax.Call  # the float conv2d/matmul
    xq: relax.Expr  # the int8 input
    zx: int
    sx: float
    wq: np.ndarray  # int8 weight, OIHW for conv2d, (K, N) for matmul
    sw: np.ndarray  # float32 per output channel (O,) or (N,)
    bias_int: np.ndarray | None  # int32 in scale sx*sw, or None
    bias_float: np.ndarray | None  # float32, when the bias scale is not sx*sw
    sy: float | None  # output quantization, None when the output stays float
    zy: int | None
    end: relax.Var  # the binding whose value the rewrite replaces


@dataclass
class Int8Report:
    """What the lowering did: counts per op, and why any conv2d/matmul stayed float."""

    lowered: Counter = field(default_factory=Counter)
    with_requantize: int = 0
    vnni: Counter = field(default_factory=Counter)  # of the lowered ops, those on AVX-512 VNNI
    float_kept: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "integer_ops": {op.split(".")[-1]: n for op, n in sorted(self.lowered.items())},
            "requantize_epilogues": self.with_requantize,
            "vnni_ops": {op.split(".")[-1]: n for op, n in sorted(self.vnni.items())},
            "float_compute_ops": len(self.float_kept),
            "float_compute_reasons": dict(Counter(self.float_kept)),
        }


def _dtype(expr: relax.Expr) -> str | None:
    ty = expr.ty
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def _constant(graph: Bindings, expr: relax.Expr) -> np.ndarray | None:
    """The value of a constant subexpression (dequantize/reshape/permute of constants), or None."""
    expr = graph.resolve(expr)
    if is_constant(expr):
        return constant_value(expr)
    if op_name(expr) == "relax.dequantize":
        parts = [_constant(graph, arg) for arg in expr.args]
        if any(p is None for p in parts):
            return None
        data, scale, zero = parts
        return _dequantize_np(data, scale, zero, int(expr.attrs.axis)).astype(np.float32)
    if op_name(expr) == "relax.reshape":
        data = _constant(graph, expr.args[0])
        shape = [int(d) for d in expr.ty.shape]
        return None if data is None else data.reshape(shape)
    if op_name(expr) == "relax.permute_dims":
        data = _constant(graph, expr.args[0])
        axes = None if expr.attrs.axes is None else [int(a) for a in expr.attrs.axes]
        return None if data is None else np.transpose(data, axes)
    return None


def _dequantize_np(data: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * data.ndim
    if scale.size > 1:
        shape[axis] = -1
    scale = scale.astype(np.float32).reshape(shape if scale.size > 1 else ())
    zero = zero.astype(np.int64).reshape(shape if zero.size > 1 else ())
    return (data.astype(np.int64) - zero).astype(np.float32) * scale


def _scalar(graph: Bindings, expr: relax.Expr) -> float | None:
    value = _constant(graph, expr)
    return None if value is None or value.size != 1 else value.reshape(()).item()


@dataclass(frozen=True)
class _Patterns:
    """The chain of the module docstring in the pattern language (tvm.relax.dpl), with the
    parts that the checks of its values read."""

    input: DFPattern  # dequantize(xq, sx, zx)
    weight: DFPattern  # dequantize(wq, sw, zw)
    transposed: DFPattern  # permute_dims(weight)
    matmul_weight: DFPattern  # weight | transposed
    compute: DFPattern  # conv2d(input, weight) | matmul(input, matmul_weight)
    biased: DFPattern  # add(compute, bias), either way round
    quantized: DFPattern  # quantize(biased | compute, sy, zy)
    chain: DFPattern  # quantized | biased | compute


def _patterns() -> _Patterns:
    """dequantize -> conv2d/matmul (+ bias) (-> quantize), as in the module docstring."""
    weight = is_op("relax.dequantize")(wildcard(), wildcard(), wildcard())
    transposed = is_op("relax.permute_dims")(weight)  # a Gemm's transB
    matmul_weight = weight | transposed
    data = is_op("relax.dequantize")(wildcard(), wildcard(), wildcard())
    compute = is_op("relax.nn.conv2d")(data, weight) | is_op("relax.matmul")(data, matmul_weight)
    # The pattern language tries an add's operands both ways round: the bias may come first.
    biased = is_op("relax.add")(compute, wildcard())
    quantized = is_op("relax.quantize")(biased | compute, wildcard(), wildcard())
    return _Patterns(data, weight, transposed, matmul_weight, compute, biased, quantized,
                     chain=quantized | biased | compute)


def _weight(graph: Bindings, patterns: _Patterns, var2val: Any, expr: relax.Expr,
            op: str) -> tuple[np.ndarray, np.ndarray] | str:
    """(int8 weight in the layout the op uses, float32 scale per output channel), or why not."""
    permute = graph.resolve(expr)
    if op == "relax.matmul" and op_name(permute) == "relax.permute_dims":
        axes = permute.attrs.axes
        if axes is not None and [int(a) for a in axes] != [1, 0]:
            return "weight permuted other than a 2-D transpose"
    pattern = patterns.matmul_weight if op == "relax.matmul" else patterns.weight
    found = pattern.extract_matched_expr(expr, var2val)
    if found is None:
        return "weight is float (layer not quantized)"
    dequantize = found[patterns.weight]
    wq, sw, zw = (_constant(graph, arg) for arg in dequantize.args)
    if wq is None or sw is None or zw is None:
        return "weight or its scale is not a constant (params not embedded)"
    if wq.dtype != np.int8:
        return f"weight is {wq.dtype}, not int8"
    if np.any(zw != 0):
        return "weight zero point is not 0 (asymmetric weights)"
    axis = int(dequantize.attrs.axis) % wq.ndim
    if patterns.transposed in found:
        wq = wq.T
        axis = 1 - axis
    channel_axis = 0 if op == "relax.nn.conv2d" else wq.ndim - 1
    channels = wq.shape[channel_axis]
    if sw.size == 1:
        sw = np.full(channels, sw.reshape(()).item(), np.float32)
    elif axis != channel_axis or sw.size != channels:
        return "weight scale is not per output channel"
    return np.ascontiguousarray(wq), sw.reshape(-1).astype(np.float32)


def _compute(graph: Bindings, patterns: _Patterns, var2val: Any, var: relax.Var) -> _Match | str:
    """The conv2d/matmul bound to `var` as a chain of its own (no bias, float output), or
    the first check it fails: its weight's, then its input's, then its layout's."""
    call = graph.value[var]
    op = op_name(call)
    weight = _weight(graph, patterns, var2val, call.args[1], op)
    if isinstance(weight, str):
        return weight
    wq, sw = weight
    found = patterns.input.extract_matched_expr(call.args[0], var2val)
    if found is None:
        return "input is float"
    x = found[patterns.input]
    xq = x.args[0]
    if _dtype(xq) != "int8":
        return f"input is {_dtype(xq)}, not int8"
    sx, zx = _scalar(graph, x.args[1]), _scalar(graph, x.args[2])
    if sx is None or zx is None:
        return "input scale is not a per-tensor constant"
    if op == "relax.nn.conv2d":
        attrs = call.attrs
        if (attrs.data_layout, attrs.kernel_layout) != ("NCHW", "OIHW"):
            return f"conv2d layout {attrs.data_layout}/{attrs.kernel_layout} (only NCHW/OIHW)"
        if attrs.out_layout not in ("", "NCHW", None):
            return f"conv2d out_layout {attrs.out_layout}"
    if op == "relax.matmul" and ((xq.ty.ndim or 0) < 2 or wq.ndim != 2):
        return "matmul is not (..., K) x (K, N)"
    return _Match(op, call, xq, int(zx), float(sx), wq, sw, None, None, None, None, var)


def _find_matches(func: relax.Function, report: Int8Report) -> dict[relax.Var, _Match]:
    graph = Bindings(func)
    patterns = _patterns()
    var2val = tvm.runtime.convert(graph.value)  # the patterns see through variables as graph.resolve does
    computes = {var: _compute(graph, patterns, var2val, var)
                for var in graph.order if op_name(graph.value[var]) in COMPUTE_OPS}
    report.float_kept.extend(reason for reason in computes.values() if isinstance(reason, str))
    # From the last binding back, so each conv2d/matmul's longest chain (quantize, else its
    # bias add, else itself) is tried first; one whose steps fail a check leaves the
    # conv2d/matmul unclaimed for its next shorter chain, and itself always holds.
    matches: dict[relax.Var, _Match] = {}
    claimed: set[relax.Var] = set()
    for var in reversed(graph.order):
        value = graph.value[var]
        found = patterns.chain.extract_matched_expr(value, var2val) if isinstance(value, relax.Call) else None
        steps = None if found is None else _steps(graph, var, found, patterns)
        if steps is None or steps[0] in claimed or isinstance(computes[steps[0]], str):
            continue
        match = _extended(graph, computes[steps[0]], found, patterns)
        if match is not None:
            matches[var] = replace(match, end=var)
            claimed.add(steps[0])
    return matches


def _steps(graph: Bindings, var: relax.Var, found: Any, patterns: _Patterns) -> list[relax.Var] | None:
    """The variables of a chain matched at `var`, its conv2d/matmul's first, when each is
    the only reader of the one before (a value read elsewhere too must stay); else None."""
    calls = [found[part] for part in (patterns.compute, patterns.biased, patterns.quantized) if part in found]
    steps, outer = [var], calls[-1]
    for inner in reversed(calls[:-1]):
        bound = [arg for arg in outer.args if arg in graph.value and graph.value[arg].same_as(inner)]
        inner_var = bound[0] if bound else None
        reader = None if inner_var is None else graph.only_reader(inner_var)
        if reader is None or not reader.same_as(steps[-1]):
            return None
        steps.append(inner_var)
        outer = inner
    return steps[::-1]


def _extended(graph: Bindings, match: _Match, found: Any, patterns: _Patterns) -> _Match | None:
    """`match` (a conv2d/matmul alone) with the bias and int8 output of the chain found,
    None when the bias is not a per-channel constant or the output's quantization not a
    per-tensor constant int8 one."""
    if patterns.biased in found:
        add = found[patterns.biased]
        compute_var = match.end  # a conv2d/matmul alone ends at its own binding
        other = add.args[1] if add.args[0].same_as(compute_var) else add.args[0]
        bias = _constant(graph, other)
        if bias is None or bias.size != match.sw.size or not _bias_broadcasts(bias.shape, match.op):
            return None
        bias_int = _as_int32_bias(graph, other, match.sx * match.sw)
        bias_float = bias.reshape(-1).astype(np.float32) if bias_int is None else None
        match = replace(match, bias_int=bias_int, bias_float=bias_float)
    if patterns.quantized in found:
        quantize = found[patterns.quantized]
        scale, zero = _scalar(graph, quantize.args[1]), _scalar(graph, quantize.args[2])
        if str(quantize.attrs.out_dtype) != "int8" or scale is None or zero is None:
            return None
        match = replace(match, sy=float(scale), zy=int(zero))
    return match


def _bias_broadcasts(shape: tuple[int, ...], op: str) -> bool:
    if op == "relax.matmul":
        return len(shape) == 1
    return len(shape) == 1 or (len(shape) == 4 and shape[0] == shape[2] == shape[3] == 1)


def _as_int32_bias(graph: Bindings, expr: relax.Expr, scale: np.ndarray) -> np.ndarray | None:
    """The bias as int32 in the accumulator's scale sx*sw, when it was quantized that way
    (ORT quantizes biases with exactly that scale); None otherwise."""
    expr = graph.resolve(expr)
    if op_name(expr) == "relax.reshape":
        expr = graph.resolve(expr.args[0])
    if op_name(expr) != "relax.dequantize":
        return None
    bq, sb, zb = (_constant(graph, arg) for arg in expr.args)
    if bq is None or sb is None or zb is None or bq.dtype != np.int32:
        return None
    sb = np.broadcast_to(sb.reshape(-1), scale.shape)
    if not np.allclose(sb, scale, rtol=1e-6, atol=0):
        return None
    return (bq.astype(np.int64).reshape(-1) - np.broadcast_to(zb.reshape(-1), scale.shape)).astype(np.int64)


# ---------------------------------------------------------------------------
# Rewriting


@dataclass(frozen=True)
class _VnniPlan:
    """How a chain's conv2d/matmul maps onto the VNNI kernel: (rows, K) x (K, N)."""

    op: str
    input_shape: tuple[int, ...]
    rows: int
    k: int
    n: int
    # A convolution whose kernel equals its stride and has no padding (ConvNeXt's stem and
    # downsampling layers) reads non-overlapping (kh, kw) patches: a matmul of patches.
    patch: tuple[int, int] | None = None


def _vnni_plan(m: _Match, xq: relax.Expr) -> _VnniPlan | None:
    """The VNNI plan of a chain, None for the generic path: a convolution that overlaps,
    pads, dilates or groups, a symbolic shape, or a weight that does not fit the kernel."""
    dims = static_shape(xq)
    if dims is None:
        return None
    if m.op == "relax.matmul":
        k, n = m.wq.shape
        plan = _VnniPlan(m.op, dims, math.prod(dims[:-1]), k, n)
    else:
        patch = layout.patch_kernel(m.call.attrs, dims, m.wq.shape)
        if patch is None:
            return None
        (batch, _, height, width), (out_channels, channels, kh, kw) = dims, m.wq.shape
        plan = _VnniPlan(m.op, dims, batch * (height // kh) * (width // kw), channels * kh * kw,
                         out_channels, patch=patch)
    return plan if vnni_kernel.fits(plan.k, plan.n) else None


@relax.expr_functor.mutator
class _Lowering(relax.PyExprMutator):
    """Re-emits every binding, replacing each matched chain's last one with integer compute."""

    def __init__(self, mod: tvm.IRModule, matches: dict[relax.Var, _Match], report: Int8Report, vnni: bool):
        super().__init__(mod)
        self.matches = matches
        self.report = report
        self.vnni = vnni

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        match = self.matches.get(binding.var)
        if match is None:
            super().visit_var_binding_(binding)
            return
        value = self._integer_chain(match)
        if isinstance(binding.var, relax.DataflowVar):
            new_var = self.builder_.emit(value, binding.var.name)
        else:
            new_var = self.builder_.emit_output(value, binding.var.name)
        self.set_var_remap(binding.var, new_var)
        self.report.lowered[match.op] += 1
        self.report.with_requantize += match.sy is not None

    def _emit(self, expr: relax.Expr, name: str) -> relax.Var:
        return self.builder_.emit(expr, name)

    def _integer_chain(self, m: _Match) -> relax.Expr:
        xq = self.visit_expr(m.xq)
        plan = _vnni_plan(m, xq) if self.vnni else None
        if plan is None:
            return self._requantized(m, xq, None)
        out = self._requantized(m, xq, plan)
        if plan.patch is not None:
            # (B*Ho*Wo, O) -> (B, Ho, Wo, O) -> (B, O, Ho, Wo), the convolution's NCHW.
            batch, _, height, width = plan.input_shape
            ph, pw = plan.patch
            rows = self._emit(relax.op.reshape(out, [batch, height // ph, width // pw, plan.n]), "patch_rows")
            return relax.op.permute_dims(rows, [0, 3, 1, 2])
        if len(plan.input_shape) != 2:
            # The kernel and its epilogue work on (rows, N); give back (..., N).
            return relax.op.reshape(self._emit(out, "vnni_out"), [*plan.input_shape[:-1], plan.n])
        return out

    def _vnni_matmul(self, xq: relax.Expr, wq: np.ndarray, plan: "_VnniPlan") -> relax.Var:
        """acc (rows, N) int32 of the VNNI kernel, from xq laid out as (rows, K) rows."""
        if plan.patch is not None:
            # Non-overlapping patches: (B, C, H, W) -> (B, C, Ho, ph, Wo, pw) -> (B, Ho, Wo,
            # C, ph, pw): a row of C*ph*pw per output pixel, in the OIHW weight's (C, kh, kw) order.
            batch, channels, height, width = plan.input_shape
            ph, pw = plan.patch
            xq = self._emit(relax.op.reshape(xq, [batch, channels, height // ph, ph, width // pw, pw]), "patches")
            xq = self._emit(relax.op.permute_dims(xq, [0, 2, 4, 1, 3, 5]), "patches_last")
            wq = wq.reshape(wq.shape[0], -1).T  # OIHW -> (C*kh*kw, O)
        if len(plan.input_shape) != 2:
            xq = self._emit(relax.op.reshape(xq, [plan.rows, plan.k]), "rows")
        shifted = relax.op.add(relax.op.astype(xq, "int32"), relax.const(vnni_kernel.ACTIVATION_SHIFT, "int32"))
        xu8 = self._emit(relax.op.astype(shifted, "uint8"), "x_u8")
        kernel = self.builder_.add_func(vnni_kernel.matmul_primfunc(plan.rows, plan.k, plan.n), "vnni_matmul")
        packed = relax.const(vnni_kernel.pack_weight(np.ascontiguousarray(wq)), "int8")
        self.report.vnni[plan.op] += 1
        return self._emit(
            relax.call_tir(kernel, [xu8, packed], relax.TensorType([plan.rows, plan.n], "int32")), "vnni_i32"
        )

    def _requantized(self, m: _Match, xq: relax.Expr, plan: "_VnniPlan | None") -> relax.Expr:
        """The integer conv2d/matmul of a chain and its epilogue (dequantize or requantize);
        with a VNNI plan, the kernel's (rows, N) layout."""
        # The activations' zero point in the integers the kernel multiplies: VNNI reads
        # xq + 128, whose zero point is zx + 128.
        zero_point = m.zx + vnni_kernel.ACTIVATION_SHIFT if plan else m.zx
        # Weight sums per output channel: what the zero point contributes to every accumulator.
        reduce_axes = (1, 2, 3) if m.op == "relax.nn.conv2d" else (0,)
        weight_sum = m.wq.astype(np.int64).sum(axis=reduce_axes)
        offset = -zero_point * weight_sum
        if m.bias_int is not None:
            offset = offset + m.bias_int
        if np.abs(offset).max(initial=0) >= 2**31:
            raise PipelineError("an int32 bias overflows; re-quantize with --per-channel or another --method")
        per_channel_shape = (1, -1, 1, 1) if m.op == "relax.nn.conv2d" and plan is None else (-1,)

        def channel_const(values: np.ndarray, dtype: str) -> relax.Expr:
            return relax.const(np.asarray(values, dtype).reshape(per_channel_shape), dtype)

        weight = relax.const(m.wq, "int8")
        if plan is not None:
            acc = self._vnni_matmul(xq, m.wq, plan)
        elif m.op == "relax.nn.conv2d":
            attrs = m.call.attrs
            padding = [int(p) for p in attrs.padding]  # (top, left, bottom, right)
            if m.zx != 0 and any(padding):
                # Pad with the zero point: in the integer domain that is the real value 0.
                top, left, bottom, right = padding
                xq = self._emit(
                    relax.op.nn.pad(xq, [0, 0, 0, 0, top, bottom, left, right], pad_value=float(m.zx)),
                    "pad_zx",
                )
                padding = [0, 0, 0, 0]
            acc = self._emit(
                relax.op.nn.conv2d(
                    xq, weight, strides=[int(s) for s in attrs.strides], padding=padding,
                    dilation=[int(d) for d in attrs.dilation], groups=int(attrs.groups),
                    data_layout="NCHW", kernel_layout="OIHW", out_dtype="int32",
                ),
                "conv_i32",
            )
        else:
            acc = self._emit(relax.op.matmul(xq, weight, out_dtype="int32"), "matmul_i32")
        if np.any(offset != 0):
            acc = self._emit(relax.op.add(acc, channel_const(offset, "int32")), "acc_i32")
        real = self._emit(relax.op.astype(acc, "float32"), "acc_f32")

        # Requantize epilogue: one multiply per channel, round, add zero point, clip, cast.
        accumulator_scale = (m.sx * m.sw).astype(np.float32)
        if m.sy is None:
            out = self._emit(relax.op.multiply(real, channel_const(accumulator_scale, "float32")), "dequant")
            if m.bias_float is not None:
                out = self._emit(relax.op.add(out, channel_const(m.bias_float, "float32")), "bias")
            return out
        scaled = self._emit(
            relax.op.multiply(real, channel_const(accumulator_scale / np.float32(m.sy), "float32")), "requant"
        )
        if m.bias_float is not None:
            scaled = self._emit(
                relax.op.add(scaled, channel_const(m.bias_float / np.float32(m.sy), "float32")), "bias"
            )
        rounded = self._emit(relax.op.round(scaled), "round")
        if m.zy:
            rounded = self._emit(relax.op.add(rounded, relax.const(float(m.zy), "float32")), "zero_point")
        clipped = self._emit(
            relax.op.clip(rounded, relax.prim_value(float(INT8_MIN)), relax.prim_value(float(INT8_MAX))), "clip"
        )
        return relax.op.astype(clipped, "int8")


def lower_qdq_to_integer(mod: tvm.IRModule, report: Int8Report | None = None, vnni: bool = False) -> tvm.IRModule:
    """Rewrite every provable dequantize -> conv2d/matmul -> quantize chain of every Relax
    function in `mod` into integer compute; counts go to `report`. `vnni`: compute the
    matmuls that fit it with the AVX-512 VNNI kernel (only for targets that have it)."""
    report = report if report is not None else Int8Report()
    lowered = mod.clone()  # a pass must not change the module it is given
    for gvar, func in mod.functions.items():
        if not isinstance(func, relax.Function):
            continue
        matches = _find_matches(func, report)
        if matches:
            lowering = _Lowering(lowered, matches, report, vnni)
            rewritten = lowering.visit_expr(func)
            lowered = lowering.builder_.get()  # the module with the VNNI kernels it added
            lowered.update_func(gvar, rewritten)
    # The float conv2d/matmul and the weight dequantizes they read are now unused.
    return relax.transform.DeadCodeElimination()(lowered)


# The name of the lowering's result on the module it returns (pass_results.py): Int8Report.to_dict().
INT8_RESULT = "int8"


def int8_lowering_pass(vnni: bool = False) -> tvm.transform.Pass:
    """`lower_qdq_to_integer` as a module pass, for a Relax pass list: what it lowered travels
    on the module it returns, as its result INT8_RESULT (read with pass_results.take_results)."""

    @tvm.transform.module_pass(opt_level=0, name="LowerQDQToInteger")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        report = Int8Report()
        return pass_results.with_result(lower_qdq_to_integer(mod, report, vnni), INT8_RESULT, report.to_dict())

    return _pass


# ---------------------------------------------------------------------------
# Inspection (what the tests and the compile manifest check)


def compute_ops(mod: tvm.IRModule) -> list[dict[str, Any]]:
    """Every conv2d/matmul left in the Relax functions: its input dtypes and output dtype."""
    found: list[dict[str, Any]] = []

    def visit(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name in COMPUTE_OPS:
            found.append({
                "op": expr.op.name.split(".")[-1],
                "inputs": [_dtype(arg) for arg in expr.args],
                "output": _dtype(expr),
            })

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found


def primfunc_compute_dtypes(mod: tvm.IRModule) -> list[dict[str, Any]]:
    """After legalization: each PrimFunc that reduces a product (conv2d, matmul) with the
    dtypes of what it multiplies and of what it accumulates into."""
    found = []
    for gvar, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        name = str(gvar.name_hint)
        if "conv2d" not in name and "matmul" not in name:
            continue
        params = prim_func_buffers(func)
        found.append({
            "name": name,
            "inputs": [str(p.dtype) for p in params[:2]],
            "output": str(params[-1].dtype),
        })
    return found

