"""INT8 post-training quantization (pipeline/quantization/, the quantize stage and command).

Models are the "micro" variant at 64x64 with 10 classes and layer scale 0.5 (the 1e-6 init
would make every block's branch invisible to the output). Calibration uses real
Fashion-MNIST images.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.quantization import calibrate, qdq, sensitivity
from pipeline.quantization.sensitivity import logit_metrics
from pipeline.quantization.settings import METHODS, QuantizeSettings

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
MICRO_LAYERS = 20  # 9 Conv (stem, 5 dwconv, 3 downsample) + 10 pwconv + head


def make_model(gamma: float = 0.5, stem_outlier: float | None = None, seed: int = 0):
    """A micro ConvNeXt whose blocks matter; optionally one huge stem weight (an outlier
    that per-tensor weight scales cannot hold)."""
    import torch

    from pipeline.model import create_model

    model = create_model("micro", num_classes=10, in_chans=3, seed=seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.fill_(gamma)
        if stem_outlier is not None:
            model.downsample_layers[0][0].weight[0, 0, 0, 0] = stem_outlier
    return model.eval()


def make_float_onnx(path: Path, **model_args) -> Path:
    """Export and simplify make_model(**model_args) as the simplify stage would."""
    import onnxsim

    from pipeline.stages.export import export_onnx

    raw = path.with_suffix(".raw.onnx")
    export_onnx(make_model(**model_args), raw, (1, 3, SIZE, SIZE), 17, False)
    simplified, ok = onnxsim.simplify(onnx.load(str(raw)))
    assert ok
    onnx.save(simplified, str(path))
    return path


def save_model_checkpoint(path: Path, **model_args) -> Path:
    from pipeline.checkpoints import save_checkpoint

    save_checkpoint(make_model(**model_args), path, variant="micro", num_classes=10, in_chans=3)
    return path


def calibration_images(count: int = 32) -> np.ndarray:
    images, _ = calibrate.load_calibration_images("fashion-mnist:train", (3, SIZE, SIZE), "fashion-mnist", count, seed=0)
    return images


def run_module_cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def float_onnx(tmp_path_factory) -> Path:
    return make_float_onnx(tmp_path_factory.mktemp("float") / "model.onnx")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return calibration_images()


@pytest.fixture(scope="module")
def reference(float_onnx, images) -> np.ndarray:
    return sensitivity.infer(float_onnx, images, 1)


def quantize(float_onnx: Path, images: np.ndarray, work: Path, **settings):
    calibrated, excluded = qdq.prepare(qdq.load_float_model(float_onnx), images, QuantizeSettings(**settings), work)
    return calibrated, calibrated.quantize(work / "model.int8.onnx", exclude=excluded)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    from onnx import numpy_helper

    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


# --- methods -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_every_method_quantizes_every_layer_and_keeps_the_logits(method, float_onnx, images, reference, tmp_path):
    calibrated, path = quantize(float_onnx, images, tmp_path, method=method)
    assert len(calibrated.layers) == MICRO_LAYERS
    assert len(qdq.quantized_layers(path)) == MICRO_LAYERS
    metrics = logit_metrics(reference, sensitivity.infer(path, images, 1))
    # 8 bits per layer over 20 layers: about 28 dB on this model with every method.
    assert metrics["sqnr_db"] > 20, metrics
    assert metrics["cosine_min"] > 0.98, metrics
    assert metrics["top1_agreement"] >= 0.9, metrics


def _ranges(calibrated) -> dict[str, tuple[float, float]]:
    from onnxruntime.quantization.calibrate import load_tensors_data

    return {name: tuple(float(v) for v in data.range_value) for name, data in load_tensors_data(calibrated.ranges).items()}


def test_percentile_and_mse_clip_inside_the_minmax_range(float_onnx, images, tmp_path):
    ranges = {
        method: _ranges(qdq.prepare(qdq.load_float_model(float_onnx), images, QuantizeSettings(method=method, percentile=99.0), tmp_path / method)[0])
        for method in ("minmax", "percentile", "mse")
    }
    assert ranges["minmax"].keys() == ranges["percentile"].keys() == ranges["mse"].keys()
    for method in ("percentile", "mse"):
        clipped = 0
        for name, (lo, hi) in ranges[method].items():
            full_lo, full_hi = ranges["minmax"][name]
            assert full_lo - 1e-6 <= lo and hi <= full_hi + 1e-6, (method, name)
            clipped += (hi - lo) < 0.95 * (full_hi - full_lo)
        assert clipped > 0, f"{method} clipped no tensor"


def test_mse_range_clips_a_heavy_tail_where_that_lowers_the_error():
    # Laplace tails: the 8-bit optimum clips near 10 b (Banner et al. 2019), inside the max (~12 b here).
    values = np.random.default_rng(0).laplace(0, 1, 200_000)
    threshold = np.abs(values).max()
    counts, edges = np.histogram(values, bins=2048, range=(-threshold, threshold))
    lo, hi = calibrate.mse_range(counts, edges, float(values.min()), float(values.max()))
    assert 7 < hi < 0.95 * values.max() and values.min() * 0.95 < lo < -7, (lo, hi, values.min(), values.max())
    centers = (edges[:-1] + edges[1:]) / 2
    error = lambda a, b: calibrate._int8_error(centers, counts.astype(float), np.array([a]), np.array([b]))[0]  # noqa: E731
    assert error(lo, hi) < error(values.min(), values.max())
    assert error(lo, hi) < error(lo * 0.7, hi * 0.7)


def test_unknown_method_and_bad_percentile_are_user_errors():
    with pytest.raises(PipelineError, match="unknown calibration method 'kl'.*minmax, percentile, entropy, mse"):
        QuantizeSettings(method="kl")
    with pytest.raises(PipelineError, match="--percentile 120"):
        QuantizeSettings(method="percentile", percentile=120)


# --- weights: per channel vs per tensor -----------------------------------------------------


def test_per_channel_weights_have_one_scale_per_output_channel(float_onnx, images, tmp_path):
    _, per_channel = quantize(float_onnx, images, tmp_path / "pc", per_channel=True)
    _, per_tensor = quantize(float_onnx, images, tmp_path / "pt", per_channel=False)
    stem_scale = "downsample_layers.0.0.weight_scale"
    assert initializer(onnx.load(str(per_channel)), stem_scale).shape == (16,)
    assert initializer(onnx.load(str(per_tensor)), stem_scale).shape == ()
    zero_points = [
        initializer(onnx.load(str(per_channel)), i.name)
        for i in onnx.load(str(per_channel)).graph.initializer if i.name.endswith("weight_zero_point")
    ]
    assert zero_points and all(np.all(z == 0) for z in zero_points)  # symmetric weights


def test_per_channel_survives_a_weight_outlier_that_per_tensor_does_not(tmp_path, images):
    model = make_float_onnx(tmp_path / "outlier.onnx", stem_outlier=20.0)
    reference = sensitivity.infer(model, images, 1)
    sqnr = {}
    for per_channel in (True, False):
        _, path = quantize(model, images, tmp_path / str(per_channel), per_channel=per_channel)
        sqnr[per_channel] = logit_metrics(reference, sensitivity.infer(path, images, 1))["sqnr_db"]
    assert sqnr[True] > sqnr[False] + 1.5, sqnr


# --- what stays float -----------------------------------------------------------------------


def test_layers_get_readable_names(float_onnx):
    model = qdq.load_float_model(float_onnx)
    renamed = qdq.name_layers(model)
    layers = qdq.quantizable_layers(model, renamed)
    assert all(layer.name.startswith("/") for layer in layers)
    assert len({layer.name for layer in layers}) == len(layers)
    names = [layer.name for layer in layers]
    assert "/stages.0/stages.0.0/pwconv2/Gemm" in names and "/head/Gemm" in names
    assert any(old.startswith("Gemm_") for old in renamed.values())  # onnxsim's anonymous names


def test_exclude_by_name_pattern_and_by_op_type(float_onnx, images, tmp_path):
    _, path = quantize(float_onnx, images, tmp_path / "stage3", exclude=("*/stages.3/*",))
    quantized = qdq.quantized_layers(path)
    assert len(quantized) == MICRO_LAYERS - 3 and not any("/stages.3/" in n for n in quantized)

    _, path = quantize(float_onnx, images, tmp_path / "gemm", exclude=("Gemm", "MatMul"))
    assert {n.split("/")[-1] for n in qdq.quantized_layers(path)} == {"Conv"}


def test_exclude_pattern_matching_nothing_is_an_error_but_float_ops_are_fine(float_onnx):
    model = qdq.load_float_model(float_onnx)
    layers = qdq.quantizable_layers(model, qdq.name_layers(model))
    with pytest.raises(PipelineError, match="--exclude 'pwconv9' matches no node"):
        qdq.resolve_exclude(model, layers, ["pwconv9"])
    assert qdq.resolve_exclude(model, layers, ["LayerNormalization"]) == {}


def test_layernorm_gelu_and_residual_ops_stay_float_and_read_float(float_onnx, images, tmp_path):
    _, path = quantize(float_onnx, images, tmp_path)
    model = onnx.load(str(path))
    quantize_outputs = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    rounded = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in quantize_outputs}
    float_ops = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "Erf", "Add", "Mul", "Transpose", "ReduceMean")]
    assert len(float_ops) > 40
    for node in float_ops:
        assert not rounded & set(node.input), f"{node.name} reads an int8-rounded copy"
    head = next(n for n in model.graph.node if n.name == "/head/Gemm")
    assert head.output[0] == "logits"  # the logits are not rounded to 8 bits either
    families = {f["family"]: f for f in qdq.float_op_families(qdq.load_float_model(float_onnx))}
    assert families["LayerNorm"]["ops"]["LayerNormalization"] == 6
    assert "convnext-facts.md" in families["LayerNorm"]["reason"]
    assert "Erf" in families["GELU"]["ops"]


def test_float_consumers_reading_float_beats_onnxruntime_layout(float_onnx, images, reference, tmp_path):
    sqnr = {}
    for float_outputs in (True, False):
        _, path = quantize(float_onnx, images, tmp_path / str(float_outputs), float_outputs=float_outputs)
        sqnr[float_outputs] = logit_metrics(reference, sensitivity.infer(path, images, 1))["sqnr_db"]
    assert sqnr[True] > sqnr[False] + 1.0, sqnr


# --- bad input ------------------------------------------------------------------------------


def test_an_already_quantized_model_is_refused(float_onnx, images, tmp_path):
    _, path = quantize(float_onnx, images, tmp_path)
    with pytest.raises(PipelineError, match="already quantized.*QuantizeLinear|already quantized.*DequantizeLinear"):
        qdq.load_float_model(path)


def test_no_calibration_data_names_the_option():
    with pytest.raises(PipelineError, match="--calib-data"):
        calibrate.calibration_source(None, None)
    assert calibrate.calibration_source(None, "fashion-mnist")[0] == "fashion-mnist:train"
    assert calibrate.calibration_source("some/folder", "fashion-mnist")[0] == "some/folder"


def _write_pngs(folder: Path, count: int, mode: str = "RGB") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        shape = (40, 48, 3) if mode == "RGB" else (40, 48)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i:03d}.png")
    return folder


def test_calibration_folder_empty_small_or_too_small(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PipelineError, match="holds no images"):
        calibrate.load_calibration_images(str(empty), (3, SIZE, SIZE), "imagenet", 256, 0)

    images, description = calibrate.load_calibration_images(str(_write_pngs(tmp_path / "ten", 10)), (3, SIZE, SIZE), "imagenet", 256, 0)
    assert images.shape == (10, 3, SIZE, SIZE)
    assert "asked for 256 calibration images" in description["note"] and "using 10" in description["note"]

    with pytest.raises(PipelineError, match="at least 8 images.*has 5 usable"):
        calibrate.load_calibration_images(str(_write_pngs(tmp_path / "five", 5)), (3, SIZE, SIZE), "imagenet", 256, 0)
    with pytest.raises(PipelineError, match="--calib-size 4 is too small"):
        calibrate.load_calibration_images(str(tmp_path / "ten"), (3, SIZE, SIZE), "imagenet", 4, 0)


def test_calibration_images_of_the_wrong_channel_count(tmp_path):
    two_channels = tmp_path / "two.npy"
    np.save(two_channels, np.zeros((16, 2, SIZE, SIZE), np.uint8))
    with pytest.raises(PipelineError, match="channel"):
        calibrate.load_calibration_images(str(two_channels), (3, SIZE, SIZE), "imagenet", 16, 0)
    # Grayscale files for an RGB model are adapted (1 -> 3 channels), not refused.
    images, _ = calibrate.load_calibration_images(str(_write_pngs(tmp_path / "gray", 8, "L")), (3, SIZE, SIZE), "imagenet", 8, 0)
    assert images.shape == (8, 3, SIZE, SIZE)


# --- the command and the stage --------------------------------------------------------------


@pytest.mark.slow
def test_quantize_command_writes_the_model_the_report_and_the_manifest(tmp_path):
    checkpoint = save_model_checkpoint(tmp_path / "model.pth")
    calib = _write_pngs(tmp_path / "calib", 12)
    result = run_module_cli(
        "pipeline.cli", "quantize", "--variant", "micro", "--weights", str(checkpoint),
        "--num-classes", "10", "--input-size", str(SIZE), "--calib-data", str(calib), "--calib-size", "64",
        "--method", "percentile", "--percentile", "99.9", "--per-tensor", "--exclude", "*/head/*", "--analyze",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "asked for 64 calibration images" in result.stderr
    outputs = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    quantized = Path(outputs["onnx_quantized"])
    manifest = json.loads((quantized.parent / "manifest.json").read_text())
    info = manifest["info"]
    assert info["settings"]["method"] == "percentile" and info["settings"]["per_channel"] is False
    assert info["float_layers"] == {"/head/Gemm": "--exclude '*/head/*'"}
    assert "LayerNorm" in info["float_ops"] and info["calibration"]["count"] == 12
    assert manifest["settings"]["calib_data_fingerprint"]

    report = json.loads((tmp_path / "reports" / "x86-int8" / "quantization.json").read_text())
    assert len(report["quantized_layers"]) == MICRO_LAYERS - 1
    assert len(report["sensitivity"]) == MICRO_LAYERS - 1
    assert [s["rank"] for s in report["sensitivity"]] == list(range(1, MICRO_LAYERS))
    markdown = (tmp_path / "reports" / "x86-int8" / "quantization.md").read_text()
    assert "## Sensitivity" in markdown and "| `/head/Gemm` | --exclude" in markdown

    # Another calibration does not replace that report: it goes beside it (issue 26).
    committed = (tmp_path / "reports" / "x86-int8" / "quantization.json").read_bytes()
    again = [arg for arg in result.args[3:] if arg != "--analyze"]  # after: python -m pipeline.cli
    again[again.index("99.9")] = "99.0"
    result = run_module_cli("pipeline.cli", *again, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "reports" / "x86-int8" / "quantization.json").read_bytes() == committed
    beside = tmp_path / "reports" / "x86-int8" / "calib-method-percentile-99.0"
    assert "holds a measurement of other settings" in result.stderr and "x86-int8/calib-method-percentile-99.0/" in result.stderr
    assert json.loads((beside / "quantization.json").read_text())["settings"]["percentile"] == 99.0


@pytest.mark.slow
def test_quantize_command_user_errors_exit_2_with_one_line(tmp_path):
    for args, message in [
        (["--method", "kl"], "unknown --method 'kl'"),
        (["--max-drop", "5"], "--max-drop 5.0 is not a fraction"),
        ([], "--calib-data"),
    ]:
        result = run_module_cli(
            "pipeline.cli", "quantize", "--variant", "micro", "--num-classes", "10",
            "--input-size", str(SIZE), *args, cwd=tmp_path,
        )
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr
        assert "Traceback" not in result.stderr
