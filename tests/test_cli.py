"""The whole pipeline through the command line, as a user drives it."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import MEASURE_ARGS, TINY_ARGS, output_path, run_cli

pytestmark = pytest.mark.slow


def assert_user_error(result, *fragments: str) -> None:
    """Exit code 2, one line on stderr, no traceback."""
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_run_writes_reports_and_artifacts(tiny_run):
    report_dir = tiny_run / "reports" / "x86"
    latency = json.loads((report_dir / "latency.json").read_text())
    accuracy = json.loads((report_dir / "accuracy.json").read_text())
    assert set(latency["backends"]) == {"tvm", "onnxruntime", "pytorch"}
    for stats in latency["backends"].values():
        assert stats["repeats"] == 3
        assert stats["min_ms"] <= stats["median_ms"] <= stats["p99_ms"] <= stats["max_ms"]
        assert stats["throughput_ips"] > 0
    # Every backend computes on all physical cores: TVM's pool is sized like the others.
    from pipeline.runtime.runtime_only import physical_cores

    assert {name: stats["threads"] for name, stats in latency["backends"].items()} == dict.fromkeys(
        latency["backends"], physical_cores()
    )
    assert accuracy["metrics"]["top1_agreement"] == 1.0
    assert accuracy["metrics"]["max_abs_error"] < 1e-4
    assert latency["provenance"]["commit"] and latency["provenance"]["tools"]["apache-tvm"]
    markdown = (report_dir / "report.md").read_text()
    assert "| tvm |" in markdown and "| onnxruntime |" in markdown and "| pytorch |" in markdown
    for stage in ("build", "export", "simplify", "compile", "bench", "evaluate", "report"):
        (stage_dir,) = (tiny_run / "artifacts" / stage).iterdir()
        assert (stage_dir / "manifest.json").is_file()


def test_rerun_is_cached_and_changed_setting_rebuilds_downstream_only(tiny_run):
    again = run_cli("compile", *TINY_ARGS, cwd=tiny_run, check=True)
    for stage in ("build", "export", "simplify", "compile"):
        assert f"[{stage}] cached" in again.stderr
    separate = run_cli("compile", *TINY_ARGS, "--params", "separate", cwd=tiny_run, check=True)
    for stage in ("build", "export", "simplify"):
        assert f"[{stage}] cached" in separate.stderr
    assert "[compile] running" in separate.stderr
    assert "params:" in separate.stdout


def test_simplify_records_node_counts(tiny_run):
    (stage_dir,) = (tiny_run / "artifacts" / "simplify").iterdir()
    info = json.loads((stage_dir / "manifest.json").read_text())["info"]
    assert info["nodes_after"] <= info["nodes_before"]
    assert info["max_abs_error_vs_original"] < 1e-5


def test_export_is_checked_against_pytorch(tiny_run):
    (stage_dir,) = (tiny_run / "artifacts" / "export").iterdir()
    info = json.loads((stage_dir / "manifest.json").read_text())["info"]
    assert info["opset"] >= 17 and info["max_abs_error_vs_pytorch"] <= 1e-4
    assert info["input"] == {"name": "input", "shape": [1, 3, 64, 64]}


def test_evaluate_on_labeled_image_folder(tiny_run, tmp_path):
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (70, 80, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / label / f"{i}.png")
    (tmp_path / "data" / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    result = run_cli("evaluate", *TINY_ARGS, *MEASURE_ARGS, "--data", str(tmp_path / "data"), cwd=tiny_run, check=True)
    accuracy = json.loads(output_path(result, "accuracy").read_text())
    metrics = accuracy["metrics"]
    assert accuracy["data"]["count"] == 6 and accuracy["data"]["skipped"] == 1
    assert metrics["top1"] == metrics["reference_top1"] and 0.0 <= metrics["top5"] <= 1.0
    assert metrics["top1_agreement"] == 1.0


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--variant", "gigantic"], ["unknown variant 'gigantic'", "atto"]),
        (["--target", "pdp11"], ["unknown target 'pdp11'", "x86"]),
        (["--weights", "missing.pth"], ["weights file 'missing.pth' does not exist"]),
        (["--input-size", "65"], ["--input-size 65 is not valid: it must be a multiple of 32, at least 32"]),
        (["--input-size", "0"], ["--input-size 0 is not valid: it must be a multiple of 32, at least 32"]),
        (["--precision", "int4"], ["unknown precision 'int4'"]),
    ],
)
def test_bad_arguments_fail_fast(tmp_path, args, fragments):
    assert_user_error(run_cli("compile", *TINY_ARGS, *args, cwd=tmp_path), *fragments)
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").rglob("*.so"))


def test_weights_that_are_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pth").write_bytes(os.urandom(256))
    assert_user_error(run_cli("build", *TINY_ARGS, "--weights", "junk.pth", cwd=tmp_path), "not a PyTorch checkpoint")
    assert not list((tmp_path / "artifacts" / "build").glob("*/model.pth"))


def test_weights_for_another_variant(tmp_path):
    from pipeline.checkpoints import save_checkpoint
    from pipeline.model import create_model

    save_checkpoint(create_model("mini", num_classes=10), tmp_path / "mini.pth", "mini", 10, 3)
    assert_user_error(run_cli("build", *TINY_ARGS, "--weights", "mini.pth", cwd=tmp_path), "--variant mini")


def test_user_checkpoint_is_loaded(tmp_path):
    from pipeline.checkpoints import save_checkpoint
    from pipeline.model import create_model

    save_checkpoint(create_model("micro", num_classes=10, seed=7), tmp_path / "w.pth", "micro", 10, 3)
    result = run_cli("build", *TINY_ARGS, "--weights", "w.pth", cwd=tmp_path, check=True)
    manifest = json.loads((output_path(result, "checkpoint").parent / "manifest.json").read_text())
    assert manifest["info"]["layout"] == "official"


@pytest.mark.parametrize("setup, fragments", [
    ("missing", ["does not exist", "--data"]),
    ("empty", ["no images"]),
    ("unreadable", ["unreadable"]),
])
def test_bad_image_folders(tiny_run, tmp_path, setup, fragments):
    folder = tmp_path / "images"
    if setup != "missing":
        folder.mkdir()
    if setup == "unreadable":
        for i in range(3):
            (folder / f"{i}.jpg").write_bytes(b"garbage")
    result = run_cli("evaluate", *TINY_ARGS, *MEASURE_ARGS, "--data", str(folder), cwd=tiny_run)
    assert_user_error(result)
    message = result.stderr.lower()
    for fragment in fragments:
        assert fragment.lower() in message, result.stderr


def test_corrupt_onnx(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage")
    result = run_cli("compile", *TINY_ARGS, "--onnx", "bad.onnx", cwd=tmp_path)
    assert_user_error(result, "bad.onnx")
    assert not list((tmp_path / "artifacts").rglob("*.so"))


def test_onnx_with_wrong_input_shape(tiny_run, tmp_path):
    (onnx_file,) = (tiny_run / "artifacts" / "simplify").glob("*/model.sim.onnx")
    result = run_cli("compile", *TINY_ARGS[:2], "--input-size", "96", "--onnx", str(onnx_file), cwd=tmp_path)
    assert_user_error(result, "input")
    assert not list((tmp_path / "artifacts").rglob("*.so"))


def test_unwritable_artifacts_directory(tmp_path):
    (tmp_path / "file").write_text("")
    # A file where a folder must be: the cache root cannot be created (a cache hit would still be served).
    assert_user_error(run_cli("build", *TINY_ARGS, "--artifacts", "file/sub", cwd=tmp_path),
                      "artifacts directory 'file/sub' cannot be created", "--artifacts DIR")


def test_targets_and_variants_listings(tmp_path):
    assert "x86" in run_cli("targets", cwd=tmp_path, check=True).stdout
    listing = run_cli("variants", cwd=tmp_path, check=True).stdout
    for name in ("atto", "femto", "pico", "nano", "tiny", "small", "base", "large", "xlarge"):
        assert name in listing


def test_user_onnx_runs_without_pytorch_model(tiny_run, tmp_path):
    (onnx_file,) = (tiny_run / "artifacts" / "simplify").glob("*/model.sim.onnx")
    result = run_cli("bench", *TINY_ARGS, *MEASURE_ARGS, "--onnx", str(onnx_file), cwd=tmp_path, check=True)
    assert "[build]" not in result.stderr
    latency = json.loads(output_path(result, "latency").read_text())
    assert "not_measured" in latency["backends"]["pytorch"]
    assert latency["backends"]["onnxruntime"]["median_ms"] > 0


def test_board_target_without_tracker_fails_before_compiling(tmp_path):
    result = run_cli("bench", *TINY_ARGS, *MEASURE_ARGS, "--target", "arm-a72", cwd=tmp_path)
    assert_user_error(result, "--rpc-tracker")
    assert not (tmp_path / "artifacts").exists()


def test_unknown_option_is_a_usage_error_without_traceback(tmp_path):
    result = run_cli("compile", "--no-such-option", cwd=tmp_path)
    assert result.returncode == 2 and "No such option" in result.stderr and "Traceback" not in result.stderr
