"""Targets as data: one frozen record per place an artifact can run.

A target names everything the compile and measure stages need: the full TVM
target JSON (never a TVM tag: tags drift between releases, and TVM 0.27's
``nvidia/jetson-orin-nano`` tag names Xavier's Carmel CPU), the host triple the
artifact's host code is built for, the cross compiler that links it, the
precisions it supports (those its device kind is offered: pipeline/precisions.py) and
how it is measured.

The table (``_TARGETS``) is in display order:

    x86                  this machine's CPU (detected)
    cuda                 this machine's NVIDIA GPU (detected), x86-64 host code
    cuda-sm75 ... sm90   a fixed GPU architecture, x86-64 host code
    jetson-orin(-cpu)    Orin: sm_87 GPU + Cortex-A78AE host (or the CPU alone)
    jetson-thor(-cpu)    Thor: sm_110 GPU + Neoverse-V3AE host (or the CPU alone)
    (alias) jetson       jetson-orin, the current module family (ALIASES)
    arm-*                64-bit ARM CPUs, cross-compiled, measured over RPC

CPU features are written out per core (``mattr``) from the Arm TRMs; the tests check
each against LLVM's own feature list for that ``mcpu``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

from pipeline import precisions as precision_plan
from pipeline.errors import PipelineError

X86_TRIPLE = "x86_64-linux-gnu"
AARCH64_TRIPLE = "aarch64-linux-gnu"
# Debian's cross toolchain for aarch64; links the artifacts and the qemu test runner.
AARCH64_GCC = "aarch64-linux-gnu-gcc"
AARCH64_GCC_PACKAGE = "gcc-aarch64-linux-gnu"


# Re-exported for the tests and benchmarks that name it (pipeline/precisions.py says why).
GPU_INT8_REASON = precision_plan.GPU_INT8_REASON


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    tvm_target: dict[str, Any] = field(hash=False)
    host_triple: str
    # Executable that links the shared library; None means the host's default C compiler.
    cross_compiler: str | None = None
    # Debian package that provides cross_compiler, named in the error when it is missing.
    cross_compiler_package: str | None = None
    default_precision: str = "fp32"
    # "local": measured in this process; "rpc": through a TVM RPC tracker.
    runner: str = "local"
    rpc_key: str | None = None
    # The TVM device the artifact runs on: "cpu" or "cuda".
    device: str = "cpu"
    # What building or measuring needs beyond the Python packages, for `pipeline targets`.
    needs: tuple[str, ...] = ()
    # GPU targets: the streaming multiprocessors of the largest GPU the target names. The
    # default GPU schedules size their grids to give each at least one thread block.
    sm_count: int | None = None
    # Why this target cannot be built on this machine (a detected device that is absent);
    # None when it can. Listing still works; check_available() raises the reason.
    unavailable: str | None = None

    def target_json(self) -> str:
        """Canonical JSON of the TVM target, used in cache keys and manifests."""
        return json.dumps(self.tvm_target, sort_keys=True)

    def check_available(self) -> None:
        """Raise the reason this target cannot be built here, if there is one."""
        if self.unavailable is not None:
            raise PipelineError(self.unavailable)

    @property
    def precisions(self) -> tuple[str, ...]:
        """The precisions this target offers: those pipeline/precisions.py offers on its device kind."""
        return precision_plan.offered(self.device)

    def precision_note(self, precision: str) -> str | None:
        """Why this target does not offer `precision`, where the precision plan gives its device
        kind a reason (int8 on a GPU target: GPU_INT8_REASON); None otherwise."""
        plan = precision_plan.PLAN.get(precision)
        if plan is None or plan.offered(self.device):
            return None
        return plan.not_offered.get(self.device)

    def check_precision(self, precision: str) -> None:
        """Raise a one-line error when this target does not offer `precision`: the reason where
        there is one, else the precisions it does offer."""
        if precision in self.precisions:
            return
        note = self.precision_note(precision)
        raise PipelineError(
            f"target '{self.name}' does not support precision '{precision}'"
            + (f": {note}" if note else f"; use one of: {', '.join(self.precisions)}")
        )

    @property
    def cuda_arch(self) -> str | None:
        """The GPU architecture ("sm_87") of a CUDA target, None for a CPU target."""
        return self.tvm_target.get("arch") if self.tvm_target.get("kind") == "cuda" else None

    @property
    def gpu_peaks(self) -> GpuPeaks | None:
        """The peak rates of the chip this GPU target's figures are for (GPU_PEAKS, by
        architecture); None for a CPU target or an architecture without figures."""
        return GPU_PEAKS.get(self.cuda_arch) if self.cuda_arch else None

    @property
    def host_target(self) -> dict[str, Any]:
        """The TVM target of the CPU code: the host of a GPU target, else the target itself."""
        return self.tvm_target.get("host", self.tvm_target)


# ---------------------------------------------------------------------------
# Building blocks of the table


def _host_cpu() -> str:
    # Imported lazily: listing targets must not pay for loading TVM.
    from tvm.target import codegen

    return codegen.llvm_get_system_cpu()


def _aarch64_cpu(mcpu: str, mattr: tuple[str, ...]) -> dict[str, Any]:
    return {"kind": "llvm", "mtriple": AARCH64_TRIPLE, "mcpu": mcpu, "mattr": list(mattr)}


def _cuda_gpu(arch: str, host: dict[str, Any]) -> dict[str, Any]:
    """A CUDA target with its limits written out (the same for sm_75 ... sm_110).

    49152 bytes is the shared memory a block gets without opting in (TVM's CUDA runtime
    does not opt in); 64K 32-bit registers per block on every architecture listed here.
    """
    return {
        "kind": "cuda",
        "arch": arch,
        "max_num_threads": 1024,
        "max_threads_per_block": 1024,
        "thread_warp_size": 32,
        "max_shared_memory_per_block": 49152,
        "registers_per_block": 65536,
        "host": host,
    }


# Any x86-64 server: the host side of a fixed-architecture GPU artifact.
_X86_64_HOST = {"kind": "llvm", "mtriple": X86_TRIPLE}

# Per-core features (Arm TRMs). Armv8.0 cores (A53, A72) have NEON only; Armv8.2 cores add
# dot product and FP16 arithmetic; Neoverse V1 (Armv8.4) adds SVE, BF16 and int8 matmul;
# Neoverse V3AE (Armv9.2) adds SVE2.
_V80 = ("+neon",)
_V82 = ("+neon", "+dotprod", "+fullfp16")
_V84_SVE = _V82 + ("+i8mm", "+bf16", "+sve")
_V92_SVE2 = _V84_SVE + ("+sve2",)

_CUDA_NEEDS = ("nvcc (CUDA toolkit) to build", "an NVIDIA GPU to measure")
_ARM_NEEDS = (AARCH64_GCC_PACKAGE, "the board over RPC to measure")


def _arm_cpu_target(name: str, board: str, mcpu: str, mattr: tuple[str, ...]) -> Target:
    return Target(
        name=name,
        description=f"{board} (64-bit, {mcpu}), cross-compiled for {AARCH64_TRIPLE}",
        tvm_target=_aarch64_cpu(mcpu, mattr),
        host_triple=AARCH64_TRIPLE,
        cross_compiler=AARCH64_GCC,
        cross_compiler_package=AARCH64_GCC_PACKAGE,
        runner="rpc",
        rpc_key=name,
        needs=_ARM_NEEDS,
    )


# SMs of the largest GPU each architecture's target names (RTX 2080 Ti, A100, RTX 3090,
# RTX 4090, H100/H200 SXM, AGX Orin, AGX Thor): a grid of at least this many blocks fills it.
SM_COUNTS = {"sm_75": 68, "sm_80": 108, "sm_86": 82, "sm_89": 128, "sm_90": 132, "sm_87": 16, "sm_110": 20}


@dataclass(frozen=True)
class GpuPeaks:
    """The rates a GPU kernel's roofline bound is computed at (pipeline/compiler/cost.py): those of
    one chip, named so that a bound always says whose it is."""

    chip: str
    fp16_tensor_flops: float  # dense, FP32 accumulate (what mixed-precision GEMMs use)
    fp32_flops: float  # CUDA cores
    memory_bytes: float  # DRAM bandwidth per second
    source: str


# The same chips as SM_COUNTS, one per architecture.
GPU_PEAKS = {
    "sm_75": GpuPeaks("RTX 2080 Ti", 53.8e12, 13.4e12, 616e9, "Turing whitepaper (reference clocks)"),
    "sm_80": GpuPeaks("A100 SXM 80GB", 312e12, 19.5e12, 2039e9, "A100 data sheet"),
    "sm_86": GpuPeaks("RTX 3090", 71e12, 35.6e12, 936e9, "GA102 whitepaper"),
    "sm_89": GpuPeaks("RTX 4090", 165.2e12, 82.6e12, 1008e9, "Ada whitepaper"),
    # Measured on the lent H200 (issue #16): fp16 tensor-core rate and HBM3e bandwidth; FP32 from its data sheet.
    "sm_90": GpuPeaks("H200", 790e12, 67e12, 4.3e12, "measured on an H200 (issue #16), FP32 from the data sheet"),
    # 170 sparse INT8 TOPS -> 42.5 dense FP16 TFLOPS; 5.3 FP32 TFLOPS; 204.8 GB/s LPDDR5.
    "sm_87": GpuPeaks("Jetson AGX Orin 64GB", 42.5e12, 5.3e12, 204.8e9, "Jetson AGX Orin technical brief"),
    # 2070 sparse FP4 TFLOPS -> 259 dense FP16 (Blackwell: FP16 is a quarter of FP4); 2560 cores at
    # 1.575 GHz; 273 GB/s LPDDR5X.
    "sm_110": GpuPeaks("Jetson AGX Thor", 259e12, 8.06e12, 273e9, "Jetson AGX Thor data sheet, derived"),
}


def _cuda_sm_target(arch: str, gpus: str) -> Target:
    return Target(
        name=f"cuda-{arch.replace('_', '')}",
        description=f"NVIDIA {arch} GPUs ({gpus}), x86-64 host code; kernels compiled by nvcc",
        tvm_target=_cuda_gpu(arch, _X86_64_HOST),
        host_triple=X86_TRIPLE,
        device="cuda",
        needs=_CUDA_NEEDS,
        sm_count=SM_COUNTS[arch],
    )


def _jetson_target(name: str, board: str, arch: str, mcpu: str, mattr: tuple[str, ...], gpu: bool) -> Target:
    host = _aarch64_cpu(mcpu, mattr)
    return Target(
        name=name,
        description=(
            f"{board}: {arch} GPU, {mcpu} host code" if gpu else f"{board} CPU only ({mcpu})"
        ),
        tvm_target=_cuda_gpu(arch, host) if gpu else host,
        host_triple=AARCH64_TRIPLE,
        cross_compiler=AARCH64_GCC,
        cross_compiler_package=AARCH64_GCC_PACKAGE,
        runner="rpc",
        rpc_key=name,
        device="cuda" if gpu else "cpu",
        # CUDA 13 is the first toolkit that knows sm_110.
        needs=((f"nvcc (CUDA {'13+' if arch == 'sm_110' else 'toolkit'})",) if gpu else ()) + _ARM_NEEDS,
        sm_count=SM_COUNTS[arch] if gpu else None,
    )


# Jetson Thor's CPU. LLVM 19+ knows it; an older LLVM gets Neoverse V2, the Armv9.0 core
# with the same SVE2/BF16/int8-matmul features, so the code it emits runs on Thor too.
THOR_CPU, THOR_CPU_FALLBACK = "neoverse-v3ae", "neoverse-v2"


@lru_cache(maxsize=None)
def _thor_cpu() -> str:
    from tvm.target import codegen

    return THOR_CPU if codegen.llvm_is_valid_cpu(THOR_CPU, AARCH64_TRIPLE) else THOR_CPU_FALLBACK


# ---------------------------------------------------------------------------
# Detected targets


@lru_cache(maxsize=None)
def _x86_host() -> Target:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return Target(
        name="x86",
        description="this machine's x86-64 CPU (LLVM, detected -mcpu and core count)",
        tvm_target={"kind": "llvm", "mcpu": _host_cpu(), "num-cores": int(cores or 1)},
        host_triple=X86_TRIPLE,
    )


def _nvidia_smi_arch() -> str | None:
    """The first GPU's architecture from nvidia-smi ("sm_90"), None when it cannot tell."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"sm_{out[0].replace('.', '')}" if out and out[0].replace(".", "").isdigit() else None


