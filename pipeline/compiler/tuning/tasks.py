"""Tuning tasks: the distinct PrimFuncs of the model after compile's phases up to scheduling,
each with its FLOPs and how often the model runs it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tvm
import tvm_ffi
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.analysis import estimate_tir_flops

from pipeline.compiler.onnx_import import bind_weights, import_relax, resolve_input
from pipeline.compiler.phases import phases_before, relax_phases
from pipeline.onnx_io import load_onnx
from targets import Target



@dataclass
class Task:
    name: str
    mod: tvm.IRModule
    # How many times the model calls it, and its floating-point operations per call.
    weight: int
    flops: float

    @property
    def key(self) -> str:
        """The task's name with its workload's hash, what tune_state.json is keyed by: names
        number kernels in graph order and move when the graph changes (a new layout pass),
        and a resumed run must not give one kernel's progress to another."""
        return f"{self.name}#{tvm_ffi.structural_hash(self.mod) % 2**32:08x}"

    @property
    def score(self) -> float:
        """Where the latency is: FLOPs times occurrences (a tie-breaker of 1 FLOP keeps
        FLOP-free data movement tasks ordered by how often they run)."""
        return (self.flops + 1.0) * self.weight


def fused_module(
    onnx_path: Path, target: Target, input_shape: tuple[int, ...] | None = None,
    rewrites: tuple[tuple[str, list], ...] = (),
) -> tuple[tvm.IRModule, tvm.target.Target]:
    """The model after compile's phases up to scheduling: the PrimFuncs that compile schedules.

    Uses compile's own import and pass list (pipeline/compiler/phases.py, after ``rewrites``
    as compile_onnx runs them: the INT8 lowering), so the tasks tuned here are exactly the
    functions compile looks up (with embedded weights, the default)."""
    onnx_path = Path(onnx_path)
    model = load_onnx(onnx_path)
    name, shape, dtype = resolve_input(model, None, input_shape)
    mod, _, param_values = import_relax(model, onnx_path, name, shape, dtype)
    mod = bind_weights(mod, param_values)
    tvm_target = tvm.target.Target(target.tvm_target)
    with tvm_target:
        for phase, passes in [*rewrites, *phases_before(relax_phases(target), "schedule")]:
            if passes:
                mod = tvm.transform.Sequential(passes, name=phase)(mod)
    return mod, tvm_target


def extract_tasks(mod: tvm.IRModule, tvm_target: tvm.target.Target) -> list[Task]:
    """The tuning tasks of a fused module, most latency first (FLOPs x occurrences)."""
    tasks = []
    for extracted in ms.relax_integration.extract_tasks(mod, tvm_target):
        task_mod = extracted.dispatched[0]
        try:
            flops = float(estimate_tir_flops(task_mod))
        except Exception:  # data movement without arithmetic
            flops = 0.0
        tasks.append(Task(str(extracted.task_name), task_mod, int(extracted.weight), flops))
    tasks.sort(key=lambda task: (-task.score, task.name))
    return tasks
