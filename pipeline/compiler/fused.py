"""One way from an ONNX file to the kernels compile schedules: import, bind the weights (or
not), run the precision phase and compile's Relax phases up to "schedule".

Compile (backend.compile_onnx), tuning (tuning/tasks.py) and the CUDA emulator
(pipeline/verify/cuda_emulator/gpu_build.py) all start here, so the kernels MetaSchedule tunes and the
emulator checks are the kernels compile builds: a setting that changes the kernels is a
field of CompileOptions, not an argument one caller remembers and another forgets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx
import tvm

from pipeline.compiler import int8, vnni, weight_params
from pipeline.compiler.onnx_import import bind_weights, import_relax, output_spec, resolve_input
from pipeline.compiler.phases import Phase, pass_config, phases_before, precision_phases, relax_phases
from pipeline.config import PARAMS_MODES
from pipeline.errors import PipelineError
from pipeline.onnx_io import load_onnx
from targets import Target


@dataclass(frozen=True)
class CompileOptions:
    """Every setting that decides which kernels a model compiles to."""

    # fp32, fp16 (GPU targets: mixed precision) or int8 (a QDQ model lowered to integers).
    precision: str = "fp32"
    # "embedded": weights bound as constants; "separate": passed in at run time.
    params_mode: str = "embedded"
    # GPU targets: split GEMMs of few rows and deep K over K (split_k.py) where modeled faster.
    gpu_split_k: bool = True
    input_name: str | None = None
    input_shape: tuple[int, ...] | None = None

    def check(self) -> None:
        if self.params_mode not in PARAMS_MODES:
            raise PipelineError(f"unknown params_mode '{self.params_mode}'; use one of: {', '.join(PARAMS_MODES)}")
        if self.precision == "int8" and self.params_mode != "embedded":
            raise PipelineError(
                "precision int8 folds weights and scales into integer constants at compile time; "
                "use --params embedded"
            )


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
    int8_report: int8.Int8Report | None = None
    param_transforms: dict = field(default_factory=dict)

    def prim_funcs(self) -> dict[str, tvm.tirx.PrimFunc]:
        return {gv.name_hint: f for gv, f in self.module.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def compile_phases(target: Target, options: CompileOptions, int8_report: int8.Int8Report | None = None,
                   tuning_database: Path | None = None, schedule_report: dict | None = None) -> list[Phase]:
    """Every phase compile runs, in order: the int8 lowering (a QDQ model; first, once the
    weights are bound, which it needs), the precision rewrite, then relax_phases."""
    lowering: list[Phase] = []
    if options.precision == "int8":
        use_vnni = vnni.has_vnni(tvm.target.Target(target.tvm_target))
        lowering = [("int8", [int8.int8_lowering_pass(int8_report if int8_report is not None else int8.Int8Report(),
                                                      use_vnni)])]
    return [*lowering, *precision_phases(options.precision, target),
            *relax_phases(target, tuning_database, schedule_report, options.gpu_split_k)]


def _check_int8_input(onnx_path: Path) -> None:
    if onnx_path.is_file():
        ops = {node.op_type for node in onnx.load(str(onnx_path), load_external_data=False).graph.node}
        if "DequantizeLinear" not in ops:
            raise PipelineError(
                f"{onnx_path} is a float model; precision int8 compiles the QDQ model that "
                "`pipeline quantize` writes"
            )


def fuse_model(onnx_path: Path, target: Target, options: CompileOptions = CompileOptions(),
               dump_ir=None) -> FusedModel:
    """``onnx_path`` through compile's phases up to "schedule", under the target and the
    PassContext settings compile uses. ``dump_ir(index, phase, module)``, if given, sees the
    module after the import (0), the weights' binding (1) and each phase (2, ...)."""
    options.check()
    onnx_path = Path(onnx_path)
    if options.precision == "int8":
        _check_int8_input(onnx_path)
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
    report = int8.Int8Report() if options.precision == "int8" else None
    tvm_target = tvm.target.Target(target.tvm_target)
    param_transforms: dict = {}
    with tvm_target, tvm.transform.PassContext(config=pass_config(target)):
        for index, (phase, passes) in enumerate(phases_before(compile_phases(target, options, report), "schedule"),
                                                start=2):
            if passes:
                mod = tvm.transform.Sequential(passes, name=phase)(mod)
                if dump_ir:
                    dump_ir(index, phase, mod)
                if weight_params.PARAM_TRANSFORMS_ATTR in (mod["main"].attrs or {}):
                    param_transforms = weight_params.param_transforms(mod["main"])
    if report is not None and not report.lowered:
        raise PipelineError(
            f"{onnx_path} has no quantized convolution or matmul to compile in int8; "
            "pass the model `pipeline quantize` writes (QDQ format)"
        )
    return FusedModel(mod, tvm_target, (name, tuple(shape), dtype), output, param_names, param_values, options,
                      report, param_transforms)
