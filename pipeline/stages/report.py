"""report: latency.json + accuracy.json -> reports/<target>/ with report.md."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import artifacts, precisions
from pipeline.config import PipelineConfig
from pipeline.engine import Stage, log
from pipeline.provenance import portable, provenance
from targets import Target


def settings(config: PipelineConfig, target: Target) -> dict:
    return {"target": target.name, "reports_dir": str(config.reports_dir)}


def training_record(weights: str | None) -> dict | None:
    """The record `pipeline train` writes beside a checkpoint (<name>.json), if there is one."""
    if not weights:
        return None
    record_path = Path(weights).with_suffix(".json")
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    keys = ("command", "seed", "epochs", "test_top1", "test_top5", "sha256", "date")
    return {key: record.get(key) for key in keys} | {"record": str(record_path)}


def tuning_curve(tuning) -> list[dict]:
    """Best estimated latency against trials, from the database the artifact was compiled with
    (none where those were other models' records: their curve is those models' tuning)."""
    if not isinstance(tuning, dict) or not tuning.get("database") or tuning.get("records_of_models"):
        return []
    from pipeline.compiler.records import read_curve

    return read_curve(Path(tuning["database"]))


def curve_with_runs(tuning) -> list[dict]:
    """tuning_curve(tuning), after noting in tuning's cost how many tuning runs the curve joins
    (a resumed run appends to it): describe_tuning claims no time to converge across runs."""
    from reports.tuning_curve import count_runs

    curve = tuning_curve(tuning)
    if curve and isinstance(tuning.get("cost"), dict):
        tuning["cost"]["runs"] = count_runs(curve)
    return curve


def model_summary(inputs: dict[str, Path]) -> dict:
    """What the upstream manifests say about the model and the artifact."""
    build = artifacts.manifest_beside(inputs["checkpoint"]) if "checkpoint" in inputs else {}
    simplify = artifacts.manifest_beside(inputs["onnx_simplified"])
    compiled = artifacts.manifest_beside(inputs["library"])
    tuning = compiled.get("info", {}).get("tuning", "untuned")
    # A user's ONNX file has no build behind it: its hash is what names the model.
    onnx = {} if "checkpoint" in inputs else {"onnx_sha256": artifacts.file_sha256(Path(inputs["onnx_simplified"]))}
    return onnx | {
        "variant": build.get("settings", {}).get("variant", "user-supplied ONNX"),
        "num_classes": build.get("settings", {}).get("num_classes"),
        "parameters": build.get("info", {}).get("parameters"),
        "weights": build.get("info", {}).get("weights", "user-supplied ONNX"),
        "weights_sha256": build.get("info", {}).get("sha256"),
        "training": training_record(build.get("info", {}).get("path")),
        "checkpoint_sha256": build.get("output_sha256", {}).get("checkpoint"),
        "nodes_before": simplify.get("info", {}).get("nodes_before"),
        "nodes_after": simplify.get("info", {}).get("nodes_after"),
        "compile_seconds": compiled.get("seconds"),
        "target_json": compiled.get("settings", {}).get("target_json"),
        "tuning": tuning,
        # Which records made the kernels: measurements with other records are not comparable.
        "tuning_records": {
            "database": tuning.get("database") if isinstance(tuning, dict) else None,
            "sha256": compiled.get("settings", {}).get("tuning_database_sha256"),
        },
    }


def measured(latency: dict, accuracy: dict, quantization: dict | None = None) -> dict:
    """What a report measures, read from its records (committed ones too, whatever wrote
    them): the model, the input, the data and how many images, how latency was timed and, for
    INT8, how the model was calibrated. Not the machine, tools or tuning records: re-measuring
    the same thing elsewhere or after tuning is what replaces a report."""
    model = latency.get("model") or accuracy.get("model") or {}
    tvm = latency.get("backends", {}).get("tvm", {})
    data = accuracy.get("data", {})
    shape = latency.get("input_shape")
    settings = {
        "variant": model.get("variant"),
        "classes": model.get("num_classes"),
        # The file's hash names trained weights; random ones are named by their seed.
        "weights": (model.get("weights_sha256") or "")[:12] or model.get("weights"),
        "onnx": (model.get("onnx_sha256") or "")[:12] or None,
        "input": "x".join(str(n) for n in shape) if shape else None,
        "warmup": latency.get("warmup"),
        "repeats": tvm.get("repeats"),
        "data": data.get("source"),
        "images": data.get("count"),
        "preprocessing": data.get("preprocessing"),
    }
    if quantization:
        method, calibration = quantization.get("settings", {}), quantization.get("calibration", {})
        percentile = method.get("percentile") if method.get("method") == "percentile" else None
        settings |= {
            "calib-method": f"{method.get('method')}-{percentile}" if percentile else method.get("method"),
            "calib-per-channel": method.get("per_channel"),
            "calib-exclude": ",".join(method.get("exclude") or []) or "none",
            "calib-data": calibration.get("source"),
            "calib-images": calibration.get("count"),
        }
    return settings


def committed_measured(folder: Path) -> dict | None:
    """What the report committed in `folder` measures; None when it holds none."""
    from reports.committed import read_record

    latency, accuracy = read_record(folder / "latency.json"), read_record(folder / "accuracy.json")
    if latency is None and accuracy is None:
        return None
    return measured(latency or {}, accuracy or {}, read_record(folder / "quantization.json"))


def emulated_latency(config: PipelineConfig, target: Target, inputs: dict[str, Path]) -> dict:
    """The latency record of an evaluation under qemu: what was built, and no time, since an
    emulator's timings say nothing of the board's."""
    from reports.target_report import BOARD_LATENCY

    library = Path(inputs["library"])
    meta = json.loads(library.with_name(library.name + ".json").read_text())
    shape = [int(n) for n in meta["input"]["shape"]]
    params = library.with_name(meta["params_file"]) if meta.get("params_file") else None
    return {
        "target": target.name,
        "precision": config.precision,
        "batch_size": shape[0],
        "input_shape": shape,
        "warmup": None,
        "backends": {"tvm": {"not_measured": BOARD_LATENCY}},
        "tvm_speedup": {},
        "artifact_bytes": library.stat().st_size + (params.stat().st_size if params else 0),
    }


def run(config: PipelineConfig, target: Target, inputs: dict[str, Path], out_dir: Path) -> dict:
    from reports.committed import place
    from reports.target_report import render_report

    latency = (emulated_latency(config, target, inputs) if config.emulate
               else json.loads(Path(inputs["latency"]).read_text()))
    accuracy = json.loads(Path(inputs["accuracy"]).read_text())
    model = model_summary(inputs)
    curve = curve_with_runs(model.get("tuning"))
    origin = provenance()
    for record in (latency, accuracy):
        record["model"] = model
        record["provenance"] = origin
    # Committed and read on other machines: no paths of this one.
    latency, accuracy = portable(latency), portable(accuracy)
    model, origin = latency["model"], latency["provenance"]
    markdown = render_report(latency, accuracy, model, origin)
    if "quantization_report" in inputs:
        markdown += (
            "\nHow the INT8 model was made (calibration, method, layers kept in float, per-layer "
            "sensitivity): [quantization.md](quantization.md)\n"
        )
    (out_dir / "report.md").write_text(markdown)

    # The committed copy: one folder per target, or per target and precision beyond FP32;
    # beside it where that one measured something else (reports/committed.py).
    folder = Path(config.reports_dir) / (target.name if config.precision == "fp32" else f"{target.name}-{config.precision}")
    quantization = (portable(json.loads(Path(inputs["quantization_report"]).read_text()))
                    if "quantization_report" in inputs else None)
    committed = None if config.replace_report else committed_measured(folder)
    destination, note = place(folder, committed, measured(latency, accuracy, quantization))
    if note:
        log(f"[report] {note}")
    artifacts.atomic_write_json(destination / "latency.json", latency)
    artifacts.atomic_write_json(destination / "accuracy.json", accuracy)
    artifacts.atomic_write_text(destination / "report.md", markdown)
    if "quantization_report" in inputs:
        # How the INT8 model was made (method, layers kept in float, sensitivity), beside
        # the numbers it produced.
        quantized = Path(inputs["quantization_report"])
        for name in (quantized.name, "quantization.md"):
            artifacts.atomic_write_text(destination / name, portable((quantized.parent / name).read_text()))
    if curve:
        artifacts.atomic_write_json(destination / "tuning.json", {"database": model["tuning"]["database"], "curve": curve})
    else:
        # A curve of records this artifact was not compiled with would be drawn beside it.
        (destination / "tuning.json").unlink(missing_ok=True)
    log(f"[report] wrote {destination}/report.md")
    return {"outputs": {"report": "report.md"}, "info": {"reports_dir": str(destination)}}


def report_inputs(config: PipelineConfig) -> tuple[str, ...]:
    # Under emulation nothing is timed: no bench stage, no latency.json of it.
    common = (() if config.emulate else ("latency",)) + ("accuracy", "library", "onnx_simplified", "checkpoint")
    return common + (("quantization_report",) if precisions.get(config.precision).quantized else ())


STAGE = Stage(
    name="report",
    inputs=report_inputs,
    optional_inputs=("checkpoint",),
    outputs=("report",),
    settings=settings,
    run=run,
    cacheable=False,
)