def _tvm_cuda_arch() -> str | None:
    import tvm

    device = tvm.cuda(0)
    return f"sm_{device.compute_version.replace('.', '')}" if device.exist else None


@lru_cache(maxsize=None)
def _local_cuda() -> Target:
    arch = _nvidia_smi_arch() or _tvm_cuda_arch()
    machine = platform.machine()
    host_triple = AARCH64_TRIPLE if machine in ("aarch64", "arm64") else X86_TRIPLE
    host = {"kind": "llvm", "mtriple": host_triple, "mcpu": _host_cpu()}
    if arch is None:
        fixed = ", ".join(name for name in _TARGETS if name.startswith("cuda-"))
        # Still a row (so that listing targets works); building it raises this reason.
        return Target(
            name="cuda",
            description=f"this machine's NVIDIA GPU (none found here; use one of {fixed})",
            tvm_target={"kind": "cuda", "host": host},
            host_triple=host_triple,
            device="cuda",
            needs=_CUDA_NEEDS,
            unavailable=(
                "target 'cuda' means this machine's GPU, and none was found (no nvidia-smi, or TVM "
                f"sees no CUDA device); to build for a GPU elsewhere pick its architecture: {fixed}"
            ),
        )
    return Target(
        name="cuda",
        description=f"this machine's NVIDIA GPU ({arch}, detected), host code for this CPU",
        tvm_target=_cuda_gpu(arch, host),
        host_triple=host_triple,
        device="cuda",
        needs=_CUDA_NEEDS,
        sm_count=_local_sm_count(arch),
    )


