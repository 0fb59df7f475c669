"""Tuning tasks: the distinct PrimFuncs of the model after compile's phases up to scheduling,
each with its FLOPs and how often the model runs it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tvm
import tvm_ffi
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.analysis import estimate_tir_flops

from pipeline.compiler.fused import CompileOptions, fuse_model
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
    onnx_path: Path, target: Target, input_shape: tuple[int, ...] | None = None, precision: str = "fp32",
) -> tuple[tvm.IRModule, tvm.target.Target]:
    """The model after compile's phases up to scheduling (fused.fuse_model, with embedded
    weights as compile's default): the PrimFuncs that compile schedules, so the tasks tuned
    here are exactly the functions compile looks up. ``precision`` "int8" takes the QDQ
    model and runs its integer lowering, as compile does."""
    fused = fuse_model(onnx_path, target, CompileOptions(precision=precision, input_shape=input_shape))
    return fused.module, fused.tvm_target


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
