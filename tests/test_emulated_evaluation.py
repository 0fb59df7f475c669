"""`pipeline report --emulate`: an aarch64 artifact evaluated under qemu over a whole data set,
reported with its accuracy and without a latency, and never replacing a report of more images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from pipeline.config import PipelineConfig
from targets import get_target

REPO = Path(__file__).resolve().parents[1]
DEMO_WEIGHTS = REPO / "models" / "convnext-micro-fmnist.pth"
IMAGES = 200
needs_qemu = pytest.mark.skipif(
    not (shutil.which("qemu-aarch64-static") and shutil.which("aarch64-linux-gnu-g++")),
    reason="needs qemu-user-static and g++-aarch64-linux-gnu",
)


def labeled_set(path: Path) -> Path:
    """The first IMAGES Fashion-MNIST test images with their labels: a whole (small) evaluation set."""
    from calibration import fashion_mnist

    raw, labels = fashion_mnist.load_raw("test")
    np.savez(path, images=raw[:IMAGES], labels=labels[:IMAGES].astype(np.int64),
             class_names=np.array(fashion_mnist.CLASS_NAMES))
    return path


@needs_qemu
@pytest.mark.slow
def test_emulated_evaluation_matches_x86_and_its_report_has_no_latency(tmp_path):
    from pipeline.cli.options import run_stages
    from reports.aggregate import COLUMNS, regenerate

    config = PipelineConfig(
        variant="micro", weights=DEMO_WEIGHTS, num_classes=10, in_chans=1, input_size=32,
        data=str(labeled_set(tmp_path / "fmnist-set.npz")), preprocessing="fashion-mnist", eval_limit=None,
        emulate=True, artifacts=tmp_path / "artifacts", reports_dir=tmp_path / "reports",
    )
    results = run_stages("report", config, get_target("arm-a53"))
    assert "bench" not in results  # nothing is timed under the emulator
    arm = json.loads(results["evaluate"].outputs["accuracy"].read_text())
    x86_results = run_stages("evaluate", config.replace(emulate=False), get_target("x86"))
    x86 = json.loads(x86_results["evaluate"].outputs["accuracy"].read_text())

    assert arm["data"]["count"] == x86["data"]["count"] == IMAGES
    assert arm["emulator"]["binary"] == "same binary as the board" and "emulator" not in x86
    # The two builds vectorize differently, so their logits differ in the last bits: at most a
    # near-tie may flip, one image of the set.
    tolerance = 1 / IMAGES
    assert abs(arm["metrics"]["top1"] - x86["metrics"]["top1"]) <= tolerance
    assert arm["metrics"]["top1"] > 0.8  # the trained demo model, not noise
    assert arm["metrics"]["top1_agreement"] >= 1 - tolerance and arm["metrics"]["max_abs_error"] < 1e-3

    folder = tmp_path / "reports" / "arm-a53"
    report = (folder / "report.md").read_text()
    assert "measured under qemu-aarch64" in report and "(same binary as the board)" in report
    assert "Not measured: needs the board (RPC)" in report
    latency = json.loads((folder / "latency.json").read_text())
    assert latency["backends"] == {"tvm": {"not_measured": "needs the board (RPC)"}}
    assert latency["input_shape"] == [1, 1, 32, 32]

    # A narrowed run (fewer images) goes beside the whole-set report, never over it.
    committed = (folder / "accuracy.json").read_text()
    run_stages("report", config.replace(eval_limit=100), get_target("arm-a53"))
    assert (folder / "accuracy.json").read_text() == committed
    beside = json.loads((folder / "images-100" / "accuracy.json").read_text())
    assert beside["data"]["count"] == 100

    markdown = regenerate(tmp_path / "reports").readme.read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| [arm-a53](arm-a53/report.md) | fp32 |"))
    cells = dict(zip(COLUMNS, [cell.strip() for cell in row.strip().strip("|").split(" | ")]))
    assert cells["median ms"] == "needs the board (RPC)"
    assert cells["top-1"] == f"{100 * arm['metrics']['top1']:.2f}%"
    assert cells["evaluated on"].endswith(f"fmnist-set.npz, all {IMAGES} images")
    assert cells["measured on"].startswith("qemu-aarch64 ")


@pytest.mark.parametrize("command, target, expected", [
    ("report", "x86", "error: --emulate runs aarch64 CPU artifacts under qemu; 'x86' is not one (use one of: "),
    ("report", "jetson-orin", "error: --emulate runs aarch64 CPU artifacts under qemu; 'jetson-orin' is not one"),
    ("bench", "arm-a72", "error: --emulate measures accuracy only (qemu's timings are not the board's)"),
])
def test_emulate_refuses_what_it_cannot_measure_before_any_work(tmp_path, command, target, expected):
    result = run_cli(command, "--emulate", "--target", target, "--variant", "micro", "--input-size", "32",
                     "--num-classes", "10", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(expected), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "artifacts").exists()
