"""A model's GPU kernels as compile makes them, for the emulator: compile's phases up to
scheduling (the fused module, with its weights in the layout and dtype the kernels read),
then the default GPU schedules and TVM's CUDA code generation (no nvcc)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm

from pipeline.compiler import backend, phases, weight_params
from pipeline.compiler.fused import CompileOptions, fuse_model
from pipeline.compiler.schedules import gpu as gpu_schedules
from targets import Target


@dataclass(frozen=True)
class GpuKernels:
    """A model's GPU kernels: before scheduling, as scheduled, and the CUDA source TVM made."""

    unscheduled: dict[str, tvm.tirx.PrimFunc]
    scheduled: dict[str, tvm.tirx.PrimFunc]
    rules: dict[str, str]
    cuda_source: str


@dataclass(frozen=True)
class FusedModel:
    """A model after compile's "fuse" phase: ``module``'s main takes the input, then the
    weights (``params``, by name, as compile saves them with ``--params separate``)."""

    module: tvm.IRModule
    params: dict[str, np.ndarray]


def fused_model(onnx_path: Path, target: Target, *, precision: str = "fp16",
                input_shape: tuple[int, ...] | None = None, gpu_split_k: bool = True) -> FusedModel:
    """Compile's phases up to scheduling on ``onnx_path`` (fused.fuse_model), weights passed
    separately (as the GPU bundle compiles); ``gpu_split_k`` as compile's. ``precision`` is
    one the target offers (pipeline/precisions.py): the emulator checks what the pipeline builds."""
    target.check_precision(precision)
    options = CompileOptions(precision=precision, params_mode="separate", gpu_split_k=gpu_split_k,
                             input_shape=input_shape)
    fused = fuse_model(onnx_path, target, options)
    main = fused.module["main"]
    dtypes = [str(var.ty.dtype) for var in main.params[len(main.params) - len(fused.param_names):]]
    return FusedModel(fused.module, weight_params.saved_weights(fused.param_names, fused.param_values, dtypes,
                                                                fused.param_transforms))


def model_gpu_kernels(onnx_path: Path, target: Target, *, precision: str = "fp16",
                      input_shape: tuple[int, ...] | None = None, gpu_split_k: bool = True) -> GpuKernels:
    """``gpu_kernels`` of the kernels of ``fused_model(onnx_path, ...)``."""
    mod = fused_model(onnx_path, target, precision=precision, input_shape=input_shape, gpu_split_k=gpu_split_k).module
    return gpu_kernels({gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}, target)


def gpu_kernels(unscheduled: dict[str, tvm.tirx.PrimFunc], target: Target) -> GpuKernels:
    """Kernels (by name) given the default GPU schedules of ``target`` and TVM's CUDA code
    generation (no nvcc)."""
    tvm_target = tvm.target.Target(target.tvm_target)
    with tvm_target:
        scheduled, kernels = gpu_schedules.schedule_module(tvm.IRModule(unscheduled), tvm_target, target.sm_count)
    scheduled_funcs = {gv.name_hint: f for gv, f in scheduled.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    return scheduled_gpu_kernels(unscheduled, scheduled_funcs, {k: v["rule"] for k, v in kernels.items()}, target)


def scheduled_gpu_kernels(unscheduled: dict[str, tvm.tirx.PrimFunc], scheduled: dict[str, tvm.tirx.PrimFunc],
                          rules: dict[str, str], target: Target) -> GpuKernels:
    """Kernels scheduled elsewhere (by name, with the rule that did it) and TVM's CUDA code
    generation of them."""
    tvm_target = tvm.target.Target(target.tvm_target)
    device_module = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in scheduled.items()})
    with tvm_target, backend.cuda_source_codegen(target), tvm.transform.PassContext(config=phases.pass_config(target)):
        built = tvm.tirx.build(device_module, target=tvm_target)
    source = "\n".join(m.inspect_source("cuda") for m in built.imports if m.kind == "cuda")
    return GpuKernels(dict(unscheduled), dict(scheduled), dict(rules), source)


def _parameter_name(buffer_name: str) -> str:
    """The name TVM's CUDA code generation gives a buffer's pointer parameter."""
    return re.sub(r"\W", "_", buffer_name) + "_ptr"


def argument_order(func: tvm.tirx.PrimFunc, kernel_parameters: list[str]) -> list[int] | None:
    """For each of a CUDA kernel's pointer parameters (names, in order), the index of the
    PrimFunc parameter it is; None where they do not name ``func``'s buffers one to one."""
    by_parameter = {_parameter_name(buffer.name): i for i, buffer in enumerate(func.params)}
    if set(by_parameter) != set(kernel_parameters):
        return None
    return [by_parameter[parameter] for parameter in kernel_parameters]


def kernel_name(cuda_kernels, func_name: str) -> str | None:
    """Of the CUDA kernel names ``cuda_kernels``, the one TVM made of PrimFunc ``func_name``;
    None if it made several (or none)."""
    names = [k for k in cuda_kernels if re.fullmatch(rf"{re.escape(func_name)}_kernel(_\d+)?", k)]
    return names[0] if len(names) == 1 else None
