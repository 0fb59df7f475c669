"""Each GPU kernel of a model, as compile schedules it, run by the CUDA emulator and compared
with the same kernel before scheduling, built by TVM for this CPU: the schedules' results
checked on a machine without a GPU.

What this covers: everything our schedules and TVM's CUDA lowering decide (tiles, thread
bindings, shared-memory staging, warp shuffles, WMMA fragments, cp.async pipelines and their
waits, vector widths and alignment). What it cannot: nvcc's code generation, the hardware's
timing, and races that only an unlucky interleaving shows (the emulator runs a block's
threads in a fixed order between their waits).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm

from pipeline.compiler import backend, phases
from pipeline.compiler.cuda_emulator.program import build_program
from pipeline.compiler.cuda_emulator.source import kernel_signatures
from pipeline.compiler.onnx_import import bind_weights, import_relax, resolve_input
from pipeline.compiler.schedules import gpu as gpu_schedules
from pipeline.onnx_io import load_onnx
from targets import Target

# Largest error allowed, relative to the reference's largest magnitude (at least 1): float16
# results differ from the CPU build by their rounding and accumulation order, a wrong
# schedule by far more (or NaN: shared memory starts as NaN).
TOLERANCE = {"float16": 2e-2, "float32": 2e-3}


@dataclass(frozen=True)
class GpuKernels:
    """A model's GPU kernels: before scheduling, as scheduled, and the CUDA source TVM made."""

    unscheduled: dict[str, tvm.tirx.PrimFunc]
    scheduled: dict[str, tvm.tirx.PrimFunc]
    rules: dict[str, str]
    cuda_source: str


@dataclass(frozen=True)
class KernelCheck:
    kernel: str
    rule: str
    status: str  # "match", "mismatch", "error" (the emulator stopped) or "skipped"
    error: float  # largest error relative to the reference's scale (NaN where not compared)
    detail: str


def model_gpu_kernels(onnx_path: Path, target: Target, *, precision: str = "fp16",
                      input_shape: tuple[int, ...] | None = None, params_mode: str = "separate") -> GpuKernels:
    """Compile's phases up to scheduling on ``onnx_path``, then ``gpu_kernels`` of its kernels."""
    model = load_onnx(onnx_path)
    name, shape, dtype = resolve_input(model, None, input_shape)
    mod, _, param_values = import_relax(model, onnx_path, name, shape, dtype)
    if params_mode == "embedded":
        mod = bind_weights(mod, param_values)
    all_phases = [*phases.precision_phases(precision, target), *phases.relax_phases(target)]
    with tvm.target.Target(target.tvm_target), tvm.transform.PassContext(config=phases.pass_config(target)):
        for phase, passes in phases.phases_before(all_phases, "schedule"):
            mod = tvm.transform.Sequential(passes, name=phase)(mod)
    return gpu_kernels({gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}, target)


def gpu_kernels(unscheduled: dict[str, tvm.tirx.PrimFunc], target: Target) -> GpuKernels:
    """Kernels (by name) given the default GPU schedules of ``target`` and TVM's CUDA code
    generation (no nvcc)."""
    tvm_target = tvm.target.Target(target.tvm_target)
    with tvm_target:
        scheduled, kernels = gpu_schedules.schedule_module(tvm.IRModule(unscheduled), tvm_target, target.sm_count)
    scheduled_funcs = {gv.name_hint: f for gv, f in scheduled.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    device_module = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in scheduled_funcs.items()})
    with tvm_target, backend.cuda_source_codegen(target), tvm.transform.PassContext(config=phases.pass_config(target)):
        built = tvm.tirx.build(device_module, target=tvm_target)
    source = "\n".join(m.inspect_source("cuda") for m in built.imports if m.kind == "cuda")
    return GpuKernels(dict(unscheduled), scheduled_funcs, {k: v["rule"] for k, v in kernels.items()}, source)


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


def _parameter_name(buffer_name: str) -> str:
    """The name TVM's CUDA code generation gives a buffer's pointer parameter."""
    return re.sub(r"\W", "_", buffer_name) + "_ptr"


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
        launched = [k for k in source_kernels if re.fullmatch(rf"{re.escape(name)}_kernel(_\d+)?", k)]
        if len(launched) != 1:
            results.append(KernelCheck(name, rule, "skipped", float("nan"),
                                       f"{len(launched)} CUDA kernels (the emulator runs single-kernel functions)"))
            continue
        func = kernels.unscheduled[name]
        arguments = _random_arguments(func, rng)
        tensors = [tvm.runtime.tensor(array) for array in arguments]
        reference[name](*tensors)
        expected = [tensor.numpy() for tensor in tensors]
        status, error, detail = _emulate(program, source_kernels[launched[0]], func, kernels.scheduled[name],
                                         arguments, expected)
        results.append(KernelCheck(name, rule, status, error, detail))
    return results


def _emulate(program, signature, func: tvm.tirx.PrimFunc, scheduled: tvm.tirx.PrimFunc,
             arguments: list[np.ndarray], expected: list[np.ndarray]) -> tuple[str, float, str]:
    """(status, error, detail) of one kernel run in both thread orders."""
    by_parameter = {_parameter_name(buffer.name): i for i, buffer in enumerate(func.params)}
    if set(by_parameter) != {parameter for _, parameter in signature.parameters}:
        return "skipped", float("nan"), "kernel parameters do not name the buffers"
    grid, block = gpu_schedules.launch_dims(scheduled)
    runs = []
    for reverse in (False, True):
        emulated = [array.copy() for array in arguments]
        launch = program.launch(signature.name, grid, block,
                                [emulated[by_parameter[parameter]] for _, parameter in signature.parameters],
                                reverse=reverse)
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
