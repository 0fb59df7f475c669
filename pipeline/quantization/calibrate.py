"""Calibration: the images, and the activation ranges they give.

Ranges come from MinMax, Percentile or Entropy (ONNX Runtime's calibrators) or `mse`, ours:
ONNX Runtime has no MSE calibrator, so `MseCalibrater` collects the same histograms as its
entropy calibrater and picks, per tensor, the clip range whose int8 rounding has the least
squared error over the histogram. Ranges are computed once and written as ONNX Runtime's
calibration cache (pipeline/quantization/qdq.py `prepare`), so re-quantizing with other layers
excluded (sensitivity analysis, --max-drop) costs no new calibration.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from pipeline.errors import PipelineError
from pipeline.progress import Progress
from pipeline.quantization.settings import QUANTIZED_OP_TYPES, QuantizeSettings

MIN_CALIBRATION_IMAGES = 8
# Histogram resolution: Entropy's KL search is quadratic in it (ORT's loop is pure Python),
# MSE's is linear, Percentile needs it for the tail.
HISTOGRAM_BINS = {"percentile": 2048, "entropy": 512, "mse": 2048}
# Images per calibration session run: ORT's histogram calibraters keep every output of a
# collect_data call in memory, so calibration goes through in chunks.
CALIBRATION_CHUNK = 16


# ---------------------------------------------------------------------------
# Calibration data


def calibration_source(calib_data: str | None, data: str | None) -> tuple[str, str]:
    """(source to calibrate on, why that one)."""
    if calib_data is not None:
        return calib_data, "--calib-data"
    if data is None:
        raise PipelineError(
            "INT8 quantization needs calibration images; pass --calib-data PATH (an image folder, "
            ".npy/.npz, list file or 'fashion-mnist'), or --data"
        )
    if data == "fashion-mnist" or data == "fashion-mnist:test":
        # Evaluation reads the test split: calibrating on it would grade the quantization on
        # the images it was tuned to.
        return "fashion-mnist:train", "--data fashion-mnist (calibrated on its train split, evaluated on test)"
    return data, "--data (the evaluation images: pass --calib-data for a held-out set)"


def load_calibration_images(
    source: str, shape: tuple[int, int, int], preprocessing: str, size: int, seed: int
) -> tuple[np.ndarray, dict]:
    """(images (N, C, H, W) float32, a description for the manifest) for calibration.

    Fewer usable images than `size` is fine (all are used, and the description says so);
    fewer than MIN_CALIBRATION_IMAGES is an error."""
    from calibration import load_dataset

    channels, height, width = shape
    if size < MIN_CALIBRATION_IMAGES:
        raise PipelineError(f"--calib-size {size} is too small; calibrate on at least {MIN_CALIBRATION_IMAGES} images")
    if height != width:
        raise PipelineError(f"the model input is {height}x{width}; calibration preprocessing makes square images")
    dataset = load_dataset(
        source, input_size=height, preprocessing=preprocessing, in_chans=channels,
        limit=size, seed=seed, min_images=1, progress=True,
    )
    if len(dataset) < MIN_CALIBRATION_IMAGES:
        raise PipelineError(
            f"calibration needs at least {MIN_CALIBRATION_IMAGES} images and '{source}' has {len(dataset)} usable; "
            "add images or pass another --calib-data"
        )
    if dataset.images.shape[1:] != (channels, height, width):
        raise PipelineError(
            f"calibration images are {tuple(dataset.images.shape[1:])} but the model takes "
            f"{(channels, height, width)}; pass images with {channels} channels or another --preprocessing"
        )
    description = {
        "source": dataset.source,
        "description": dataset.description,
        "requested": size,
        "count": len(dataset),
        "skipped": len(dataset.skipped),
    }
    if len(dataset) < size:
        description["note"] = f"asked for {size} calibration images, '{source}' has {len(dataset)}: using {len(dataset)}"
    return dataset.images, description


def batches(images: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """(batch, real count) of exactly batch_size images; the last is padded with its last image."""
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        real = len(chunk)
        if real < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - real, axis=0)])
        yield np.ascontiguousarray(chunk), real


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over an array of images."""

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int):
        self._feeds = iter([{input_name: batch} for batch, _ in batches(images, batch_size)])

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


# ---------------------------------------------------------------------------
# Calibration


