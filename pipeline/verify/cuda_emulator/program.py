"""A CUDA source built into a program for this CPU (source.py, cuda_on_cpu.h) and kernel
launches run by it, one process per launch so that a kernel that faults or deadlocks is a
result, not a crash of the caller."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import toolchain
from pipeline.verify.cuda_emulator.source import emulation_source

HEADER = Path(__file__).with_name("cuda_on_cpu.h")
# Misaligned vector accesses (float4 and the like) stop the program, as they fault on a GPU.
_FLAGS = ("-std=c++17", "-O2", "-w", "-pthread", "-fsanitize=alignment", "-fno-sanitize-recover=alignment")
_LAUNCH_TIMEOUT_S = 600
_CACHE_ENTRIES = 32


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "convnext-edge" / "cuda-emulator"


@dataclass(frozen=True)
class LaunchResult:
    ok: bool
    error: str  # the emulator's one line when not ok


@dataclass(frozen=True)
class EmulatedProgram:
    """The CPU build of one CUDA source; ``launch`` runs one of its kernels."""

    path: Path

    def launch(self, kernel: str, grid: tuple[int, int, int], block: tuple[int, int, int],
               arguments: list[np.ndarray], *, reverse: bool = False) -> LaunchResult:
        """Run ``kernel`` on ``arguments`` (its pointer parameters in order), which are
        updated in place with what the kernel wrote; ``reverse`` resumes each block's
        threads last to first."""
        with tempfile.TemporaryDirectory(prefix="cuda-emulator-") as folder:
            lines = [f"order {'reverse' if reverse else 'forward'}"]
            for index, array in enumerate(arguments):
                file = Path(folder) / f"{index}.bin"
                file.write_bytes(np.ascontiguousarray(array).tobytes())
                lines.append(f"buffer {index} {array.nbytes} {file}")
            lines.append(f"launch {kernel} {' '.join(map(str, (*grid, *block)))} "
                         f"{' '.join(map(str, range(len(arguments))))}")
            env = {**os.environ, "UBSAN_OPTIONS": "print_stacktrace=0:halt_on_error=1"}
            try:
                done = subprocess.run([str(self.path)], input="\n".join(lines) + "\n", capture_output=True,
                                      text=True, env=env, timeout=_LAUNCH_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                return LaunchResult(False, f"{kernel} did not finish in {_LAUNCH_TIMEOUT_S} s")
            if done.returncode != 0:
                return LaunchResult(False, _error_line(done.stderr, done.returncode))
            for index, array in enumerate(arguments):
                data = np.frombuffer((Path(folder) / f"{index}.bin").read_bytes(), dtype=array.dtype)
                array[...] = data.reshape(array.shape)
        return LaunchResult(True, "")


def _error_line(stderr: str, returncode: int) -> str:
    """The line that says what stopped the program: the emulator's own, or the sanitizer's
    (which goes on with a dump of the memory around the address)."""
    lines = stderr.strip().splitlines()
    for marker in ("cuda emulator:", "runtime error:"):
        found = next((line.strip() for line in lines if marker in line), None)
        if found:
            return found
    return lines[-1] if lines else f"exit code {returncode} (signal {-returncode})" if returncode < 0 else f"exit code {returncode}"


def build_program(cuda_source: str) -> EmulatedProgram:
    """Compile ``cuda_source`` for this CPU with g++ (cached by the source and header)."""
    program_source = emulation_source(cuda_source)
    header = HEADER.read_text()
    key = hashlib.sha256("\0".join([program_source, header, *_FLAGS]).encode()).hexdigest()[:24]
    folder = _cache_dir() / key
    program = folder / "program"
    if program.exists():
        os.utime(folder)  # recently used: kept by _prune
        return EmulatedProgram(program)
    compiler = toolchain.require_tool("g++", "g++", "build CUDA kernels for the CPU emulator")
    folder.mkdir(parents=True, exist_ok=True)
    includes = folder / "include"
    includes.mkdir(exist_ok=True)
    for name in ("cuda.h", "cuda_fp16.h", "mma.h"):  # what cuda_on_cpu.h defines instead
        (includes / name).write_text("// defined by cuda_on_cpu.h\n")
    (folder / "program.cpp").write_text(program_source)
    temporary = folder / f".program-{os.getpid()}"
    done = subprocess.run(
        [compiler, *_FLAGS, "-I", str(includes), "-include", str(HEADER), str(folder / "program.cpp"),
         "-o", str(temporary)],
        capture_output=True, text=True,
    )
    if done.returncode != 0:
        temporary.unlink(missing_ok=True)
        raise RuntimeError(f"g++ could not build the emulated CUDA source ({folder / 'program.cpp'}):\n"
                           + done.stderr[-4000:])
    os.replace(temporary, program)
    _prune(folder.parent)
    return EmulatedProgram(program)


def _prune(cache: Path) -> None:
    """Keep the _CACHE_ENTRIES most recently built programs (each is a few MB)."""
    entries = sorted((p for p in cache.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in entries[_CACHE_ENTRIES:]:
        shutil.rmtree(stale, ignore_errors=True)
