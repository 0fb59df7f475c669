"""What to quantize and how: the calibration methods, the op types that are quantized, and
`QuantizeSettings`, the one record of a quantization's choices (pipeline/quantization/calibrate.py
reads its method, pipeline/quantization/qdq.py the rest)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import PipelineError

METHODS = ("minmax", "percentile", "entropy", "mse")
# Layers with a constant weight of these op types are quantized; nothing else is.
QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm")


@dataclass(frozen=True)
class QuantizeSettings:
    """How to quantize: calibration method, per-channel weights, excluded layers."""

    method: str = "minmax"
    percentile: float = 99.99
    per_channel: bool = True
    exclude: tuple[str, ...] = ()
    # Float ops read a quantized layer's output unrounded (see float_consumers_read_float);
    # False keeps ONNX Runtime's layout, where every consumer reads the int8-rounded value.
    float_outputs: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PipelineError(f"unknown calibration method '{self.method}'; use one of: {', '.join(METHODS)}")
        if not 0 < self.percentile <= 100:
            raise PipelineError(f"--percentile {self.percentile} is outside (0, 100]; pass e.g. 99.99")

    @classmethod
    def from_config(cls, config) -> "QuantizeSettings":
        return cls(
            method=config.calib_method, percentile=config.calib_percentile,
            per_channel=config.quant_per_channel, exclude=tuple(config.quant_exclude),
        )

