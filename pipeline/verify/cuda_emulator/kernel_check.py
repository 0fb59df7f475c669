"""Each GPU kernel of a model, as compile schedules it, run by the CUDA emulator and compared
with the same kernel before scheduling, built by TVM for this CPU: the schedules' results
checked on a machine without a GPU.

What this covers: everything our schedules and TVM's CUDA lowering decide (tiles, thread
bindings, shared-memory staging, warp shuffles, WMMA fragments, cp.async pipelines and their
waits, vector widths and alignment). What it cannot: nvcc's code generation, the hardware's
timing, and races that only an unlucky interleaving shows (the emulator runs a block's
threads in one of two fixed orders between their waits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm

from pipeline.verify.cuda_emulator.gpu_build import GpuKernels, argument_order, kernel_name
from pipeline.verify.cuda_emulator.program import build_program
from pipeline.verify.cuda_emulator.source import kernel_signatures
from pipeline.compiler.schedules import gpu as gpu_schedules

# Largest error allowed, relative to the reference's largest magnitude (at least 1): float16
# results differ from the CPU build by their rounding and accumulation order, a wrong
# schedule by far more (or NaN: shared memory starts as NaN).
TOLERANCE = {"float16": 2e-2, "float32": 2e-3}


@dataclass(frozen=True)
class KernelCheck:
    kernel: str
    rule: str
    status: str  # "match", "mismatch", "error" (the emulator stopped) or "skipped"
    error: float  # largest error relative to the reference's scale (NaN where not compared)
    detail: str


def _random_arguments(func: tvm.tirx.PrimFunc, rng: np.random.Generator) -> list[np.ndarray]:
    arrays = []
    for buffer in func.params:
        shape = tuple(int(extent) for extent in buffer.shape)
        dtype = str(buffer.dtype)
        if dtype.startswith("float"):
            arrays.append(rng.standard_normal(shape).astype(dtype))
        else:
            arrays.append(rng.integers(-8, 8, shape).astype(dtype))
    return arrays


def _relative_error(result: np.ndarray, reference: np.ndarray) -> float:
    result, reference = result.astype(np.float64), reference.astype(np.float64)
    if (np.isnan(result) != np.isnan(reference)).any():
        return float("inf")
    finite = ~np.isnan(reference)
    if not finite.any():
        return 0.0
    scale = max(1.0, float(np.abs(reference[finite]).max()))
    return float(np.abs(result[finite] - reference[finite]).max()) / scale


def check_kernels(kernels: GpuKernels, *, seed: int = 0, progress=None) -> list[KernelCheck]:
    """Every scheduled kernel run by the emulator against its unscheduled CPU build, on the
    same random arguments (outputs start equal too, so a kernel must write all of them),
    once with each block's threads resumed first to last and once last to first."""
    program = build_program(kernels.cuda_source)
    reference_module = tvm.IRModule({name: f.with_attr("global_symbol", name)
                                     for name, f in kernels.unscheduled.items() if name in kernels.scheduled})
    reference = tvm.tirx.build(reference_module, target="llvm")
    source_kernels = {signature.name: signature for signature in kernel_signatures(kernels.cuda_source)}
    rng = np.random.default_rng(seed)
    results = []
    names = sorted(kernels.scheduled)
    for index, name in enumerate(names):
        rule = kernels.rules.get(name, "tuning record")
        if progress is not None:
            progress(index, len(names), name)
        launched = kernel_name(source_kernels, name)
        if launched is None:
            results.append(KernelCheck(name, rule, "skipped", float("nan"),
                                       "several CUDA kernels (the emulator runs single-kernel functions)"))
            continue
        func = kernels.unscheduled[name]
        arguments = _random_arguments(func, rng)
        tensors = [tvm.runtime.tensor(array) for array in arguments]
        reference[name](*tensors)
        expected = [tensor.numpy() for tensor in tensors]
        status, error, detail = _emulate(program, source_kernels[launched], func, kernels.scheduled[name],
                                         arguments, expected)
        results.append(KernelCheck(name, rule, status, error, detail))
    return results


def _emulate(program, signature, func: tvm.tirx.PrimFunc, scheduled: tvm.tirx.PrimFunc,
             arguments: list[np.ndarray], expected: list[np.ndarray]) -> tuple[str, float, str]:
    """(status, error, detail) of one kernel run in both thread orders."""
    order = argument_order(func, [parameter for _, parameter in signature.parameters])
    if order is None:
        return "skipped", float("nan"), "kernel parameters do not name the buffers"
    grid, block = gpu_schedules.launch_dims(scheduled)
    runs = []
    for reverse in (False, True):
        emulated = [array.copy() for array in arguments]
        launch = program.launch(signature.name, grid, block, [emulated[i] for i in order], reverse=reverse)
        if not launch.ok:
            return "error", float("nan"), f"{launch.error} (threads run {'last to first' if reverse else 'first to last'})"
        runs.append(emulated)
    errors = {func.params[i].name: _relative_error(runs[0][i], expected[i]) for i in range(len(arguments))}
    worst = max(errors, key=errors.get)
    launch = f"grid {grid}, block {block}"
    if any(a.tobytes() != b.tobytes() for a, b in zip(*runs)):
        return "mismatch", errors[worst], f"{launch}; results depend on the order threads run in: a missing barrier"
    tolerance = TOLERANCE.get(str(func.params[list(errors).index(worst)].dtype), 0.0)
    status = "match" if errors[worst] <= tolerance else "mismatch"
    return status, errors[worst], f"{launch}; " + (f"largest in {worst}" if errors[worst] > 0 else "bitwise equal")
