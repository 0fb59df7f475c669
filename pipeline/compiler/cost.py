"""What each GPU kernel must cost at least, known before a GPU sees it: its FLOPs and the
bytes of its arguments, and the time those take at the peak rates of the target's chip
(targets.GPU_PEAKS: the chip each architecture's figures are for), whichever is longer: a
roofline bound per call, times how often the model calls the kernel. A schedule is measured
against it (compile's info, `cost`), so that the kernels furthest from their bound are known
before a GPU session starts.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import tvm
from tvm import relax
from tvm.s_tir.analysis import estimate_tir_flops

from pipeline.compiler.tvm_compat import prim_func_buffers
from targets import GPU_PEAKS, GpuPeaks

# An architecture without figures of its own (a detected GPU newer than the table) is bounded
# at the H200's, and says so.
FALLBACK_ARCH = "sm_90"


def peaks_for(arch: str | None) -> tuple[GpuPeaks, str]:
    """(the peaks a kernel of `arch` is bounded at, where they come from, in words)."""
    if arch in GPU_PEAKS:
        peaks = GPU_PEAKS[arch]
        return peaks, f"{arch}: {peaks.source}"
    peaks = GPU_PEAKS[FALLBACK_ARCH]
    return peaks, f"no figures for {arch or 'this GPU'}: {FALLBACK_ARCH}'s, {peaks.source}"


def _calls(main: relax.Function) -> Counter:
    """How often ``main`` calls each PrimFunc, by name (call_tir before lowering, direct after)."""
    calls: Counter = Counter()

    @relax.expr_functor.visitor
    class _Count(relax.PyExprVisitor):
        def visit_call_(self, call: relax.Call) -> None:
            if isinstance(call.op, tvm.ir.GlobalVar):
                calls[call.op.name_hint] += 1
            elif isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_tir":
                calls[call.args[0].name_hint] += 1
            super().visit_call_(call)

    _Count().visit_expr(main)
    return calls


def _argument_bytes(func: tvm.tirx.PrimFunc) -> int:
    total = 0
    for param in prim_func_buffers(func):
        shape = getattr(param, "shape", None)
        if shape is None:
            continue
        elements = int(np.prod([int(d) for d in shape])) if len(shape) else 1
        total += elements * tvm.runtime.DataType(str(param.dtype)).bits // 8
    return total


def _reads_half(func: tvm.tirx.PrimFunc) -> bool:
    return any(str(getattr(param, "dtype", "")) == "float16" for param in prim_func_buffers(func))


def kernel_costs(mod: tvm.IRModule, arch: str | None = None) -> dict:
    """The roofline bound of every kernel ``main`` calls on a GPU of ``arch`` (default: the
    current TVM target's, as compile's schedule pass runs inside it), most expensive first,
    and the sum."""
    if arch is None:
        current = tvm.target.Target.current(allow_none=True)
        arch = str(current.attrs["arch"]) if current is not None and "arch" in current.attrs else None
    peaks, figures = peaks_for(arch)
    rates = {"fp16_tensor_flops": peaks.fp16_tensor_flops, "fp32_flops": peaks.fp32_flops,
             "memory_bytes": peaks.memory_bytes}
    calls = _calls(mod["main"])
    kernels = []
    for gvar, func in mod.functions.items():
        name = gvar.name_hint
        if not isinstance(func, tvm.tirx.PrimFunc) or not calls.get(name):
            continue
        try:
            flops = float(estimate_tir_flops(tvm.IRModule({"main": func})))
        except Exception:  # noqa: BLE001 -- data movement without arithmetic
            flops = 0.0
        moved = _argument_bytes(func)
        rate = rates["fp16_tensor_flops"] if _reads_half(func) else rates["fp32_flops"]
        bound_s = max(flops / rate, moved / rates["memory_bytes"])
        kernels.append({
            "kernel": name, "calls": calls[name], "flops": flops, "bytes": moved,
            "bound": "compute" if flops / rate >= moved / rates["memory_bytes"] else "memory",
            "roofline_us": round(bound_s * 1e6, 6),
        })
    kernels.sort(key=lambda k: -k["roofline_us"] * k["calls"])
    return {
        "chip": peaks.chip,
        "figures": figures,
        "rates": rates,
        "kernels": kernels,
        "launches": sum(k["calls"] for k in kernels),
        "roofline_ms": round(sum(k["roofline_us"] * k["calls"] for k in kernels) / 1e3, 6),
    }


def roofline_line(cost: dict) -> str:
    """Compile's one line about the bound: whose peaks, the total, the largest kernels."""
    top = ", ".join(f"{k['kernel']} {k['roofline_us'] * k['calls']:.1f} us" for k in cost["kernels"][:3])
    return (f"roofline bound at the {cost['chip']}'s peak rates ({cost['figures']}): {cost['roofline_ms']:.3f} ms "
            f"in {cost['launches']} launches (largest: {top})")