def _local_sm_count(arch: str) -> int:
    """This machine's GPU's SM count where TVM sees the GPU, else its architecture's."""
    import tvm

    device = tvm.cuda(0)
    return int(device.multi_processor_count) if device.exist else SM_COUNTS.get(arch, SM_COUNTS["sm_90"])


def _fixed(target: Target) -> Callable[[], Target]:
    return lambda: target


# ---------------------------------------------------------------------------
# The table. Name -> factory: factories (not instances) so that a detected target
# probes the machine only when it is asked for.

_TARGETS: dict[str, Callable[[], Target]] = {
    "x86": _x86_host,
    "cuda": _local_cuda,
    **{
        target.name: _fixed(target)
        for target in (
            _cuda_sm_target("sm_75", "Turing: T4, RTX 20xx"),
            _cuda_sm_target("sm_80", "Ampere: A100, A30"),
            _cuda_sm_target("sm_86", "Ampere: A10, A40, RTX 30xx"),
            _cuda_sm_target("sm_89", "Ada: L4, L40, RTX 40xx"),
            _cuda_sm_target("sm_90", "Hopper: H100, H200"),
        )
    },
    "jetson-orin": lambda: _jetson_target(
        "jetson-orin", "Jetson AGX Orin / Orin NX / Orin Nano", "sm_87", "cortex-a78ae", _V82, gpu=True),
    "jetson-orin-cpu": lambda: _jetson_target(
        "jetson-orin-cpu", "Jetson AGX Orin / Orin NX / Orin Nano", "sm_87", "cortex-a78ae", _V82, gpu=False),
    # CUDA 13 numbers Thor's GPU sm_110 (CUDA 12.8/12.9 called it sm_101).
    "jetson-thor": lambda: _jetson_target(
        "jetson-thor", "Jetson AGX Thor", "sm_110", _thor_cpu(), _V92_SVE2, gpu=True),
    "jetson-thor-cpu": lambda: _jetson_target(
        "jetson-thor-cpu", "Jetson AGX Thor", "sm_110", _thor_cpu(), _V92_SVE2, gpu=False),
    **{
        target.name: _fixed(target)
        for target in (
            _arm_cpu_target("arm-a53", "Cortex-A53 boards: Raspberry Pi 3 / Zero 2 W", "cortex-a53", _V80),
            _arm_cpu_target("arm-a72", "Cortex-A72 boards: Raspberry Pi 4", "cortex-a72", _V80),
            _arm_cpu_target("arm-a76", "Cortex-A76 boards: Raspberry Pi 5", "cortex-a76", _V82),
            _arm_cpu_target("arm-neoverse-n1", "Neoverse N1 servers: AWS Graviton2, Ampere Altra",
                            "neoverse-n1", _V82),
            _arm_cpu_target("arm-neoverse-v1", "Neoverse V1 servers: AWS Graviton3", "neoverse-v1", _V84_SVE),
        )
    },
}


