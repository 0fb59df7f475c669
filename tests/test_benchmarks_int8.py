"""benchmarks/int8_speed.py end to end on a tiny model: both artifacts built through the
stages, four backends timed, the INT8 artifact compared with the FP32 one; and its one-line
errors. The speed goal itself is the benchmark's to measure, never a test's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark_scripts import load
from calibration import fashion_mnist

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "int8_speed.py"
# Calibration needs at least 8 images (pipeline/quantization/calibrate.py MIN_CALIBRATION_IMAGES).
TINY = ["--variant", "micro", "--input-size", "32", "--num-classes", "10", "--warmup", "1", "--repeats", "2",
        "--calib-size", "8", "--eval-images", "4"]


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
@pytest.mark.skipif(not fashion_mnist.available(), reason="needs Debian's dataset-fashion-mnist package")
def test_int8_speed_benchmark_end_to_end(tmp_path):
    out = tmp_path / "int8_speed.json"
    result = run_script(*TINY, "--artifacts", str(tmp_path / "artifacts"), "--json", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for step in ("[quantize] running", "[compile] running", "timing tvm int8", "accuracy"):
        assert step in result.stderr
    record = json.loads(out.read_text())
    (batch,) = record["batches"]
    fp32, int8 = batch["artifacts"]["fp32"], batch["artifacts"]["int8"]
    # Paths relative to where it ran: the committed record names no folder of the machine.
    assert fp32["library"].startswith("artifacts/compile/") and str(tmp_path) not in out.read_text()
    assert (tmp_path / fp32["library"]).is_file() and (tmp_path / int8["library"]).is_file()
    assert int8["bytes"] < fp32["bytes"] and batch["size_ratio"] == pytest.approx(fp32["bytes"] / int8["bytes"])
    assert batch["int8_speedup"]["tvm"] > 0 and batch["int8_speedup"]["onnxruntime"] > 0
    assert {(row["backend"], row["precision"]) for row in batch["rows"]} == {
        ("tvm", "fp32"), ("tvm", "int8"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")}
    assert all(row["median_ms"] > 0 for row in batch["rows"])
    # Kernels with records plus kernels on default schedules: every kernel, for both artifacts.
    for artifact in (fp32, int8):
        assert artifact["kernels_from_records"] + artifact["kernels_default"] == artifact["kernels_total"] > 0
    assert sum(int8["int8"]["integer_ops"].values()) > 0
    assert "vnni_ops" in int8["int8"]
    accuracy = batch["accuracy"]
    assert 0 <= accuracy["top1_agreement"] <= 1 and accuracy["count"] == 4
    # Held out: evaluated on the test split, calibrated on the train split.
    assert record["evaluation"]["source"] == "fashion-mnist:test"
    assert record["provenance"]["commit"]
    table = out.with_suffix(".txt").read_text()
    assert "INT8 / FP32 speed-up" in table and "held-out images" in table and "measured on" in table


@pytest.mark.parametrize("args, message", [
    (["--variant", "nope"], "unknown variant 'nope'"),
    (["--variant", "micro", "--data", "/no/such/images"], "--data: image folder '/no/such/images' does not exist"),
])
def test_int8_speed_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = run_script(*args, "--artifacts", str(tmp_path / "artifacts"), cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]


def _script_module():
    return load("int8_speed")


def test_held_out_images_skip_the_calibration_images_of_the_same_source(tmp_path):
    import numpy as np

    from pipeline.config import PipelineConfig
    from pipeline.errors import PipelineError
    from pipeline.quantization.calibrate import load_calibration_images

    source = tmp_path / "images.npy"
    np.save(source, np.random.default_rng(0).standard_normal((20, 3, 32, 32), dtype=np.float32))
    config = PipelineConfig(input_size=32, data=str(source), calib_size=8, seed=3)
    held_out, description = _script_module().held_out_images(config, 4)
    # What the quantize stage calibrates on, read the way it reads it.
    calibration, _ = load_calibration_images(str(source), (3, 32, 32), config.preprocessing, 8, config.seed)
    assert held_out.shape == (4, 3, 32, 32) and description["count"] == 4
    assert not {image.tobytes() for image in held_out} & {image.tobytes() for image in calibration}
    with pytest.raises(PipelineError, match="no images left"):
        _script_module().held_out_images(config.replace(calib_size=20), 4)


# --- the committed record is replaced only by a run of the same settings -----------------------

COMMITTED = REPO / "reports" / "benchmarks" / "int8_speed.json"


def test_a_narrowed_run_goes_beside_the_committed_record(tmp_path, capsys):
    script = _script_module()
    committed = tmp_path / "int8_speed.json"
    committed.write_bytes(COMMITTED.read_bytes())
    # The Makefile's defaults, then BENCH_ARGS narrowing them (the last of an option wins).
    makefile = ["--variant", "tiny", "--batches", "1", "--repeats", "20", "--json", str(committed)]
    assert script.destination(script.parse_args(makefile)) == committed
    narrowed = script.parse_args([*makefile, "--variant", "micro", "--input-size", "32"])
    assert script.destination(narrowed) == tmp_path / "variant-micro_input-size-32" / "int8_speed.json"
    assert (f"{committed} holds a measurement of other settings (variant tiny there, micro here; input-size 224 "
            f"there, 32 here)") in capsys.readouterr().err
    narrowed.replace_report = True
    assert script.destination(narrowed) == committed


@pytest.mark.slow
@pytest.mark.skipif(not fashion_mnist.available(), reason="needs Debian's dataset-fashion-mnist package")
def test_int8_speed_keeps_a_record_of_other_settings(tmp_path):
    out = tmp_path / "int8_speed.json"
    out.write_bytes(COMMITTED.read_bytes())
    result = run_script(*TINY, "--artifacts", str(tmp_path / "artifacts"), "--json", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == COMMITTED.read_bytes()
    assert result.stderr.splitlines()[0].startswith(f"[int8_speed] {out} holds a measurement of other settings")
    beside = Path(result.stdout.strip().splitlines()[-1].removeprefix("json: "))
    assert beside.parent.parent == tmp_path and json.loads(beside.read_text())["settings"]["variant"] == "micro"
    assert beside.with_suffix(".txt").is_file()
