"""A whole model as compiled for a CUDA target, run on this CPU: compile's graph (its GPU
rewrites included: channels-last, NHWC GEMMs, lifted weight layouts, casts fused into the
depthwise kernels) built for the CPU, with every kernel call handed to the CUDA emulator,
which runs that kernel as scheduled for the GPU. Its logits are what the GPU artifact
computes, short of nvcc's code generation: the GPU check's correctness half without a GPU."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from pipeline.verify.cuda_emulator.gpu_build import (
    fused_model,
    gpu_kernels,
    argument_order,
    kernel_name,
)
from pipeline.verify.cuda_emulator.program import EmulatedProgram, build_program
from pipeline.verify.cuda_emulator.source import KernelSignature, kernel_signatures
from pipeline.compiler.schedules import gpu as gpu_schedules
from targets import Target

_PACKED_PREFIX = "cuda_emulator."
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


class EmulationError(RuntimeError):
    """A kernel stopped in the emulator (a fault the GPU would have too)."""


@dataclass
class EmulatedModel:
    """``run(x)``: the model's output for input ``x`` (NCHW float32), every kernel emulated."""

    vm: relax.VirtualMachine | None
    params: list
    launches: int = 0

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x)), *self.params).numpy()


def _launcher(program: EmulatedProgram, signature: KernelSignature, func: tvm.tirx.PrimFunc,
              scheduled: tvm.tirx.PrimFunc, model: EmulatedModel):
    """The packed function a kernel call becomes: its arguments (inputs, then outputs, as
    the PrimFunc's parameters) go to the emulator in the CUDA kernel's parameter order."""
    cuda_kernel = signature.name
    order = argument_order(func, [parameter for _, parameter in signature.parameters])
    if order is None:
        raise EmulationError(f"{cuda_kernel}: its parameters do not name its function's buffers")
    grid, block = gpu_schedules.launch_dims(scheduled)

    def launch(*tensors):
        arrays = [tensor.numpy() for tensor in tensors]
        result = program.launch(cuda_kernel, grid, block, [arrays[i] for i in order])
        if not result.ok:
            raise EmulationError(f"{cuda_kernel}: {result.error}")
        model.launches += 1
        for tensor, array in zip(tensors, arrays):
            tensor.copyfrom(array)

    return launch


def _kernel_calls_to_packed(mod: tvm.IRModule) -> tvm.IRModule:
    """main with each call_tir to a kernel as a call_dps_packed to "cuda_emulator.<kernel>"."""

    @relax.expr_functor.mutator
    class KernelCallsToPacked(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op.same_as(_CALL_TIR):
                return relax.call_dps_packed(_PACKED_PREFIX + call.args[0].name_hint, call.args[1],
                                             out_ty=list(call.ty_args))
            return call

    main = KernelCallsToPacked().visit_expr(mod["main"])
    return tvm.IRModule({"main": main})


def emulated_model(onnx_path: Path, target: Target, *, precision: str = "fp16",
                   input_shape: tuple[int, ...] | None = None, gpu_split_k: bool = True) -> EmulatedModel:
    """``onnx_path`` compiled for ``target`` up to its kernels, ready to run on this CPU."""
    fused = fused_model(onnx_path, target, precision=precision, input_shape=input_shape, gpu_split_k=gpu_split_k)
    prim_funcs = {gv.name_hint: f for gv, f in fused.module.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    kernels = gpu_kernels(prim_funcs, target)
    program = build_program(kernels.cuda_source)
    signatures = {k.name: k for k in kernel_signatures(kernels.cuda_source)}
    cpu_module = _kernel_calls_to_packed(fused.module)
    model = EmulatedModel(None, [tvm.runtime.tensor(value) for value in fused.params.values()])
    # The VM looks its packed functions up when it is made: register them first.
    for name, func in prim_funcs.items():
        cuda_kernel = kernel_name(signatures, name)
        if cuda_kernel is None:
            raise EmulationError(f"{name}: TVM made several CUDA kernels of it; the emulator runs single-kernel functions")
        tvm.register_global_func(_PACKED_PREFIX + name,
                                 _launcher(program, signatures[cuda_kernel], func, kernels.scheduled[name], model),
                                 override=True)
    model.vm = relax.VirtualMachine(tvm.compile(cpu_module, target="llvm"), tvm.cpu())
    return model
