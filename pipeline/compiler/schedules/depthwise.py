"""Default CPU schedule for channels-last depthwise convolutions (ConvNeXt's 7x7).

After pipeline/compiler/layout.py a depthwise convolution is TOPI's `group_conv2d_nhwc` with an
HWOI kernel: out[n, y, x, c] = sum over (ry, rx) of in[n, y+ry, x+rx, c] * w[ry, rx, c].
Channels are contiguous in the input, the kernel and the output, so the natural kernel
keeps a register tile of a few output pixels x one or two vectors of channels, walks the
49 taps over it and writes it once, with the bias epilogue applied on the way out.

Measured on znver4, 2 threads, ConvNeXt-T at 224, batch 1 (each kernel built alone):
stage 1 (56x56x96) 0.73 ms as lowered -> 0.25 ms, stage 3 (14x14x384) 0.33 -> 0.08 ms;
the NCHW kernels they replace took 0.43 and 0.12 ms after tuning.
"""

from __future__ import annotations

import tvm
from tvm.s_tir import Schedule

from pipeline.compiler.kernel_kinds import depthwise_block

# Output pixels along W per register tile, at most (the largest divisor of W up to it).
_MAX_PIXELS = 8
_MIN_PARALLEL_ROWS = 16


def _largest_divisor(n: int, cap: int) -> int:
    return max(d for d in range(1, max(1, min(n, cap)) + 1) if n % d == 0)


def inline_epilogue(sch: Schedule, conv) -> list:
    """Inline the elementwise chain after the convolution (bias, requantize) into its last
    block where TVM can; the blocks left are returned in order."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in blocks]
    after = blocks[names.index(sch.get(conv).name_hint) + 1:]
    kept = []
    for block in after[:-1]:
        try:
            sch.compute_inline(block)
        except tvm.s_tir.schedule.ScheduleError:
            kept.append(block)
    return [*kept, *after[-1:]]


def depthwise_nhwc_schedule(task_mod: tvm.IRModule, vector_lanes: int) -> Schedule | None:
    """The register-tiled schedule of a depthwise NHWC task, None if it has no such block."""
    sch = Schedule(task_mod, seed=1)
    conv = depthwise_block(sch)
    if conv is None:
        return None
    producers = [b for b in sch.get_producers(conv) if sch.get(b).name_hint.startswith("pad")]
    epilogue = inline_epilogue(sch, conv)
    n, y, x, c, ry, rx, rc = sch.get_loops(conv)
    width, channels = int(sch.get(x).extent), int(sch.get(c).extent)
    # Two vectors of channels per tile where they divide the channels, else one (or less).
    lanes = next((v for v in (2 * vector_lanes, vector_lanes) if channels % v == 0), None)
    lanes = lanes or _largest_divisor(channels, vector_lanes)
    x_outer, x_inner = sch.split(x, [None, _largest_divisor(width, _MAX_PIXELS)])
    c_outer, c_inner = sch.split(c, [None, lanes])
    sch.reorder(n, y, x_outer, c_outer, ry, rx, rc, x_inner, c_inner)
    # Rows in parallel; 7x7 maps have too few rows for the cores alone: rows x pixel tiles.
    rows = int(sch.get(y).extent)
    sch.parallel(sch.fuse(n, y, x_outer) if rows < _MIN_PARALLEL_ROWS else sch.fuse(n, y))
    tile = sch.cache_write(conv, 0, "local")
    sch.reverse_compute_at(tile, c_outer)
    for block in epilogue:
        sch.reverse_compute_at(block, c_outer)
    sch.vectorize(c_inner)
    sch.unroll(x_inner)
    for block in [tile, *epilogue]:
        sch.vectorize(sch.get_loops(block)[-1])
    # Vectorize first: a loop holding a reduction's update without its init is not one
    # TVM can vectorize.
    init = sch.decompose_reduction(conv, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    for pad in producers:
        loops = sch.get_loops(pad)
        sch.parallel(sch.fuse(*loops[:2]))
        sch.vectorize(loops[-1])
    return sch
