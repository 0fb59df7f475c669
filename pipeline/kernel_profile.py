"""Per-kernel GPU time of an artifact, from a profiler trace, beside what compile predicted.

The GPU check (benchmarks/gpu_check.py) records a few calls of each artifact with PyTorch's
profiler (CUPTI sees every kernel in the process, TVM's included, also inside a CUDA graph)
and exports the Chrome trace; this module reads that trace. Each kernel's time per
inference is then set beside its rule, grid and roofline bound from compile's ``gpu_cost``
(pipeline/compiler/cost.py), so that a GPU run says which schedules are far from their
bound, and the gap between the sum of kernel times and the measured latency is the time
the GPU spent between kernels (launches, graph overhead).

Standard library only: the GPU machine imports it from the bundle without the compiler.
"""

from __future__ import annotations

import re
import statistics

# TVM names a PrimFunc's device function "<name>_kernel" (and "_kernel_1", ... when one
# PrimFunc launches several); a C++ name in a trace may carry its argument list.
_KERNEL_SUFFIX = re.compile(r"_kernel(_?\d+)?$")


def kernel_name(traced: str) -> str:
    """The PrimFunc name of a traced kernel name."""
    return _KERNEL_SUFFIX.sub("", traced.split("(", 1)[0].strip())


def kernel_times(trace: dict, calls: int) -> list[dict]:
    """Each kernel's launches and GPU microseconds per call of the model, largest first,
    from a Chrome trace (``traceEvents`` of category "kernel", durations in us) recorded
    over ``calls`` calls."""
    if calls < 1:
        raise ValueError(f"calls must be at least 1, not {calls}")
    totals: dict[str, list[float]] = {}
    for event in trace.get("traceEvents", []):
        if event.get("cat") != "kernel" or "dur" not in event:
            continue
        totals.setdefault(kernel_name(event.get("name", "?")), []).append(float(event["dur"]))
    rows = [
        {"kernel": name, "launches": len(durations) / calls, "us": sum(durations) / calls,
         "us_per_launch": sum(durations) / len(durations)}
        for name, durations in totals.items()
    ]
    return sorted(rows, key=lambda row: -row["us"])


def with_costs(times: list[dict], costs: list[dict] | None) -> list[dict]:
    """``times`` with compile's record of each kernel: rule, blocks, threads, its roofline
    bound per call of the model and the measured time's multiple of it, and for tensor-core
    GEMMs the schedule's modeled steps (pipeline/compiler/gpu_cost_model.modeled_steps) and the ns
    each took."""
    by_name = {cost["kernel"]: cost for cost in costs or []}
    rows = []
    for row in times:
        cost = by_name.get(row["kernel"])
        if cost is None:
            rows.append(dict(row))
            continue
        bound = cost["roofline_us"] * cost["calls"]
        rows.append({**row, "rule": cost.get("rule"), "blocks": cost.get("blocks"), "threads": cost.get("threads"),
                     "roofline_us": bound, "x_roofline": row["us"] / bound if bound > 0 else None,
                     **({"modeled_steps": cost["modeled_steps"],
                         "ns_per_step": row["us_per_launch"] * 1e3 / cost["modeled_steps"]}
                        if cost.get("modeled_steps") else {})})
    return rows


def summary(rows: list[dict], latency_ms: float | None) -> dict:
    """Kernel time per call, launches per call, and what of the latency is not kernel time."""
    kernel_us = sum(row["us"] for row in rows)
    result = {"kernel_us": kernel_us, "launches": sum(row["launches"] for row in rows), "kernels": len(rows)}
    if latency_ms is not None:
        result["latency_us"] = latency_ms * 1e3
        result["between_kernels_us"] = latency_ms * 1e3 - kernel_us
    return result


def markdown(rows: list[dict], totals: dict, calls: int, top: int = 20) -> str:
    """The largest ``top`` kernels as a Markdown section."""
    lines = [
        f"## Kernels (GPU time per call, from a profiler trace of {calls} calls)", "",
        f"{totals['kernels']} kernels, {totals['launches']:.0f} launches, {totals['kernel_us']:.1f} us of kernel time"
        + (f" of a {totals['latency_us']:.1f} us median call ({totals['between_kernels_us']:.1f} us between kernels)"
           if "latency_us" in totals else "") + ".", "",
        "| kernel | rule | grid x block | launches | us | % | roofline us | x roofline | model steps (ns each) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows[:top]:
        grid = f"{row['blocks']} x {row['threads']}" if row.get("blocks") else ""
        ratio = f"{row['x_roofline']:.1f}" if row.get("x_roofline") else ""
        bound = f"{row['roofline_us']:.2f}" if "roofline_us" in row else ""
        share = row["us"] / totals["kernel_us"] if totals["kernel_us"] else 0.0
        lines.append(f"| {row['kernel']} | {row.get('rule', '')} | {grid} | {row['launches']:g} | {row['us']:.1f} | "
                     f"{share:.0%} | {bound} | {ratio} | {_model_cell(row)} |")
    if len(rows) > top:
        rest = rows[top:]
        lines.append(f"| {len(rest)} more | | | {sum(r['launches'] for r in rest):g} | "
                     f"{sum(r['us'] for r in rest):.1f} | | | | |")
    step_ns = [row["ns_per_step"] for row in rows if "ns_per_step" in row]
    if step_ns:
        lines += ["", f"Tensor-core GEMMs: {statistics.median(step_ns):.0f} ns per modeled step, median of "
                      f"{len(step_ns)} kernels (the unit of the split-K model's assumptions, "
                      f"pipeline/compiler/gpu_cost_model.py)."]
    return "\n".join(lines) + "\n"


def _model_cell(row: dict) -> str:
    return f"{row['modeled_steps']:g} ({row['ns_per_step']:.0f})" if "ns_per_step" in row else ""
