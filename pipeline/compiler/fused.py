"""One way from an ONNX file to the kernels compile schedules: import, bind the weights (or
not), run the precision's phases (its record in pipeline/precisions.py) and compile's Relax
phases up to "schedule".

Compile (backend.compile_onnx), tuning (tuning/tasks.py) and the CUDA emulator
(pipeline/verify/cuda_emulator/gpu_build.py) all start here, so the kernels MetaSchedule tunes and the
emulator checks are the kernels compile builds: a setting that changes the kernels is a
field of CompileOptions, not an argument one caller remembers and another forgets.
What a pass reports (the int8 lowering's counts, the schedule phase's) travels on the
module it returns and is read off between phases (run_phases, pass_results.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import onnx
import tvm

from pipeline import precisions
from pipeline.compiler import int8, pass_results, weight_params
from pipeline.compiler.onnx_import import bind_weights, import_relax, output_spec, resolve_input
from pipeline.compiler.phases import Phase, pass_config, phases_before, precision_phases, relax_phases
from pipeline.config import PARAMS_MODES
from pipeline.errors import PipelineError
from pipeline.onnx_io import load_onnx
from targets import Target


@dataclass(frozen=True)
class CompileOptions:
    """Every setting that decides which kernels a model compiles to."""

    # A record of pipeline/precisions.py: fp32, fp16 (GPU targets: mixed precision) or int8
    # (a QDQ model lowered to integers).
    precision: str = "fp32"
    # "embedded": weights bound as constants; "separate": passed in at run time.
    params_mode: str = "embedded"
    # GPU targets: split GEMMs of few rows and deep K over K (split_k.py) where modeled faster.
    gpu_split_k: bool = True
    input_name: str | None = None
    input_shape: tuple[int, ...] | None = None

    def check(self, target: Target) -> None:
        """One line for settings the compiler cannot build for ``target``: an unknown params
        mode or precision, a params mode the precision does not allow, a device kind it is
        not built for (pipeline/precisions.py). What a target offers is the pipeline's check
        (Target.check_precision): the compiler builds int8 for GPUs too."""
        if self.params_mode not in PARAMS_MODES:
            raise PipelineError(f"unknown params_mode '{self.params_mode}'; use one of: {', '.join(PARAMS_MODES)}")
        plan = precisions.get(self.precision)
        plan.check_params_mode(self.params_mode)
        plan.check_builds(target.device, target.name)


@dataclass
class FusedModel:
    """A model after compile's phases up to scheduling: ``module``'s PrimFuncs are the kernels
    the schedule phase receives; with params "separate" its main takes the input, then the
    weights ``param_names`` (whose values, as imported, are ``param_values``)."""

    module: tvm.IRModule
    tvm_target: tvm.target.Target
    input: tuple[str, tuple[int, ...], str]
    # The imported model's output (onnx_import.output_spec), what the artifact returns.
    output: dict
    param_names: list[str]
    param_values: dict
    options: CompileOptions
    # What the phases' passes reported, by name (pass_results.py), read off the module.
    results: dict[str, Any] = field(default_factory=dict)
    param_transforms: dict = field(default_factory=dict)

    @property
    def int8_report(self) -> dict | None:
        """What the int8 lowering did (int8.Int8Report.to_dict()); None where it did not run."""
        return self.results.get(int8.INT8_RESULT)

    def prim_funcs(self) -> dict[str, tvm.tirx.PrimFunc]:
        return {gv.name_hint: f for gv, f in self.module.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def compile_phases(target: Target, options: CompileOptions, tuning_database: Path | None = None) -> list[Phase]:
    """Every phase compile runs, in order: the precision's (pipeline/precisions.py; int8's
    lowering first, once the weights are bound, which it needs), then relax_phases."""
    return [*precision_phases(options.precision, target),
            *relax_phases(target, tuning_database, options.gpu_split_k)]


def run_phases(mod: tvm.IRModule, phases: list[Phase], start: int, dump_ir: Callable | None = None,
               param_transforms: dict | None = None) -> tuple[tvm.IRModule, dict[str, Any], dict]:
    """``phases`` on ``mod``, inside the target and PassContext the caller entered; each
    phase's module goes to ``dump_ir(index, phase, module)`` (numbered from ``start``).
    Returns the module, what the passes reported by name (taken off the module after each
    phase: pass_results.py), and the weights' layout changes as the last phase that recorded
    them left them (weight_params.PARAM_TRANSFORMS_ATTR; ``param_transforms`` before any)."""
    results: dict[str, Any] = {}
    param_transforms = {} if param_transforms is None else param_transforms
    for index, (phase, passes) in enumerate(phases, start=start):
        if passes:
            mod, reported = pass_results.take_results(tvm.transform.Sequential(passes, name=phase)(mod))
            results.update(reported)
            if dump_ir:
                dump_ir(index, phase, mod)
            if weight_params.PARAM_TRANSFORMS_ATTR in (mod["main"].attrs or {}):
                param_transforms = weight_params.param_transforms(mod["main"])
    return mod, results, param_transforms


def _check_qdq_input(onnx_path: Path, precision: str) -> None:
    if onnx_path.is_file():
        ops = {node.op_type for node in onnx.load(str(onnx_path), load_external_data=False).graph.node}
        if "DequantizeLinear" not in ops:
            raise PipelineError(
                f"{onnx_path} is a float model; precision {precision} compiles the QDQ model that "
                "`pipeline quantize` writes"
            )


def fuse_model(onnx_path: Path, target: Target, options: CompileOptions = CompileOptions(),
               dump_ir=None) -> FusedModel:
    """``onnx_path`` through compile's phases up to "schedule", under the target and the
    PassContext settings compile uses. ``dump_ir(index, phase, module)``, if given, sees the
    module after the import (0), the weights' binding (1) and each phase (2, ...)."""
    options.check(target)
    onnx_path = Path(onnx_path)
    if precisions.get(options.precision).quantized:
        _check_qdq_input(onnx_path, options.precision)
    model = load_onnx(onnx_path)
    name, shape, dtype = resolve_input(model, options.input_name, options.input_shape)
    mod, param_names, param_values = import_relax(model, onnx_path, name, shape, dtype)
    output = output_spec(mod)
    if dump_ir:
        dump_ir(0, "imported", mod)
    if options.params_mode == "embedded":
        mod = bind_weights(mod, param_values)
        if dump_ir:
            dump_ir(1, "params_bound", mod)
    tvm_target = tvm.target.Target(target.tvm_target)
    with tvm_target, tvm.transform.PassContext(config=pass_config(target)):
        mod, results, param_transforms = run_phases(
            mod, phases_before(compile_phases(target, options), "schedule"), 2, dump_ir)
    fused = FusedModel(mod, tvm_target, (name, tuple(shape), dtype), output, param_names, param_values, options,
                       results, param_transforms)
    if fused.int8_report is not None and not fused.int8_report["integer_ops"]:
        raise PipelineError(
            f"{onnx_path} has no quantized convolution or matmul to compile in int8; "
            "pass the model `pipeline quantize` writes (QDQ format)"
        )
    return fused
