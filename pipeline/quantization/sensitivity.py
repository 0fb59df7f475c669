"""Which layers INT8 hurts, and keeping the worst ones in float.

`analyze`: for every quantizable layer, quantize ONLY that layer (same calibration ranges
as the full model) and measure how far the logits move from FP32 on the calibration
images: SQNR in dB (signal over quantization noise; higher is better, every 6 dB is
about one bit), cosine, top-1 agreement and max error. The layer with the lowest SQNR is
the most sensitive.

`fallback`: with the whole model quantized, while top-1 agreement with FP32 drops by more
than `max_drop`, put back in float the most sensitive layer not yet excluded and measure
again. Everything is run with ONNX Runtime on the QDQ model, which the TVM INT8 artifact
matches (tests/test_tvm_int8.py checks it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.compare import compare_logits
from pipeline.engine import log
from pipeline.progress import Progress
from pipeline.quantization.calibrate import batches
from pipeline.quantization.qdq import Calibrated


def infer(model_path: Path, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits of a model under ONNX Runtime (all graph optimizations, as users run it)."""
    from pipeline.runtime.runners import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(model_path)
    return np.concatenate([runner.infer(batch)[:real] for batch, real in batches(images, batch_size)])


# Reported for identical outputs, so that reports stay plain JSON (no Infinity).
SQNR_CAP_DB = 200.0


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """10 log10(signal power / error power) of `candidate` against `reference`, at most SQNR_CAP_DB."""
    reference = np.asarray(reference, np.float64)
    noise = float(np.sum((reference - np.asarray(candidate, np.float64)) ** 2))
    signal = float(np.sum(reference ** 2))
    if noise == 0:
        return SQNR_CAP_DB
    return float(min(10.0 * np.log10(max(signal, 1e-30) / noise), SQNR_CAP_DB))


def logit_metrics(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """The comparator's metrics plus SQNR, rounded for reports."""
    metrics = compare_logits(reference, candidate, labels)
    metrics["sqnr_db"] = sqnr_db(reference, candidate)
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}


@dataclass
class LayerSensitivity:
    layer: str
    op_type: str
    sqnr_db: float
    cosine_mean: float
    cosine_min: float
    top1_agreement: float
    max_abs_error: float
    rank: int = 0  # 1 = most sensitive


def analyze(
    calibrated: Calibrated, images: np.ndarray, reference: np.ndarray, work_dir: Path,
    layers: list[str] | None = None,
) -> list[LayerSensitivity]:
    """Per layer, the error of the model with only that layer quantized; most sensitive first."""
    work_dir.mkdir(parents=True, exist_ok=True)
    by_name = {layer.name: layer for layer in calibrated.layers}
    names = layers if layers is not None else list(by_name)
    progress = Progress("[quantize] sensitivity", len(names), unit="layers")
    results = []
    for index, name in enumerate(names, start=1):
        path = calibrated.quantize(work_dir / "single.onnx", only=[name])
        metrics = logit_metrics(reference, infer(path, images, calibrated.batch_size))
        results.append(LayerSensitivity(
            layer=name, op_type=by_name[name].op_type, sqnr_db=metrics["sqnr_db"],
            cosine_mean=metrics["cosine_mean"], cosine_min=metrics["cosine_min"],
            top1_agreement=metrics["top1_agreement"], max_abs_error=metrics["max_abs_error"],
        ))
        progress.update(index)
    (work_dir / "single.onnx").unlink(missing_ok=True)
    # Ties in SQNR (e.g. two perfect layers) keep graph order.
    results.sort(key=lambda r: (r.sqnr_db, -r.cosine_mean))
    for rank, result in enumerate(results, start=1):
        result.rank = rank
    return results


