"""How `pipeline tune` builds and times its candidates, and where: the settings a run was
asked (TuneSettings), MetaSchedule's LocalBuilder with the project's build for the target
(nvcc for GPU kernels) that lets this machine settle before timing, the local or RPC runner,
and whether a target can be measured here or through the tracker at all (check_rpc).

The tuning loop (tuner.py), measure bundles (measure_bundle.py) and `tune-db remeasure`
(remeasure.py) build and time with these.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
import time
from dataclasses import dataclass

from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from pipeline.compiler.tensor_intrinsics import load_tensor_intrinsics
from pipeline.errors import PipelineError
from targets import Target


# Seconds to let a build's worker process exit before kernels are timed on this machine
# (_SettlingBuilder).
LOCAL_SETTLE_S = 2.0


@dataclass(frozen=True)
class TuneSettings:
    """Everything `pipeline tune` was asked, resolved; printed before work starts."""

    trials: int | None = None  # total this run; None: trials_per_task for each task
    trials_per_task: int = 64
    time_budget_s: float | None = None
    max_tasks: int | None = None
    resume: bool = False
    rpc_tracker: str | None = None
    rpc_key: str | None = None
    rpc_timeout_s: float = 30.0
    # Candidates built and measured per round; a task stops after `patience` rounds
    # that improve its best latency by less than `min_improvement`.
    round_trials: int = 16
    patience: int = 2
    min_improvement: float = 0.01
    builder_timeout_s: float = 300.0
    runner_timeout_s: float = 60.0
    population: int = 256
    seed: int = 0

    def describe(self) -> str:
        width = max(len(f.name) for f in dataclasses.fields(self))
        return "\n".join(f"  {f.name:<{width}}  {getattr(self, f.name)}" for f in dataclasses.fields(self))


def _build_candidate(target: Target, mod, tvm_target, params):
    """LocalBuilder build: MetaSchedule's default build, and for a GPU target under compile's
    PassContext with the kernels kept as CUDA source, which _export_library compiles with the
    project's nvcc flags (pipeline/compiler/nvcc.py: never --use_fast_math, which TVM's own
    nvcc wrapper adds and which made every ConvNeXt output NaN)."""
    import tvm
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build

    if target.cuda_arch is None:
        return default_build(mod, tvm_target, params)
    from pipeline.compiler import backend, phases

    with backend.cuda_source_codegen(target), tvm.transform.PassContext(config=phases.pass_config(target)):
        return default_build(mod, tvm_target, params)


def _export_library(target: Target, mod) -> str:
    """LocalBuilder export: a shared library linked for the target (cross compiler or cc); a GPU
    target's kernels go in as an nvcc fatbin for its sm_XX, as compile links them."""
    from tvm.support import cc

    directory = tempfile.mkdtemp(prefix="tvm-tune-build-")
    path = os.path.join(directory, "candidate.so")
    if target.cuda_arch is not None:
        from pathlib import Path as _Path

        from pipeline.compiler import backend

        backend.export_kernel_library(mod, _Path(path), target)
        return path
    mod.export_library(path, fcompile=cc.cross_compiler(target.cross_compiler) if target.cross_compiler else None)
    return path


def local_gpu_arch() -> str | None:
    """The architecture ("sm_87") of this machine's first GPU as TVM sees it; None without one."""
    import tvm

    device = tvm.cuda(0)
    return f"sm_{device.compute_version.replace('.', '')}" if device.exist else None


def _machine_triple() -> str:
    import platform

    from targets import AARCH64_TRIPLE, X86_TRIPLE

    return AARCH64_TRIPLE if platform.machine() in ("aarch64", "arm64") else X86_TRIPLE


def local_measure_problem(target: Target) -> str | None:
    """Why this machine cannot time `target`'s candidates itself (None: it can): a GPU target
    needs a GPU of its architecture here, and host code this machine runs (on a Jetson itself,
    jetson-orin is measured locally); a CPU target measured over RPC needs its board."""
    if target.device != "cuda":
        return "rpc" if target.runner == "rpc" else None
    arch = local_gpu_arch()
    if arch is not None and arch == target.cuda_arch and target.host_triple == _machine_triple():
        return None
    here = f"this machine's GPU is {arch}" if arch else "this machine has no GPU TVM can use"
    return f"target '{target.name}' is measured on an {target.cuda_arch} GPU and {here}"


@derived_object
class _SettlingBuilder(ms.builder.PyBuilder):
    """A builder that returns only once this machine is quiet enough to time kernels.

    LocalBuilder's worker process is still exiting when build() returns, and a process
    busy on one of the cores a kernel is timed on stalls the kernel's thread barrier for
    a scheduler tick. On two cores, the candidates timed in the next ~1.5 s came out 2-4x
    slow (ConvNeXt-T's largest GEMM: 2.0-2.4 ms instead of 0.60), which misled the search
    and buried good records."""

    def __init__(self, builder: "ms.builder.Builder", settle_s: float):
        super().__init__()
        self.builder, self.settle_s = builder, settle_s

    def build(self, build_inputs):
        results = self.builder.build(build_inputs)
        time.sleep(self.settle_s)
        return results


