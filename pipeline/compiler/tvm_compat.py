"""TVM's private corners, in one place: what the pipeline relies on that TVM does not offer
as an API, each written against TVM 0.27.0.post1 (WRITTEN_FOR) and checked by its tests
there. On a TVM upgrade, this module is the list to read first.

- ``fatbin_module_blob``: TVM's module serialization, parsed and rewritten byte by byte, so
  that an artifact carries nvcc's fatbin instead of CUDA source.
- ``cuda_codegen_as_source``: the process-wide environment switch that makes TVM keep CUDA
  kernels as source on every machine, GPU or not.
- ``export_with_packer``: Executable.export_library drops ``fpack_imports``; its ``.mod``
  passes it on.
- ``import_tensor_intrinsics_fast``: inspect.stack replaced while TVM's ~250 tensor
  intrinsics are parsed, which took 45-95 s here otherwise.

Quirks of the IR that several modules read the same way, each said once here:

- ``prim_func_buffers``: a PrimFunc's parameters are its buffers (no buffer_map).
- ``is_constant`` and ``constant_value``: a Relax constant is a tvm.ir.expr.GenericConst
  (relax.Constant is gone).

Renamed public APIs of the pinned version are not corners. Used in many places, they are
listed here rather than beside each use: TIR lives in ``tvm.tirx`` (was ``tvm.tir``);
MetaSchedule, the TensorIR schedule and dlight in ``tvm.s_tir`` (were
``tvm.meta_schedule``, ``tvm.tir.schedule``, ``tvm.dlight``); an expression's type is
``.ty`` (was ``.struct_info``), a function's return type ``.ret_ty`` (was
``.ret_struct_info``), call_tir's ``out_ty`` (was ``out_sinfo``), a relax.Var's name
``.name`` (was ``.name_hint``). Block iterator kinds are compared with
tvm.tirx.IterVar.DataPar and .CommReduce. A rename used in one module says so beside it
("TVM 0.27: ...").
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import os
import struct
import sys
from typing import Callable

import numpy as np
import tvm

WRITTEN_FOR = "0.27.0.post1"


def prim_func_buffers(func: tvm.tirx.PrimFunc) -> list:
    """A PrimFunc's buffers in parameter order, each with its ``.shape`` and ``.dtype``.
    TVM 0.27: a PrimFunc's parameters are its buffers; there is no buffer_map."""
    return list(func.params)


def is_constant(expr) -> bool:
    """Whether a Relax expression is a constant tensor. TVM 0.27: relax.Constant is gone;
    relax.const makes a tvm.ir.expr.GenericConst whose ``.value`` is a runtime Tensor."""
    return isinstance(expr, tvm.ir.expr.GenericConst) and hasattr(expr.value, "numpy")


def constant_value(expr) -> np.ndarray:
    """The value of a Relax constant (see is_constant) as a numpy array."""
    return expr.value.numpy()

# ---------------------------------------------------------------------------
# CUDA kernels as source, compiled by nvcc at export
#
# Without libcuda.so.1 (any machine with no GPU driver) TVM's CUDA runtime module does not
# load, so codegen silently keeps the kernels as CUDA *source* in a placeholder module
# (CUDAFallbackModuleNode), which a GPU machine would have to JIT-compile at load time with
# NVRTC or nvcc. Artifacts must carry machine code instead, so for CUDA targets the pipeline
# always takes that source path (TVM_COMPILE_FORCE_FALLBACK=1, the same on machines with and
# without a GPU), compiles the source with nvcc for the target's sm_XX at export time, and
# writes the module as a fatbin (SASS for sm_XX plus PTX for newer GPUs).

_FORCE_FALLBACK = "TVM_COMPILE_FORCE_FALLBACK"


