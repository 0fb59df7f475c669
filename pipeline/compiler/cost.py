"""What each GPU kernel must cost at least, known before a GPU sees it: its FLOPs and the
bytes of its arguments, and the time those take at the rates of the GPU the check runs on
(an H200), whichever is longer: a roofline bound per call, times how often the model calls
the kernel. A schedule is measured against it (compile's info, `cost`), so that the kernels
furthest from their bound are known before a GPU session starts.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import tvm
from tvm import relax
from tvm.s_tir.analysis import estimate_tir_flops

# NVIDIA H200 (sm_90): fp16 tensor-core rate and HBM3e bandwidth as measured on the lent
# machine (issue #16), and the FP32 CUDA-core peak of its data sheet.
RATES = {"fp16_tensor_flops": 790e12, "fp32_flops": 67e12, "memory_bytes": 4.3e12}


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
    # TVM 0.27: a PrimFunc's parameters are its buffers (shape, dtype); there is no buffer_map.
    total = 0
    for param in func.params:
        shape = getattr(param, "shape", None)
        if shape is None:
            continue
        elements = int(np.prod([int(d) for d in shape])) if len(shape) else 1
        total += elements * tvm.runtime.DataType(str(param.dtype)).bits // 8
    return total


def _reads_half(func: tvm.tirx.PrimFunc) -> bool:
    return any(str(getattr(param, "dtype", "")) == "float16" for param in func.params)


def kernel_costs(mod: tvm.IRModule) -> dict:
    """The roofline bound of every kernel ``main`` calls, most expensive first, and the sum."""
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
        rate = RATES["fp16_tensor_flops"] if _reads_half(func) else RATES["fp32_flops"]
        bound_s = max(flops / rate, moved / RATES["memory_bytes"])
        kernels.append({
            "kernel": name, "calls": calls[name], "flops": flops, "bytes": moved,
            "bound": "compute" if flops / rate >= moved / RATES["memory_bytes"] else "memory",
            "roofline_us": round(bound_s * 1e6, 6),
        })
    kernels.sort(key=lambda k: -k["roofline_us"] * k["calls"])
    return {
        "rates": RATES,
        "kernels": kernels,
        "launches": sum(k["calls"] for k in kernels),
        "roofline_ms": round(sum(k["roofline_us"] * k["calls"] for k in kernels) / 1e3, 6),
    }
