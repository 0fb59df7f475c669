"""nvcc for the kernels of CUDA artifacts: one explicit command whose flags are recorded.

TVM 0.27's own wrapper (tvm/support/nvcc.py) adds ``--use_fast_math`` unless the
environment variable TVM_CUDA_NVCC_NO_FAST_MATH is set, so a build's numerics depended
on the shell it ran in. Under ``--use_fast_math`` powf(x, 2) is exp2(2 * log2(x)), NaN
for x < 0, and every ConvNeXt output on an H200 was NaN.

Fast-math policy: nvcc compiles with IEEE semantics (no ``--use_fast_math``: accurate
division, square root and transcendental functions, denormals kept). Approximations
are decided per op in the graph, where they are visible and tested: GELU's erf, exp and
tanh become polynomials in Relax's FastMathTransform (the "fast_math" phase of
pipeline/compiler/backend.py), and small integer powers become multiplications
(pipeline/compiler/graph_rewrites.py). The flags go into the artifact's metadata.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from pipeline.errors import PipelineError

# Whether nvcc may use its fast-math mode (see the module docstring): never.
FAST_MATH = False

NVCC_FLAGS: tuple[str, ...] = (
    "-O3",
    # TVM's generated fp16 code uses the half operators and conversions of cuda_fp16.h,
    # which CUDA hides behind these macros unless told otherwise (TVM's wrapper does too).
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    # Spilled registers slow a kernel down many times; ptxas says so in its log.
    "--ptxas-options=--warn-on-local-memory-usage",
)


def gencode(cuda_arch: str) -> list[str]:
    """SASS for ``sm_XX`` plus PTX of the same version (newer GPUs JIT-compile the PTX)."""
    number = cuda_arch.removeprefix("sm_")
    return ["-gencode", f"arch=compute_{number},code=[sm_{number},compute_{number}]"]


def command(nvcc: str, cuda_arch: str, output_format: str, source: Path, output: Path) -> list[str]:
    """The nvcc command line for one source file: ``output_format`` is fatbin, ptx or cubin."""
    if output_format == "ptx":
        arch = ["-arch", cuda_arch.replace("sm_", "compute_")]
    elif output_format == "cubin":
        arch = ["-arch", cuda_arch]
    else:
        arch = gencode(cuda_arch)
    fast = ["--use_fast_math"] if FAST_MATH else []
    return [nvcc, f"--{output_format}", *NVCC_FLAGS, *fast, *arch, "-o", str(output), str(source)]


def compile_source(source: str, cuda_arch: str, output_format: str = "fatbin", nvcc: str = "nvcc") -> bytes:
    """Compile CUDA source for ``cuda_arch``; raises PipelineError with nvcc's first error."""
    with tempfile.TemporaryDirectory(prefix="convnext-nvcc-") as tmp:
        source_path = Path(tmp) / "model.cu"
        output = Path(tmp) / f"model.{output_format}"
        source_path.write_text(source)
        result = subprocess.run(
            command(nvcc, cuda_arch, output_format, source_path, output),
            capture_output=True, text=True,
        )
        if result.returncode != 0 or not output.is_file():
            errors = [line for line in (result.stderr + result.stdout).splitlines() if "error" in line]
            first = errors[0] if errors else (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise PipelineError(f"nvcc failed on the kernels for {cuda_arch}: {first.strip()}")
        return output.read_bytes()


@lru_cache(maxsize=None)
def version(nvcc: str = "nvcc") -> str:
    """nvcc's release ("13.0.88"), or "unknown" when it does not say."""
    result = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    found = re.search(r"V(\d+\.\d+\.\d+)", result.stdout)
    return found.group(1) if found else "unknown"


def build_record(cuda_arch: str, nvcc: str = "nvcc") -> dict:
    """What the artifact metadata records about how its device code was made."""
    return {
        "nvcc_version": version(nvcc),
        "nvcc_flags": [*NVCC_FLAGS, *(["--use_fast_math"] if FAST_MATH else []), *gencode(cuda_arch)],
        "fast_math": FAST_MATH,
        "fast_math_policy": (
            "nvcc without --use_fast_math (IEEE division, sqrt, transcendentals); approximations "
            "only where the graph asks: polynomial erf/exp/tanh (FastMathTransform), integer "
            "powers as multiplications"
        ),
        "source": "model.cu",
    }
