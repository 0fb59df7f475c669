"""Targets as data: one frozen record per place an artifact can run.

A target names everything the compile and measure stages need: the full TVM
target JSON (never a TVM tag: tags drift between releases), the host triple the
artifact's host code is built for, the cross compiler that links it, the default
precision and how it is measured.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from pipeline.errors import PipelineError


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
    precisions: tuple[str, ...] = ("fp32",)
    # "local": measured in this process; "rpc": through a TVM RPC tracker.
    runner: str = "local"
    rpc_key: str | None = None

    def target_json(self) -> str:
        """Canonical JSON of the TVM target, used in cache keys and manifests."""
        return json.dumps(self.tvm_target, sort_keys=True)


def _host_cpu() -> str:
    # Imported lazily: listing targets must not pay for loading TVM.
    from tvm.target import codegen

    return codegen.llvm_get_system_cpu()


@lru_cache(maxsize=None)
def _x86_host() -> Target:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return Target(
        name="x86",
        description="this machine's x86-64 CPU (LLVM, detected -mcpu and core count)",
        tvm_target={"kind": "llvm", "mcpu": _host_cpu(), "num-cores": int(cores or 1)},
        host_triple="x86_64-linux-gnu",
        precisions=("fp32", "int8"),
    )


# Name -> factory. Factories (not instances) so that a detected target probes the
# machine only when it is asked for.
_TARGETS = {
    "x86": _x86_host,
}


def known_targets() -> list[str]:
    """Names of all targets, in display order."""
    return list(_TARGETS)


def get_target(name: str) -> Target:
    """Look a target up by name; unknown names get an error listing the known ones."""
    factory = _TARGETS.get(name)
    if factory is None:
        raise PipelineError(
            f"unknown target '{name}'; known targets: {', '.join(known_targets())}"
        )
    return factory()


def host_arch() -> str:
    return platform.machine()