@contextlib.contextmanager
def cuda_codegen_as_source():
    """Within: TVM keeps CUDA kernels as source modules, GPU or not. The switch is an
    environment variable TVM reads at codegen, so it holds for the whole process while set."""
    previous = os.environ.get(_FORCE_FALLBACK)
    os.environ[_FORCE_FALLBACK] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[_FORCE_FALLBACK]
        else:
            os.environ[_FORCE_FALLBACK] = previous


def _u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def _string(value: bytes) -> bytes:
    return _u64(len(value)) + value


def fatbin_module_blob(blob: bytes, sources: list[str], compile_source: Callable[[str], bytes]) -> tuple[bytes, int]:
    """Rewrite the "cuda" modules of a serialized module tree from source to fatbin.

    TVM 0.27 (tvm-ffi) serialization, every integer u64 little-endian, strings and byte
    strings length-prefixed: total length, import-tree row pointers (vector), child
    indices (vector), then per module its kind and, unless the kind is "_lib", its bytes.
    A CUDA module's bytes are: format, function table, code; the code is the CUDA source
    for format "cuda". Only the format and the code change; the function table is kept
    byte for byte. Returns the new blob and the number of modules rewritten.
    """
    view = memoryview(blob)
    offset = 0

    def read_u64() -> int:
        nonlocal offset
        (value,) = struct.unpack_from("<Q", view, offset)
        offset += 8
        return value

    def read_bytes() -> bytes:
        nonlocal offset
        size = read_u64()
        value = bytes(view[offset:offset + size])
        offset += size
        return value

    if read_u64() != len(blob) - 8:
        raise RuntimeError("unexpected TVM module serialization: length header mismatch")
    header_start = offset
    row_ptr = [read_u64() for _ in range(read_u64())]
    for _ in range(read_u64()):
        read_u64()
    out = [bytes(view[header_start:offset])]
    encoded_sources = [source.encode() for source in sources]
    rewritten = 0
    for _ in range(len(row_ptr) - 1):
        kind = read_bytes()
        out.append(_string(kind))
        if kind == b"_lib":
            continue
        payload = read_bytes()
        fmt_length = struct.unpack_from("<Q", payload, 0)[0]
        if kind == b"cuda" and payload[8:8 + fmt_length] == b"cuda":
            source = next(
                (s for s in encoded_sources if payload.endswith(_string(s))), None
            )
            if source is None:
                raise RuntimeError("unexpected TVM module serialization: CUDA source not found")
            function_table = payload[8 + fmt_length:len(payload) - len(source) - 8]
            payload = _string(b"fatbin") + function_table + _string(compile_source(source.decode()))
            rewritten += 1
        out.append(_string(payload))
    if offset != len(blob):
        raise RuntimeError("unexpected TVM module serialization: trailing bytes")
    body = b"".join(out)
    return _u64(len(body)) + body, rewritten


def export_with_packer(executable, path: str, fcompile, fpack_imports) -> None:
    """Link a Relax executable with a custom import packer: Executable.export_library does
    not pass ``fpack_imports`` on; its ``.mod`` does."""
    executable.mod.export_library(path, fcompile=fcompile, fpack_imports=fpack_imports)


# ---------------------------------------------------------------------------
# Tensor intrinsics, imported fast
#
# TuneContext and every LocalBuilder worker import tvm.s_tir.tensor_intrin, which parses
# ~250 TVMScript intrinsics; the parser calls inspect.stack() for each, and that reads the
# source context of every frame, scanning all of sys.modules per frame. Here (2 busy cores,
# ~2000 modules) the import takes 45-95 s, so a builder with the default 30 s timeout kills
# every worker before its first build and nothing is ever measured. The parser only reads
# the frame objects and the current line of each frame, which the stand-in below gives
# without the scan: the import takes ~4 s.


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


def import_tensor_intrinsics_fast() -> None:
    """Import tvm.s_tir.tensor_intrin with inspect.stack replaced by a stand-in that does
    not scan every module's source, restored afterwards."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    original = inspect.stack
    inspect.stack = _frames_without_source_scan
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = original
