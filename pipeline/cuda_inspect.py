"""Read the GPU machine code inside a compiled library, without a GPU.

A CUDA artifact embeds its kernels as a fatbin inside TVM's serialized module tree
(pipeline/tvm_backend.py), not in an ELF ``.nv_fatbin`` section, so ``cuobjdump`` cannot
find them in the library itself. The fatbin containers are cut out by their header
(pipeline/cross.py reads the same headers) and handed to ``cuobjdump`` one by one:
``-sass`` disassembles the SASS (through ``nvdisasm``), ``-ptx`` prints the PTX. Both
tools come with a CUDA toolkit, or alone from the PyPI packages nvidia-cuda-cuobjdump
and nvidia-cuda-nvdisasm (dependencies here, on x86-64).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from pipeline.cross import FATBIN_MAGIC
from pipeline.errors import PipelineError


def fatbins(data: bytes) -> list[bytes]:
    """Every fatbin container in ``data`` (16-byte header: magic, version 1, header size
    16, u64 size of the entries that follow), in file order."""
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
