"""`pipeline quantize`: calibrate and quantize the model to INT8 (QDQ ONNX), optionally with a
per-layer sensitivity analysis and a float fallback for the layers that hurt most.

Registered on the main app by `pipeline.cli` with `register(app)`. The model options
(variant, weights, input size, --onnx, ...) are the stage commands' own, taken from
`pipeline.cli.options` so that they cannot drift apart; the quantization options are added here.
The run also writes the quantization report to <reports-dir>/<target>-int8/.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.errors import PipelineError

# The stage commands' options that matter to quantization (bench/evaluate ones do not).
MODEL_OPTIONS = (
    "target", "variant", "weights", "num_classes", "in_chans", "seed", "input_size", "batch_size",
    "opset", "dynamic_batch", "data", "preprocessing", "onnx", "artifacts", "reports_dir", "replace_report", "force",
)


def _quantize_options(
    method: Annotated[str, typer.Option(help="Calibration: minmax, percentile, entropy or mse.")] = "minmax",
    percentile: Annotated[float, typer.Option(help="Percentile kept by --method percentile.")] = 99.99,
    per_channel: Annotated[bool, typer.Option("--per-channel/--per-tensor", help="Weight scales per output channel or one per tensor.")] = True,
    calib_size: Annotated[int, typer.Option(help="Calibration images (fewer available: all are used).")] = 256,
    calib_data: Annotated[Optional[str], typer.Option(help="Calibration images: folder, .npy/.npz, list file or 'fashion-mnist'. Default: --data (Fashion-MNIST: its train split).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="Keep layers matching this pattern in float (fnmatch on node names and op types; repeatable).")] = None,
    analyze: Annotated[bool, typer.Option(help="Measure each layer's error with only it quantized; write the table to the report.")] = False,
    max_drop: Annotated[Optional[float], typer.Option(help="Keep the most sensitive layers float until top-1 agreement with FP32 drops by at most this fraction (e.g. 0.01).")] = None,
) -> None:
    """Signature holder: its parameters are appended to the model options."""


def _config_from_options(options: dict):
    """PipelineConfig from the command's options: the model options as every command maps
    them, plus the quantization ones."""
    from pipeline.cli.options import config_from_options

    return config_from_options(options).replace(
        precision="int8",
        calib_method=options["method"], calib_percentile=options["percentile"],
        quant_per_channel=options["per_channel"], quant_exclude=tuple(options["exclude"] or ()),
        quant_analyze=options["analyze"], quant_max_drop=options["max_drop"],
    )


def _calibration(record: dict) -> dict:
    """What a quantization report describes: how the model was calibrated and which layers
    were quantized (the layer names tell one model from another)."""
    from pipeline.stages.report import measured

    layers = record.get("quantized_layers") or []
    return {**{key: value for key, value in measured({}, {}, record).items() if key.startswith("calib-")},
            "quantized-layers": f"{len(layers)}-{hashlib.sha256(json.dumps(layers).encode()).hexdigest()[:8]}"}


def _report_folder(folder: Path, new_report: Path, replace: bool) -> Path:
    """Where the quantization report goes: `folder`, unless it holds the report of another
    calibration or model (whose numbers its latency and accuracy reports are), then beside it
    (reports/committed.py, the rule every committed report follows)."""
    from pipeline.engine import log
    from reports.committed import place, read_record

    committed = None if replace else read_record(folder / "quantization.json")
    destination, note = place(folder, _calibration(committed) if committed is not None else None,
                              _calibration(json.loads(new_report.read_text())))
    if note:
        log(f"[quantize] {note}")
    return destination


def quantize_command(**options) -> None:
    """Calibrate and quantize the model to INT8 (QDQ ONNX); --analyze ranks layers by sensitivity."""
    from pipeline import artifacts
    from pipeline.engine import log
    from pipeline.cli.options import run_stages
    from pipeline.quantization.settings import METHODS
    from pipeline.stages.quantize import check_max_drop
    from targets import get_target

    if options["method"] not in METHODS:
        raise PipelineError(f"unknown --method '{options['method']}'; use one of: {', '.join(METHODS)}")
    check_max_drop(options["max_drop"])
    config = _config_from_options(options)
    onnx = options.get("onnx")
    target = get_target(options["target"])
    results = run_stages("quantize", config, target, onnx, bool(options.get("force")))
    result = results["quantize"]
    destination = _report_folder(Path(config.reports_dir) / f"{target.name}-int8", result.path / "quantization.json",
                                 config.replace_report)
    destination.mkdir(parents=True, exist_ok=True)
    for name in ("quantization.json", "quantization.md"):
        artifacts.atomic_write_text(destination / name, (result.path / name).read_text())
    log(f"[quantize] wrote {destination}/quantization.md")
    for name, path in result.outputs.items():
        print(f"{name}: {path}")


def _signature() -> inspect.Signature:
    from pipeline.cli.options import model_parameters

    extra = list(inspect.signature(_quantize_options, eval_str=True).parameters.values())
    return inspect.Signature(model_parameters(MODEL_OPTIONS) + extra)


def register(app: typer.Typer) -> None:
    """Add the `quantize` command to `app`."""
    quantize_command.__signature__ = _signature()
    app.command(name="quantize")(quantize_command)
