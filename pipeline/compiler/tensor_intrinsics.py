"""Tensor intrinsics for MetaSchedule and for schedules that tensorize (VNNI), loaded fast.

TVM 0.27: tensor intrinsics load slowly enough to break MetaSchedule on a small machine.

TuneContext and every LocalBuilder worker import tvm.s_tir.tensor_intrin, which parses
~250 TVMScript intrinsics; the parser calls inspect.stack() for each, and that reads the
source context of every frame, scanning all of sys.modules per frame. Here (2 busy cores,
~2000 modules) the import takes 45-95 s, so a builder with the default 30 s timeout kills
every worker before its first build and nothing is ever measured. The parser only reads
the frame objects and the current line of each frame, which the stand-in below gives
without the scan: the import takes ~4 s.
"""

from __future__ import annotations

import inspect
import linecache
import sys


def _frames_without_source_scan(context: int = 1) -> list[inspect.FrameInfo]:
    frame = sys._getframe(1)
    frames = []
    while frame is not None:
        code = frame.f_code
        line = linecache.getline(code.co_filename, frame.f_lineno)
        frames.append(inspect.FrameInfo(
            frame, code.co_filename, frame.f_lineno, code.co_name, [line] if line else None, 0 if line else None,
        ))
        frame = frame.f_back
    return frames


def load_tensor_intrinsics() -> None:
    """Import tvm.s_tir.tensor_intrin quickly (also the LocalBuilder worker initializer),
    and register the pipeline's own VNNI intrinsic (pipeline/compiler/vnni.py)."""
    from pipeline.compiler import vnni

    vnni.register_intrinsic()
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    original = inspect.stack
    inspect.stack = _frames_without_source_scan
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = original
