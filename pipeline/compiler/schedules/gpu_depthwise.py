"""Default GPU schedule for channels-last depthwise convolutions (ConvNeXt's 7x7).

out[n, y, x, c] = sum over (ry, rx) of in[n, y+ry, x+rx, c] * w[ry, rx, c], then the
elementwise epilogue (bias, casts); a cast of the input is applied on the copy into shared
memory. dlight has no rule for it: its GeneralReduction rule
made each output one 256-thread block with 49 threads busy (80% of ConvNeXt-T's time on
an H200, batch 8). Here a thread block computes an output tile of TH rows x TW pixels x
CT channels: it copies the input tile with its 3-pixel halo into shared memory once
(the zero padding is applied on that copy), then each thread accumulates PX neighbouring
pixels of one channel in fp32 registers over the 49 taps, each tap's weight loaded once
for its PX pixels, and writes them through the epilogue. Channels are the fastest thread
index, so global loads and stores of a warp touch consecutive channels.

The tile is chosen from the shape alone: the widest channel tile that keeps a block at
most 512 threads and still gives the grid at least one block per SM (``sm_count``),
so that every SM has work at batch 1 as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm.s_tir import Schedule

from pipeline.compiler.kernel_kinds import depthwise_block
from pipeline.compiler.schedules.depthwise import inline_epilogue

_MAX_THREADS = 512
_MIN_THREADS = 32
_MAX_ROWS = 8
_MAX_PIXELS_PER_ROW = 16
_MAX_PIXELS_PER_THREAD = 4
_CHANNEL_TILES = (64, 32, 16, 8, 4, 2, 1)
_COPY_LANES = 4  # channels per thread and instruction in the copy of the input tile


def _divisors_up_to(n: int, cap: int) -> list[int]:
    return [d for d in range(min(n, cap), 0, -1) if n % d == 0]


@dataclass(frozen=True)
class DepthwiseTile:
    """One thread block's output tile: rows x pixels x channels, PX pixels per thread."""
    rows: int
    pixels: int
    channels: int
    pixels_per_thread: int

    @property
    def threads(self) -> int:
        return self.rows * (self.pixels // self.pixels_per_thread) * self.channels

    def blocks(self, batch: int, height: int, width: int, channels: int) -> int:
        return batch * (height // self.rows) * (width // self.pixels) * (channels // self.channels)


def choose_tile(batch: int, height: int, width: int, channels: int, sm_count: int) -> DepthwiseTile:
    """The tile of an NHWC depthwise output (batch, height, width, channels): widest
    channel tile first, then most rows, among those with _MIN_THREADS.._MAX_THREADS
    threads whose grid fills ``sm_count`` SMs; else the one with the most blocks."""
    per_thread = _divisors_up_to(width, _MAX_PIXELS_PER_THREAD)[0]
    pixels = next(d for d in _divisors_up_to(width, _MAX_PIXELS_PER_ROW) if d % per_thread == 0)
    candidates = [
        DepthwiseTile(rows, pixels, tile_channels, per_thread)
        for tile_channels in _CHANNEL_TILES if channels % tile_channels == 0
        for rows in _divisors_up_to(height, _MAX_ROWS)
    ]
    sized = [t for t in candidates if _MIN_THREADS <= t.threads <= _MAX_THREADS] or [
        t for t in candidates if t.threads <= _MAX_THREADS]
    for tile in sized:
        if tile.blocks(batch, height, width, channels) >= sm_count:
            return tile
    return max(sized, key=lambda t: (t.blocks(batch, height, width, channels), t.threads))


def depthwise_nhwc_gpu_schedule(func: tvm.tirx.PrimFunc, sm_count: int) -> Schedule | None:
    """The tiled schedule of a fused NHWC depthwise kernel, None if ``func`` is not one."""
    sch = Schedule(tvm.IRModule({"main": func}))
    conv = depthwise_block(sch)
    if conv is None:
        return None
    pads = [b for b in sch.get_producers(conv) if sch.get(b).name_hint.startswith("pad")]
    epilogue = inline_epilogue(sch, conv)
    n, y, x, c, ry, rx, rc = sch.get_loops(conv)
    batch, height, width, channels = (int(sch.get(loop).extent) for loop in (n, y, x, c))
    tile = choose_tile(batch, height, width, channels, sm_count)

    y_outer, y_inner = sch.split(y, [None, tile.rows])
    x_outer, x_thread, x_pixel = sch.split(x, [None, tile.pixels // tile.pixels_per_thread, tile.pixels_per_thread])
    c_outer, c_inner = sch.split(c, [None, tile.channels])
    sch.reorder(n, y_outer, x_outer, c_outer, y_inner, x_thread, c_inner, ry, rx, rc, x_pixel)
    block_index = sch.fuse(n, y_outer, x_outer, c_outer)
    thread_index = sch.fuse(y_inner, x_thread, c_inner)
    sch.bind(block_index, "blockIdx.x")
    sch.bind(thread_index, "threadIdx.x")

    # The input tile and its halo, copied once per block by all its threads, 4 channels
    # per thread and instruction (16-byte float32 loads; the pixel loops stay outside the
    # vector, so that the bounds check is one per pixel and the loads stay vectors); the
    # padding becomes that bounds check, and a cast of the input (the float32 residual
    # stream in fp16 models, pipeline/compiler/cast_fusion.py) a conversion on the copy.
    if pads:
        for pad in pads:
            for producer in sch.get_producers(pad):
                sch.compute_inline(producer)
        input_tile = sch.cache_read(conv, 0, "shared")
        sch.compute_at(input_tile, block_index)
        for pad in pads:
            sch.compute_inline(pad)
        *pixel_loops, channel = sch.get_loops(input_tile)[1:]
        lanes = _COPY_LANES if tile.channels % _COPY_LANES == 0 else 1
        channel_outer, channel_lanes = sch.split(channel, [None, lanes])
        copy = sch.fuse(*pixel_loops, channel_outer)
        _, copy_thread = sch.split(copy, [None, tile.threads])
        sch.bind(copy_thread, "threadIdx.x")
        sch.vectorize(channel_lanes)

    # Per filter row, each thread reads the PX + 6 inputs and 7 weights it needs once into
    # registers: 49 taps x PX pixels then multiply registers, not shared memory.
    input_row = sch.cache_read(conv, 0, "local")
    sch.compute_at(input_row, ry)
    weight_row = sch.cache_read(conv, 1, "local")
    sch.compute_at(weight_row, ry)

    # Each thread's PX accumulators live in registers; the epilogue reads them there.
    if not epilogue:
        epilogue = [sch.cache_write(conv, 0, "local")]
    else:
        sch.set_scope(conv, 0, "local")
    for block in epilogue:
        sch.reverse_compute_at(block, thread_index)
    sch.decompose_reduction(conv, ry)
    sch.unroll(ry)
    sch.unroll(rx)
    sch.unroll(x_pixel)
    return sch
