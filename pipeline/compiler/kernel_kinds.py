"""Which kind of kernel a PrimFunc is, asked by graph passes (cast_fusion.py fuses a cast into
a depthwise convolution's kernel) and schedule rules (schedules/depthwise.py and
gpu_depthwise.py schedule it) alike, so that neither imports the other.

After pipeline/compiler/layout.py a depthwise convolution is TOPI's `group_conv2d_nhwc` with
an HWOI kernel and one input channel per group.
"""

from __future__ import annotations

import tvm
from tvm.s_tir import Schedule


def depthwise_block(sch: Schedule):
    """The group_conv2d_nhwc block with one input channel per group, or None."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if not sch.get(block).name_hint.startswith("group_conv2d_nhwc"):
            continue
        loops = sch.get_loops(block)
        if len(loops) == 7 and int(sch.get(loops[6]).extent) == 1:  # n y x c ry rx rc
            return block
    return None


def is_depthwise_nhwc(func: tvm.tirx.PrimFunc) -> bool:
    return depthwise_block(Schedule(tvm.IRModule({"main": func}))) is not None