@contextlib.contextmanager
def quiet_ort() -> Iterator[None]:
    """ORT's quantizer prints histograms progress to stdout and warns about pre-processing
    (onnxsim did the shape inference and folding it recommends)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _mse_calibrater_class():
    from onnxruntime.quantization.calibrate import CalibrationMethod, HistogramCalibrater, TensorsData

    class MseCalibrater(HistogramCalibrater):
        """Per tensor, the clip range [lo, hi] whose int8 rounding has the least squared
        error over the collected histogram (ONNX Runtime has no MSE calibrator)."""

        def __init__(self, model_path, op_types_to_calibrate, augmented_model_path, num_bins: int):
            # The entropy calibrater's histogram: real values, symmetric bins around zero.
            super().__init__(
                model_path, op_types_to_calibrate, augmented_model_path,
                method="entropy", symmetric=False, num_bins=num_bins,
            )

        def compute_data(self) -> TensorsData:
            if not self.collector:
                raise ValueError("no calibration data collected")
            ranges = {
                name: mse_range(histogram[0], histogram[1], float(histogram[2]), float(histogram[3]))
                for name, histogram in self.collector.histogram_dict.items()
            }
            return TensorsData(
                CalibrationMethod.MinMax,
                {name: (np.array(lo, np.float32), np.array(hi, np.float32)) for name, (lo, hi) in ranges.items()},
            )

    return MseCalibrater


def _int8_error(centers: np.ndarray, counts: np.ndarray, lows: np.ndarray, highs: np.ndarray) -> np.ndarray:
    """Squared error of asymmetric int8 rounding (ORT's scale and zero point) per candidate range."""
    lows, highs = np.minimum(lows, 0.0), np.maximum(highs, 0.0)
    scale = np.maximum((highs - lows) / 255.0, 1e-12)[:, None]
    zero = np.round(-128.0 - lows[:, None] / scale)
    q = np.clip(np.round(centers[None, :] / scale) + zero, -128, 127)
    return (((q - zero) * scale - centers[None, :]) ** 2 * counts[None, :]).sum(axis=1)


def mse_range(counts: np.ndarray, edges: np.ndarray, lowest: float, highest: float) -> tuple[float, float]:
    """The [lo, hi] minimizing int8 rounding + clipping error over a histogram: a grid over
    each side's shrink factor, two rounds of coordinate descent."""
    counts = np.asarray(counts, np.float64)
    edges = np.asarray(edges, np.float64)
    if counts.sum() == 0 or highest <= lowest:
        return lowest, highest
    centers = (edges[:-1] + edges[1:]) / 2
    fractions = np.linspace(0.02, 1.0, 99)
    lo, hi = min(lowest, 0.0), max(highest, 0.0)
    for _ in range(2):
        candidates = hi * fractions
        hi = float(candidates[np.argmin(_int8_error(centers, counts, np.full_like(candidates, lo), candidates))])
        candidates = lo * fractions
        lo = float(candidates[np.argmin(_int8_error(centers, counts, candidates, np.full_like(candidates, hi)))])
    return lo, hi


def calibrate(
    model_path: Path, images: np.ndarray, settings: QuantizeSettings, work_dir: Path, batch_size: int
) -> "object":
    """Run the calibration images through the float model; return ORT TensorsData of
    (lowest, highest) per tensor, for every input and output of the quantizable ops."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData, create_calibrator

    input_name = _input_name(model_path)
    augmented = str(work_dir / "augmented.onnx")
    with quiet_ort():
        if settings.method == "mse":
            calibrator = _mse_calibrater_class()(
                model_path, list(QUANTIZED_OP_TYPES), augmented, HISTOGRAM_BINS["mse"]
            )
            calibrator.augment_graph()
            calibrator.create_inference_session()
        else:
            method = {
                "minmax": CalibrationMethod.MinMax,
                "percentile": CalibrationMethod.Percentile,
                "entropy": CalibrationMethod.Entropy,
            }[settings.method]
            extra = {"symmetric": False}  # activations are asymmetric: each side has its own range
            if settings.method in HISTOGRAM_BINS:
                extra["num_bins"] = HISTOGRAM_BINS[settings.method]
            if settings.method == "percentile":
                extra["percentile"] = settings.percentile
            calibrator = create_calibrator(
                model_path, list(QUANTIZED_OP_TYPES), augmented_model_path=augmented,
                calibrate_method=method, extra_options=extra,
            )
    progress = Progress(f"[quantize] calibrating ({settings.method})", len(images))
    for start in range(0, len(images), CALIBRATION_CHUNK):
        chunk = images[start:start + CALIBRATION_CHUNK]
        with quiet_ort():
            calibrator.collect_data(_Reader(input_name, chunk, batch_size))
        progress.update(start + len(chunk))
    with quiet_ort():
        computed = calibrator.compute_data()
    Path(augmented).unlink(missing_ok=True)
    # Plain (lowest, highest) pairs: quantize_static reads nothing else, and a MinMax-tagged
    # cache lets it take any method's ranges.
    ranges = {}
    for name, data in computed.items():
        lo, hi = data.range_value
        ranges[name] = (np.array(np.asarray(lo).min(), np.float32), np.array(np.asarray(hi).max(), np.float32))
    return TensorsData(CalibrationMethod.MinMax, ranges)


def _input_name(model_path: Path) -> str:
    model = onnx.load(str(model_path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in initializers)
