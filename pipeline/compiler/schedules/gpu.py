"""Default schedules of GPU kernels: dlight's rules, first match wins, in the order of
``rules()``, with two of them narrowed where TVM 0.27's versions fail instead of declining."""

from __future__ import annotations

import tvm

# TVM 0.27: MetaSchedule moved to tvm.s_tir.meta_schedule and dlight to tvm.s_tir.dlight.
from tvm.s_tir import dlight


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


def rules() -> list:
    """dlight's rules for our kernels, most specific first."""
    return [FloatMatmul(), DecliningGEMV(), dlight.gpu.Reduction(), dlight.gpu.GeneralReduction(), dlight.gpu.Fallback()]


def default_schedule_pass() -> tvm.transform.Pass:
    """Every GPU kernel not scheduled yet (by a tuning record) gets the first rule that applies."""
    return dlight.ApplyDefaultSchedule(*rules())
