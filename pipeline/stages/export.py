"""export: checkpoint -> ONNX, checked by onnx's checker and against ONNX Runtime."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from pipeline.config import PipelineConfig
from pipeline.engine import Stage
from pipeline.errors import PipelineError
from targets import Target

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# The exported graph must reproduce PyTorch to this max abs error on random input.
EXPORT_TOLERANCE = 1e-4


def settings(config: PipelineConfig, target: Target) -> dict:
    return {
        "input_size": config.input_size,
        "batch_size": config.batch_size,
        "opset": config.opset,
        "dynamic_batch": config.dynamic_batch,
    }


def export_onnx(model, path: Path, input_shape: tuple[int, ...], opset: int, dynamic_batch: bool) -> None:
    """Export with the TorchScript exporter: the dynamo one needs onnxscript and
    gives the same graph for this convolution-only model."""
    import torch

    if opset < 17:
        raise PipelineError(f"opset {opset} has no LayerNormalization; pass --opset 17 or higher")
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(input_shape),), str(path), dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )


def check_against_torch(model, onnx_path: Path, input_shape: tuple[int, ...], seed: int) -> float:
    """Run onnx's checker and compare ONNX Runtime with PyTorch on random input."""
    import onnx
    import torch

    from pipeline.runtime.runners import OnnxRuntimeRunner

    onnx.checker.check_model(str(onnx_path), full_check=True)
    batch = np.random.default_rng(seed).standard_normal(input_shape, dtype=np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(batch)).numpy()
    actual = OnnxRuntimeRunner(onnx_path).infer(batch)
    return float(np.abs(expected - actual).max())


def run(config: PipelineConfig, target: Target, inputs: dict[str, Path], out_dir: Path) -> dict:
    from pipeline.checkpoints import load_model_from_checkpoint

    model = load_model_from_checkpoint(inputs["checkpoint"])
    in_chans = model.downsample_layers[0][0].in_channels
    input_shape = (config.batch_size, in_chans, config.input_size, config.input_size)
    path = out_dir / "model.onnx"
    export_onnx(model, path, input_shape, config.opset, config.dynamic_batch)
    max_error = check_against_torch(model, path, input_shape, config.seed)
    if max_error > EXPORT_TOLERANCE:
        raise PipelineError(
            f"exported ONNX differs from PyTorch by {max_error:.2e} (limit {EXPORT_TOLERANCE:.0e}); "
            "try another --opset"
        )
    return {
        "outputs": {"onnx": "model.onnx"},
        "info": {
            "input": {"name": INPUT_NAME, "shape": list(input_shape)},
            "output": OUTPUT_NAME,
            "opset": config.opset,
            "max_abs_error_vs_pytorch": max_error,
        },
    }


STAGE = Stage(name="export", inputs=("checkpoint",), outputs=("onnx",), settings=settings, run=run)