def build_workers() -> int:
    """Candidates are built on every core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def make_builder(target: Target, settings: TuneSettings, *, measured_here: bool | None = None) -> "ms.builder.Builder":
    """A builder on build_workers() processes. `measured_here` (default: without a tracker)
    waits after each build for this machine to be quiet enough to time kernels."""
    builder = ms.builder.LocalBuilder(
        max_workers=build_workers(),
        timeout_sec=settings.builder_timeout_s,
        initializer=load_tensor_intrinsics,
        f_build=functools.partial(_build_candidate, target),
        f_export=functools.partial(_export_library, target),
    )
    # Candidates timed on a device over RPC or from a measure bundle do not share its cores
    # with the build.
    if measured_here is None:
        measured_here = settings.rpc_tracker is None
    return _SettlingBuilder(builder, LOCAL_SETTLE_S) if measured_here else builder


def _evaluator() -> "ms.runner.EvaluatorConfig":
    return ms.runner.EvaluatorConfig(number=3, repeat=3, min_repeat_ms=50, enable_cpu_cache_flush=False)


def rpc_boards(target: Target, settings: TuneSettings) -> int:
    """How many boards the tracker has free under the key (at least 1): candidates are
    measured on that many at once."""
    from pipeline.runtime.rpc import parse_tracker, servers_under_key, tracker_summary

    host, port = parse_tracker(settings.rpc_tracker)
    summary = tracker_summary(host, port, settings.rpc_timeout_s)
    return max(1, servers_under_key(summary, settings.rpc_key or target.rpc_key or target.name)[1])


def workers_line(target: Target, settings: TuneSettings, boards: int) -> str:
    """Where candidates are built and measured, for the command's first line."""
    if settings.rpc_tracker is None:
        return f"building on {build_workers()} cores, measuring on this machine"
    key = settings.rpc_key or target.rpc_key or target.name
    return (f"building on {build_workers()} cores, measuring on {boards} board{'s' if boards != 1 else ''} "
            f"under key {key}")


def make_runner(target: Target, settings: TuneSettings, boards: int | None = None):
    """The local runner, or over RPC one that measures on `boards` boards at once (default:
    as many as the tracker has free under the key)."""
    if settings.rpc_tracker is None:
        # Candidates are timed in worker processes that inherit TVM_NUM_THREADS: on as
        # many cores as the artifact will run on (runtime_only.configure_cpu_threads).
        from pipeline.runtime.runtime_only import configure_cpu_threads

        configure_cpu_threads()
        return ms.runner.LocalRunner(timeout_sec=settings.runner_timeout_s, evaluator_config=_evaluator())
    from pipeline.runtime.rpc import parse_tracker

    host, port = parse_tracker(settings.rpc_tracker)
    return ms.runner.RPCRunner(
        rpc_config=ms.runner.RPCConfig(
            tracker_host=host, tracker_port=port, tracker_key=settings.rpc_key or target.rpc_key or target.name,
            session_priority=1, session_timeout_sec=int(settings.runner_timeout_s),
        ),
        evaluator_config=_evaluator(),
        # One worker per board: each holds a session with one of them while it measures.
        max_workers=boards if boards is not None else rpc_boards(target, settings),
    )


def check_rpc(target: Target, settings: TuneSettings) -> int:
    """Before any work: a device target needs a tracker, and the tracker must answer and
    have a device registered under the key. Returns how many boards measure candidates at
    once: the tracker's free ones under the key (at least 1), or 1 on this machine."""
    key = settings.rpc_key or target.rpc_key or target.name
    connect_hint = (
        f"start a tracker (`python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190`), on the board run "
        f"`python -m tvm.exec.rpc_server --tracker HOST:9190 --key {key}`, then pass "
        f"--rpc-tracker HOST:9190 --rpc-key {key}"
    )
    # `cuda` on a machine without a GPU: the one line that names the fixed architectures.
    target.check_available()
    if settings.rpc_tracker is None:
        problem = local_measure_problem(target)
        if problem == "rpc":
            raise PipelineError(f"target '{target.name}' is measured on the device itself, through an RPC tracker; {connect_hint}")
        if problem is not None:
            raise PipelineError(
                f"{problem}; measure on the board or a machine with that GPU through an RPC tracker "
                f"(--rpc-tracker HOST:PORT; on it: `python -m tvm.exec.rpc_server --tracker HOST:PORT --key {key}`), "
                f"or with no network path to it offline with --measure-bundle DIR (README.md, Jetson)"
            )
        return 1
    from pipeline.runtime.rpc import check_tracker, parse_tracker, servers_under_key, tracker_summary

    host, port = parse_tracker(settings.rpc_tracker)
    check_tracker(host, port, settings.rpc_timeout_s)
    try:
        summary = tracker_summary(host, port, settings.rpc_timeout_s)
    except PipelineError as exc:
        raise PipelineError(f"{exc}; {connect_hint}") from None
    registered, free = servers_under_key(summary, key)
    if registered == 0 and free == 0:
        known = sorted({info["key"].split(":", 1)[-1] for info in summary.get("server_info", [])})
        raise PipelineError(
            f"no device with key '{key}' is registered with the RPC tracker at {host}:{port} "
            f"(registered: {', '.join(known) or 'none'}); {connect_hint}"
        )
    return max(1, free)