def fallback(
    calibrated: Calibrated,
    images: np.ndarray,
    reference: np.ndarray,
    max_drop: float,
    excluded: dict[str, str],
    sensitivities: list[LayerSensitivity],
    output: Path,
) -> dict:
    """Quantize into `output`, keeping the most sensitive layers float until top-1 agreement
    with FP32 is at least 1 - max_drop. Adds the layers it keeps float to `excluded`
    (layer -> reason) and returns the steps it took."""
    steps = []
    candidates = [s for s in sensitivities if s.layer not in excluded]

    def measure() -> dict:
        calibrated.quantize(output, exclude=excluded)
        metrics = logit_metrics(reference, infer(output, images, calibrated.batch_size))
        steps.append({
            "float_layers": len(excluded),
            "top1_agreement": metrics["top1_agreement"],
            "sqnr_db": metrics["sqnr_db"],
            "cosine_mean": metrics["cosine_mean"],
        })
        return metrics

    metrics = measure()
    while 1.0 - metrics["top1_agreement"] > max_drop and candidates:
        worst = candidates.pop(0)
        excluded[worst.layer] = (
            f"--max-drop {max_drop}: sensitivity rank {worst.rank} (SQNR {worst.sqnr_db:.1f} dB alone)"
        )
        metrics = measure()
        log(f"[quantize] --max-drop: {worst.layer} back to float -> agreement {metrics['top1_agreement']:.4f}")
    reached = 1.0 - metrics["top1_agreement"] <= max_drop
    if not reached:
        log(f"[quantize] --max-drop {max_drop} not reached even with every layer float")
    return {
        "max_drop": max_drop,
        "reached": reached,
        "kept_float": [name for name, why in excluded.items() if why.startswith("--max-drop")],
        "steps": steps,
        "final": metrics,
    }


def as_records(sensitivities: list[LayerSensitivity]) -> list[dict]:
    return [asdict(s) for s in sensitivities]


def render_markdown(report: dict) -> str:
    """quantization.md: settings, what stayed float and why, FP32 vs INT8, sensitivity table."""
    settings = report["settings"]
    lines = [
        "# INT8 quantization",
        "",
        f"Method **{settings['method']}**"
        + (f" (percentile {settings['percentile']})" if settings["method"] == "percentile" else "")
        + f", weights int8 symmetric {'per channel' if settings['per_channel'] else 'per tensor'}, "
        "activations int8 asymmetric per tensor, QDQ format (ONNX Runtime quantizer).",
        "",
        f"Calibration: {report['calibration']['count']} images from `{report['calibration']['source']}`"
        + (f" — {report['calibration']['note']}" if report["calibration"].get("note") else "")
        + ".",
        "",
        f"Quantized layers: {len(report['quantized_layers'])} of {report['layer_count']}.",
        "",
    ]
    check = report["fp32_vs_int8"]
    lines += [
        "## FP32 vs INT8 (ONNX Runtime, calibration images)",
        "",
        "| top-1 agreement | SQNR dB | cosine mean | cosine min | max abs error |",
        "|---|---|---|---|---|",
        f"| {check['top1_agreement']:.4f} | {check['sqnr_db']:.1f} | {check['cosine_mean']:.5f} "
        f"| {check['cosine_min']:.5f} | {check['max_abs_error']:.4g} |",
        "",
    ]
    if report["float_layers"]:
        lines += ["## Layers kept in float", "", "| layer | why |", "|---|---|"]
        lines += [f"| `{name}` | {why} |" for name, why in report["float_layers"].items()]
        lines.append("")
    lines += ["## Ops kept in float", "", "| family | ops | why |", "|---|---|---|"]
    for family in report["float_ops"]:
        ops = ", ".join(f"{op} x{n}" for op, n in family["ops"].items())
        lines.append(f"| {family['family']} | {ops} | {family['reason']} |")
    lines.append("")
    if report.get("sensitivity"):
        lines += [
            "## Sensitivity (only that layer quantized)",
            "",
            "| rank | layer | op | SQNR dB | cosine mean | top-1 agreement | max abs error |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in report["sensitivity"]:
            lines.append(
                f"| {s['rank']} | `{s['layer']}` | {s['op_type']} | {s['sqnr_db']:.1f} | {s['cosine_mean']:.5f} "
                f"| {s['top1_agreement']:.4f} | {s['max_abs_error']:.4g} |"
            )
        lines.append("")
    if report.get("max_drop"):
        fallback_ = report["max_drop"]
        lines += [
            f"## --max-drop {fallback_['max_drop']}",
            "",
            f"{'Reached' if fallback_['reached'] else 'Not reached'} with {len(fallback_['kept_float'])} "
            "layer(s) put back in float.",
            "",
            "| float layers | top-1 agreement | SQNR dB |",
            "|---|---|---|",
        ]
        lines += [f"| {s['float_layers']} | {s['top1_agreement']:.4f} | {s['sqnr_db']:.1f} |" for s in fallback_["steps"]]
        lines.append("")
    return "\n".join(lines)
