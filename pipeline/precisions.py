"""The precision plan: one record per arithmetic precision a model compiles in, and every
decision made by precision reads it.

- ``pipeline/config.py``: PRECISIONS, the names in display order;
- ``targets/``: which precisions a target offers (by its device kind: Target.precisions)
  and the one-line reason where a kind could build one but does not offer it;
- ``pipeline/stages/compile.py``: which stage's ONNX compile takes, and what can be tuned;
- ``pipeline/cli/tune.py``: the same, for the model it tunes;
- ``pipeline/compiler/fused.py``: the params modes it allows, the device kinds the compiler
  builds it for, and the compiler phases it adds (CompileOptions.check, compile_phases).

This module is a foundation (import-linter's foundations contract: it imports no layer), so
a record names its compiler phases by key, and pipeline/compiler/phases.py maps each key to
its passes (PRECISION_PHASES; a test checks that every key has them). Adding a precision
(bf16, say) is one record here and its phase function there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.errors import PipelineError

# Device kinds (targets.Target.device), as a sentence names them.
DEVICE_WORDS = {"cpu": "CPU", "cuda": "GPU"}


@dataclass(frozen=True)
class Precision:
    name: str
    # The pipeline stage whose ONNX model compile takes, and that stage's output.
    model_stage: str
    model_output: str
    # Compiler phases it runs before compile's Relax phases, in order (keys of
    # pipeline/compiler/phases.py's PRECISION_PHASES; each is also the phase's name).
    phases: tuple[str, ...]
    # Device kinds whose targets offer it (pipeline commands refuse the others).
    offered_on: tuple[str, ...]
    # Device kinds the compiler builds it for (compile_onnx refuses the others): at least
    # offered_on; more where the compiler can but the targets do not offer it (reason below).
    builds_on: tuple[str, ...]
    # Device kinds `pipeline tune` makes records for.
    tunable_on: tuple[str, ...]
    params_modes: tuple[str, ...] = ("embedded", "separate")
    # Why only params_modes, in one line; None where it allows every mode.
    params_reason: str | None = None
    # Why a device kind that builds it does not offer it, in one line that ends with what to use.
    not_offered: dict[str, str] = field(default_factory=dict, hash=False)

    @property
    def quantized(self) -> bool:
        """It compiles the QDQ model `pipeline quantize` writes, which needs calibration images."""
        return self.model_stage == "quantize"

    def offered(self, device: str) -> bool:
        return device in self.offered_on

    def tunable(self, device: str) -> bool:
        return device in self.tunable_on

    def check_params_mode(self, params_mode: str) -> None:
        if params_mode not in self.params_modes:
            raise PipelineError(self.params_reason or (
                f"precision {self.name} takes --params {' or '.join(self.params_modes)}, not '{params_mode}'"))

    def check_builds(self, device: str, target_name: str) -> None:
        """Refuse, in one line, a device kind the compiler does not build this precision for."""
        if device not in self.builds_on:
            kinds = " or ".join(DEVICE_WORDS.get(kind, kind) for kind in self.builds_on)
            raise PipelineError(f"precision {self.name} is for {kinds} targets, not '{target_name}'; "
                                f"use --precision {_either(offered(device))}")


# Measured on an NVIDIA H200 (reports/cuda-sm90-int8/report.md, 2026-12-04): ConvNeXt-T int8
# 28.1 ms per image at batch 1 against 4.99 ms for fp16, 5.6x slower, at 95.3% top-1 agreement
# with PyTorch fp32. TVM 0.27 cannot lower dlight's int8 tensor-core matmul (FloatMatmul in
# pipeline/compiler/schedules/gpu.py skips it), so the integer kernels of
# pipeline/compiler/int8.py run on dlight's non-tensor-core rules (issue #16). `pipeline
# targets` prints the reason on GPU rows; asking a GPU target for int8 fails with it.
GPU_INT8_REASON = (
    "int8 is not offered on GPU targets because without integer tensor-core kernels (TVM 0.27 cannot "
    "lower dlight's int8 tensor-core matmul) ConvNeXt-T int8 ran 5.6x slower than fp16 on an H200 "
    "(28.1 vs 4.99 ms, batch 1, 2026-12-04); use --precision fp16"
)

# In display order.
PLAN: dict[str, Precision] = {
    precision.name: precision
    for precision in (
        Precision("fp32", model_stage="simplify", model_output="onnx_simplified", phases=(),
                  offered_on=("cpu", "cuda"), builds_on=("cpu", "cuda"), tunable_on=("cpu", "cuda")),
        # Mixed precision: float16 operands, float32 accumulation (phases.py says how). Only GPU
        # targets: their tensor cores are where it pays off.
        Precision("fp16", model_stage="simplify", model_output="onnx_simplified", phases=("fp16",),
                  offered_on=("cuda",), builds_on=("cuda",), tunable_on=("cuda",)),
        # The QDQ model's convolutions and matmuls lowered to int8 x int8 -> int32
        # (pipeline/compiler/int8.py), its weights folded into integer constants.
        Precision("int8", model_stage="quantize", model_output="onnx_quantized", phases=("int8",),
                  offered_on=("cpu",), builds_on=("cpu", "cuda"), tunable_on=("cpu",),
                  params_modes=("embedded",),
                  params_reason=("precision int8 folds weights and scales into integer constants at compile "
                                 "time; use --params embedded"),
                  not_offered={"cuda": GPU_INT8_REASON}),
    )
}

PRECISIONS = tuple(PLAN)


def get(name: str) -> Precision:
    """The record of precision ``name``; an unknown name gets a one-line error listing the known ones."""
    if name not in PLAN:
        raise PipelineError(f"unknown precision '{name}'; use one of: {', '.join(PLAN)}")
    return PLAN[name]


def offered(device: str) -> tuple[str, ...]:
    """The precisions targets of device kind ``device`` offer, in display order."""
    return tuple(name for name, precision in PLAN.items() if precision.offered(device))


def tunable(device: str) -> tuple[str, ...]:
    """The precisions `pipeline tune` makes records for on device kind ``device``."""
    return tuple(name for name, precision in PLAN.items() if precision.tunable(device))


def _either(names: tuple[str, ...]) -> str:
    return " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"
