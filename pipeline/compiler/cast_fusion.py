"""A cast of a depthwise convolution's input joins the convolution's kernel (GPU, fp16).

In mixed precision ConvNeXt's residual stream stays float32 (the GEMM epilogue adds the
residual in float32) and each block's 7x7 depthwise convolution reads it in float16. TVM's
FuseOps never fuses an elementwise producer into a convolution (only into injective or
reduction consumers), so each block paid a kernel of its own for that cast: 18 launches
per ConvNeXt-T inference, each writing a float16 copy the convolution then read back.
After FuseOps, this pass moves such a cast into the convolution's fused function
(producer_fusion.py), where FuseTIR makes one kernel of them and the depthwise schedule
(schedules/gpu_depthwise.py) converts on the copy of the input tile into shared memory.
"""

from __future__ import annotations

import tvm
from tvm import relax

from pipeline.compiler.producer_fusion import fuse_producers, is_call_tir
from pipeline.compiler.kernel_kinds import is_depthwise_nhwc
from pipeline.compiler.tvm_compat import prim_func_buffers


def _is_cast(func) -> bool:
    """An elementwise PrimFunc of one input and one output whose dtypes differ."""
    if not isinstance(func, tvm.tirx.PrimFunc) or len(func.params) != 2:
        return False
    if int((func.attrs or {}).get("op_pattern", -1)) != 0:  # kElemWise (AnnotateTIROpPattern)
        return False
    source, result = prim_func_buffers(func)
    return str(source.dtype) != str(result.dtype) and [int(d) for d in source.shape] == [int(d) for d in result.shape]


def _depthwise_group(mod: tvm.IRModule, group: relax.Function) -> bool:
    """Whether the fused function ``group`` is one around a depthwise convolution."""
    for block in group.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if is_call_tir(value):
                callee = mod[value.args[0]]
                if isinstance(callee, tvm.tirx.PrimFunc) and is_depthwise_nhwc(callee):
                    return True
    return False


def _cast_of_depthwise_input(mod: tvm.IRModule, producer, group: relax.Function, position: int) -> bool:
    return position == 0 and _is_cast(producer) and _depthwise_group(mod, group)


def fuse_casts_into_depthwise(mod: tvm.IRModule) -> tvm.IRModule:
    """Every ``y = cast(x)`` in ``main`` whose one use is as the first argument of a fused
    depthwise convolution becomes part of that convolution's fused function."""
    return fuse_producers(mod, _cast_of_depthwise_input)


def fuse_casts_into_depthwise_pass() -> tvm.transform.Pass:
    """``fuse_casts_into_depthwise`` as a module pass (after FuseOps, before FuseTIR)."""

    @tvm.transform.module_pass(opt_level=0, name="FuseCastsIntoDepthwise")
    def transform(mod, _ctx):
        return fuse_casts_into_depthwise(mod)

    return transform