# Names a user types for a target of the table: alias -> (target, what it picks and how to pick
# another). A board family's name means its current module.
ALIASES: dict[str, tuple[str, str]] = {
    "jetson": ("jetson-orin", "Jetson Orin (sm_87 GPU), the current Jetson module family; for Jetson AGX Thor "
                              "pass --target jetson-thor"),
}


def known_targets() -> list[str]:
    """Names of all targets, in display order."""
    return list(_TARGETS)


def resolve_name(name: str) -> str:
    """The table's name for `name`: itself, or the target an alias stands for."""
    return ALIASES[name][0] if name in ALIASES else name


@lru_cache(maxsize=None)
def _say_alias(name: str) -> None:
    # Once per process: commands look their target up more than once.
    print(f"note: target '{name}' means '{ALIASES[name][0]}': {ALIASES[name][1]}", file=sys.stderr, flush=True)


def get_target(name: str) -> Target:
    """Look a target up by name or alias (saying once what an alias picked); unknown names get
    an error listing the known ones."""
    factory = _TARGETS.get(resolve_name(name))
    if factory is None:
        raise PipelineError(
            f"unknown target '{name}'; known targets: {', '.join(known_targets())} "
            f"(aliases: {', '.join(f'{alias} = {to}' for alias, (to, _) in ALIASES.items())})"
        )
    if name in ALIASES:
        _say_alias(name)
    return factory()


def host_arch() -> str:
    return platform.machine()
