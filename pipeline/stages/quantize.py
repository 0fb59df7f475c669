"""quantize: simplified float ONNX -> INT8 QDQ ONNX (post-training, calibrated on images).

Runs only for precision int8: the compile stage then reads `onnx_quantized` instead of
`onnx_simplified`. See pipeline/quantization/ for what is quantized and why (qdq.py), how it
is calibrated (calibrate.py), and --analyze and --max-drop (sensitivity.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.engine import Stage, log
from pipeline.errors import PipelineError
from targets import Target

# Stored with the settings: changing either changes what the stage writes.
ACTIVATIONS = "int8 asymmetric per tensor"
WEIGHTS = "int8 symmetric"


def settings(config: PipelineConfig, target: Target) -> dict:
    from calibration.datasets import data_fingerprint

    source = config.calib_data if config.calib_data is not None else config.data
    return {
        "calib_data": source,
        "calib_data_fingerprint": data_fingerprint(source),
        "calib_size": config.calib_size,
        "preprocessing": config.preprocessing,
        "seed": config.seed,
        "method": config.calib_method,
        "percentile": config.calib_percentile if config.calib_method == "percentile" else None,
        "per_channel": config.quant_per_channel,
        "exclude": list(config.quant_exclude),
        "analyze": config.quant_analyze,
        "max_drop": config.quant_max_drop,
        "activations": ACTIVATIONS,
        "weights": WEIGHTS,
        "float_outputs": True,  # QuantizeSettings.float_outputs: float ops read unrounded outputs
    }


def check_max_drop(max_drop: float | None) -> None:
    if max_drop is not None and not 0 <= max_drop < 1:
        raise PipelineError(
            f"--max-drop {max_drop} is not a fraction in [0, 1); pass e.g. 0.01 for at most 1 point "
            "less top-1 agreement with FP32"
        )


def run(config: PipelineConfig, target: Target, inputs: dict[str, Path], out_dir: Path) -> dict:
    from pipeline.quantization import calibrate, qdq, sensitivity
    from pipeline.quantization.settings import QuantizeSettings

    quant_settings = QuantizeSettings.from_config(config)
    check_max_drop(config.quant_max_drop)
    model = qdq.load_float_model(inputs["onnx_simplified"])
    _, channels, height, width = qdq.input_shape(model)
    source, why = calibrate.calibration_source(config.calib_data, config.data)
    log(f"[quantize] calibration images from {source} ({why})")
    images, calibration = calibrate.load_calibration_images(
        source, (channels, height, width), config.preprocessing, config.calib_size, config.seed
    )
    log(f"[quantize] {calibration.get('note') or calibration['description']}")
    calibration["chosen_by"] = why

    work = out_dir / "work"
    calibrated, patterns = qdq.prepare(model, images, quant_settings, work)
    float_layers = {name: f"--exclude '{pattern}'" for name, pattern in patterns.items()}
    float_layers.update(calibrated.always_float)
    reference = sensitivity.infer(calibrated.float_model, images, calibrated.batch_size)
    output = out_dir / "model.int8.onnx"

    sensitivities = None
    if config.quant_analyze or config.quant_max_drop is not None:
        layers = [layer.name for layer in calibrated.layers if layer.name not in float_layers]
        sensitivities = sensitivity.analyze(calibrated, images, reference, work, layers)
    fallback = None
    if config.quant_max_drop is not None:
        fallback = sensitivity.fallback(
            calibrated, images, reference, config.quant_max_drop, float_layers, sensitivities, output
        )
    else:
        calibrated.quantize(output, exclude=float_layers)

    quantized = qdq.quantized_layers(output)
    if not quantized:
        hint = (
            f"--max-drop {config.quant_max_drop} needs every layer float: raise it"
            if fallback else "every layer is excluded: drop some --exclude patterns"
        )
        raise PipelineError(f"nothing was quantized; {hint}")
    check = sensitivity.logit_metrics(reference, sensitivity.infer(output, images, calibrated.batch_size))
    log(
        f"[quantize] {len(quantized)}/{len(calibrated.layers)} layers int8; on the calibration images "
        f"top-1 agreement with FP32 {check['top1_agreement']:.4f}, SQNR {check['sqnr_db']:.1f} dB"
    )
    report = {
        "settings": {
            "method": quant_settings.method,
            "percentile": quant_settings.percentile,
            "per_channel": quant_settings.per_channel,
            "exclude": list(quant_settings.exclude),
            "activations": ACTIVATIONS,
            "weights": WEIGHTS + (" per channel" if quant_settings.per_channel else " per tensor"),
            "format": "QDQ (ONNX Runtime quantize_static)",
            "float_outputs": quant_settings.float_outputs,
        },
        "calibration": calibration,
        "layer_count": len(calibrated.layers),
        "quantized_layers": quantized,
        "float_layers": float_layers,
        "float_ops": qdq.float_op_families(model),
        "fp32_vs_int8": {"data": "calibration images, ONNX Runtime", **check},
        "sensitivity": sensitivity.as_records(sensitivities) if sensitivities else None,
        "max_drop": fallback,
    }
    (out_dir / "quantization.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "quantization.md").write_text(sensitivity.render_markdown(report))
    shutil.move(str(calibrated.ranges), out_dir / "calibration_ranges.json")
    shutil.rmtree(work)
    info = {key: report[key] for key in ("settings", "calibration", "float_layers", "fp32_vs_int8")}
    info["quantized"] = f"{len(quantized)}/{len(calibrated.layers)} layers"
    info["float_ops"] = {f["family"]: f["reason"] for f in report["float_ops"]}
    if sensitivities:
        info["most_sensitive"] = [s.layer for s in sensitivities[:5]]
    return {
        "outputs": {"onnx_quantized": output.name, "quantization_report": "quantization.json"},
        "info": info,
    }


STAGE = Stage(
    name="quantize",
    inputs=("onnx_simplified",),
    outputs=("onnx_quantized", "quantization_report"),
    settings=settings,
    run=run,
)
