"""Default schedules of GPU kernels: our own rules for ConvNeXt's heavy kernels (the NHWC
depthwise convolution, gpu_depthwise.py; float16 GEMMs, gpu_matmul.py, and the sums of
split ones, gpu_partial_sums.py; channel LayerNorms, gpu_row_reduction.py) ahead of
dlight's rules, first match wins, in the order of ``rules()``; two of dlight's are
narrowed where TVM 0.27's versions fail instead of declining."""

from __future__ import annotations

import math
import re

import tvm
from tvm.s_tir import dlight
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

from pipeline.compiler.schedules.gpu_depthwise import depthwise_nhwc_gpu_schedule
from pipeline.compiler.schedules.gpu_matmul import TensorCoreMatmul, gemm_plan
from pipeline.compiler.schedules.gpu_partial_sums import partial_sums_schedule
from pipeline.compiler.schedules.gpu_row_reduction import row_reduction_schedule


class _SizedForSMs(GPUScheduleRule):
    """A rule of ours: ``schedule(func, sm_count)`` gives the kernel's schedule, or None
    where the kernel is not one it takes."""

    schedule = None

    def __init__(self, sm_count: int):
        self.sm_count = sm_count

    def apply(self, func, target, tunable):
        if not isinstance(func, tvm.tirx.PrimFunc) or not self.is_target_available(target):
            return None
        return type(self).schedule(func, self.sm_count)


class DepthwiseNHWC(_SizedForSMs):
    """Channels-last depthwise convolutions: shared-memory input tiles, register
    accumulators, a grid of at least ``sm_count`` blocks (gpu_depthwise.py)."""

    schedule = staticmethod(depthwise_nhwc_gpu_schedule)


class RowReductionPerWarp(_SizedForSMs):
    """Row reductions and their elementwise pass (channel LayerNorms): one warp per row,
    warp-shuffle reductions, several rows per block (gpu_row_reduction.py)."""

    schedule = staticmethod(row_reduction_schedule)


class PartialSums(_SizedForSMs):
    """The sum of a split-K GEMM's partial sums with its epilogue: a thread per output,
    the slices added in a register (gpu_partial_sums.py)."""

    schedule = staticmethod(partial_sums_schedule)


class FloatMatmul(dlight.gpu.Matmul):
    """dlight's GPU matmul rule for float kernels only. On int8 operands (pipeline/compiler/int8.py)
    its tensor-core schedule fails to lower in TVM 0.27 ("fragment_info" check in the TIR
    pipeline, ConvNeXt-T's INT8 GEMMs); those kernels get dlight's other rules instead."""

    def apply(self, func, target, tunable):
        if isinstance(func, tvm.tirx.PrimFunc):
            from tvm.s_tir.meta_schedule.arg_info import ArgInfo

            if any(str(info.dtype) in ("int8", "uint8") for info in ArgInfo.from_prim_func(func)):
                return None
        return super().apply(func, target, tunable)


class DecliningGEMV(dlight.gpu.GEMV):
    """dlight's GPU GEMV rule, falling through to the next rule where it cannot apply.

    TVM 0.27: the rule's normalize() asserts that a GEMV-like kernel has a spatial loop
    instead of declining it; a 7x7 depthwise convolution on a 1x1 feature map (every
    32-pixel ConvNeXt at stage 4) has none, and the assert aborted the whole build. A rule
    that declines returns None, which is what this does there.
    """

    def apply(self, func, target, tunable):
        try:
            return super().apply(func, target, tunable)
        except AssertionError:
            return None


def rules(sm_count: int) -> list:
    """The rules for our kernels, most specific first; grids are sized for ``sm_count`` SMs."""
    return [
        DepthwiseNHWC(sm_count), TensorCoreMatmul(sm_count), PartialSums(sm_count), FloatMatmul(), DecliningGEMV(),
        RowReductionPerWarp(sm_count), dlight.gpu.Reduction(), dlight.gpu.GeneralReduction(), dlight.gpu.Fallback(),
    ]


# Bump when the default GPU schedules change: tuning records were timed against the version of
# their day (pipeline/compiler/tuning/database.py), and a record only beat that one.
DEFAULT_SCHEDULE_VERSION = 1


def default_schedule(task_mod: tvm.IRModule, tvm_target, sm_count: int):
    """The default schedule of one kernel ({"main": PrimFunc}) as ``schedule_module`` gives it,
    and its rule's name: the baseline a tuning task starts from, its trace a tuning record."""
    func = task_mod["main"]
    with tvm_target:
        for rule in rules(sm_count):
            schedule = rule.apply(func, tvm_target, False)
            if schedule is not None:
                return (schedule[0] if isinstance(schedule, list) else schedule), type(rule).__name__
    raise ValueError(f"no default GPU schedule applies to {func.attrs.get('global_symbol', 'main')}")


_THREAD_BINDING = re.compile(r'T\.thread_binding\((?:T\.int(?:32|64)\()?(\d+)\)?, thread="(\w+)\.(\w)"\)')


def launch_dims(func: tvm.tirx.PrimFunc) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid, block) of a scheduled kernel as (x, y, z) extents, from its thread bindings
    (read from its TVMScript: TVM 0.27 has no Python visitor of TIR statements)."""
    extents: dict[tuple[str, str], int] = {}
    for extent, kind, axis in _THREAD_BINDING.findall(func.script()):
        extents[kind, axis] = max(extents.get((kind, axis), 1), int(extent))
    grid = tuple(extents.get(("blockIdx", axis), 1) for axis in "xyz")
    block = tuple(extents.get(("threadIdx", axis), 1) for axis in "xyz")
    return grid, block


def launch_shape(func: tvm.tirx.PrimFunc) -> tuple[int, int]:
    """(thread blocks, threads per block) of a scheduled kernel."""
    grid, block = launch_dims(func)
    return math.prod(grid), math.prod(block)


def schedule_module(mod: tvm.IRModule, tvm_target, sm_count: int) -> tuple[tvm.IRModule, dict[str, dict]]:
    """Every GPU kernel not scheduled yet (by a tuning record) gets the first rule that
    applies (what dlight.ApplyDefaultSchedule does), and the rule, grid and block size of
    each are returned by kernel name (for tensor-core GEMMs also ``gemm_plan``'s extents,
    tile and modeled steps): compile's info, and what the tests read."""
    mod = mod.clone()
    kernels: dict[str, dict] = {}
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tvm.tirx.PrimFunc) or "tirx.is_scheduled" in (func.attrs or {}):
            continue
        for rule in rules(sm_count):
            schedule = rule.apply(func, tvm_target, False)
            if schedule is None:
                continue
            scheduled = (schedule[0] if isinstance(schedule, list) else schedule).mod["main"]
            mod.update_func(gv, scheduled.with_attr("tirx.is_scheduled", True))
            blocks, threads = launch_shape(scheduled)
            kernels[gv.name_hint] = {"rule": type(rule).__name__, "blocks": blocks, "threads": threads}
            if isinstance(rule, TensorCoreMatmul):
                kernels[gv.name_hint].update(gemm_plan(func, sm_count) or {})
            break
    return mod, kernels
