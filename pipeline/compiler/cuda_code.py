"""The GPU code inside a compiled library, read without a GPU.

``cuda_device_code`` lists the fatbin entries (SASS per sm_XX, PTX per compute_XX) from
their headers in the library's bytes; compile uses it to prove an artifact holds kernels
for its architecture. ``disassemble`` prints their SASS or PTX: a CUDA artifact embeds its
kernels as a fatbin inside TVM's serialized module tree (pipeline/compiler/backend.py), not in
an ELF ``.nv_fatbin`` section, so ``cuobjdump`` cannot find them in the library itself; the
fatbin containers are cut out by their header and handed to ``cuobjdump`` one by one:
``-sass`` disassembles the SASS (through ``nvdisasm``), ``-ptx`` prints the PTX. Both
tools come with a CUDA toolkit, or alone from the PyPI packages nvidia-cuda-cuobjdump
and nvidia-cuda-nvdisasm (dependencies here, on x86-64).
"""

from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass
import subprocess
import tempfile
from pathlib import Path

from pipeline.errors import PipelineError


FATBIN_MAGIC = 0xBA55ED50
_FATBIN_KINDS = {1: "ptx", 2: "sass"}


@dataclass(frozen=True)
class DeviceCode:
    """One entry of a CUDA fatbin: SASS (a cubin, runs as is) or PTX (JIT-compiled)."""

    kind: str  # "sass" or "ptx"
    arch: str  # "sm_87" for SASS, "compute_87" for PTX

    def __str__(self) -> str:
        return f"{self.kind}:{self.arch}"


def fatbins(data: bytes) -> list[bytes]:
    """Every fatbin container in ``data``, found by magic number, in file order.

    Fatbin layout (CUDA 10 .. 13): a 16-byte header (u32 magic, u16 version 1, u16 header
    size 16, u64 size of the entries), then entries, each with a header of u16 kind
    (1 PTX, 2 ELF), u16 version, u32 header size, u64 payload size, and the sm number
    as u32 at offset 28.
    """
    found = []
    magic = struct.pack("<I", FATBIN_MAGIC)
    start = data.find(magic)
    while start != -1:
        if start + 16 <= len(data):
            _, version, header_size, body_size = struct.unpack_from("<IHHQ", data, start)
            end = start + header_size + body_size
            if version == 1 and header_size == 16 and end <= len(data):
                found.append(data[start:end])
                start = end - 1
        start = data.find(magic, start + 1)
    return found


def fatbin_entries(data: bytes) -> list[DeviceCode]:
    """Every entry of every fatbin in `data`, parsed from its header (layout: ``fatbins``)."""
    entries: list[DeviceCode] = []
    for container in fatbins(data):
        offset = 16
        while offset + 32 <= len(container):
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", container, offset)
            (sm,) = struct.unpack_from("<I", container, offset + 28)
            if kind in _FATBIN_KINDS and entry_header >= 32:
                prefix = "sm" if kind == 2 else "compute"
                entries.append(DeviceCode(_FATBIN_KINDS[kind], f"{prefix}_{sm}"))
            if entry_header == 0:
                break
            offset += entry_header + payload
    return entries


def cuda_device_code(library: Path) -> list[DeviceCode]:
    """The GPU code a compiled library carries (empty: none, e.g. CUDA source only)."""
    return fatbin_entries(Path(library).read_bytes())


def cuobjdump_path() -> str | None:
    """cuobjdump from the PATH, else the one the nvidia-cuda-cuobjdump wheel installs."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import nvidia  # namespace package of NVIDIA's CUDA wheels
    except ImportError:
        return None
    for root in getattr(nvidia, "__path__", []):
        for candidate in sorted(Path(root).glob("cu*/bin/cuobjdump")):
            if candidate.is_file():
                return str(candidate)
    return None


def disassemble(library: Path, what: str = "sass") -> str:
    """The SASS (``what="sass"``) or PTX (``"ptx"``) of every kernel in ``library``."""
    if what not in ("sass", "ptx"):
        raise ValueError(f"what must be 'sass' or 'ptx', not {what!r}")
    tool = cuobjdump_path()
    if tool is None:
        raise PipelineError(
            "cuobjdump is not installed; pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm "
            "(or install a CUDA toolkit)"
        )
    containers = fatbins(Path(library).read_bytes())
    if not containers:
        raise PipelineError(f"{library} holds no CUDA device code")
    listings = []
    with tempfile.TemporaryDirectory(prefix="convnext-fatbin-") as tmp:
        for index, container in enumerate(containers):
            path = Path(tmp) / f"kernels{index}.fatbin"
            path.write_bytes(container)
            # cuobjdump -sass runs nvdisasm, which the wheels install beside it.
            env = {**os.environ, "PATH": f"{Path(tool).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
            result = subprocess.run([tool, f"-{what}", str(path)], capture_output=True, text=True, env=env)
            if result.returncode != 0:
                raise PipelineError(f"cuobjdump -{what} failed on {library}: {result.stderr.strip()}")
            listings.append(result.stdout)
    return "\n".join(listings)
