"""The committed default model: its recorded accuracy is reproduced through the compiled artifact."""

import hashlib
import json
from pathlib import Path

import pytest

from calibration import fashion_mnist
from conftest import REPO, output_path, run_cli

MODEL = REPO / "models" / "convnext-micro-fmnist.pth"
RECORD = json.loads((REPO / "models" / "convnext-micro-fmnist.json").read_text())

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not fashion_mnist.available(), reason="needs Debian's dataset-fashion-mnist package"),
]


def test_record_describes_the_committed_checkpoint():
    assert hashlib.sha256(MODEL.read_bytes()).hexdigest() == RECORD["sha256"]
    assert RECORD["test_top1"] >= 92.0
    assert RECORD["command"].startswith("pipeline train ")


def test_full_test_set_accuracy_through_the_artifact(tmp_path):
    result = run_cli(
        "evaluate", "--variant", RECORD["variant"], "--weights", str(MODEL),
        "--num-classes", str(RECORD["num_classes"]), "--in-chans", str(RECORD["in_chans"]),
        "--input-size", str(RECORD["input_size"]), "--data", "fashion-mnist",
        "--preprocessing", "fashion-mnist", "--eval-limit", "0",
        cwd=tmp_path, check=True,
    )
    accuracy = json.loads(output_path(result, "accuracy").read_text())
    metrics = accuracy["metrics"]
    assert metrics["count"] == 10_000 and accuracy["data"]["labeled"]
    # PyTorch reproduces the training record; the TVM artifact stays within 0.05 point of it.
    assert metrics["reference_top1"] * 100 == pytest.approx(RECORD["test_top1"], abs=0.005)
    assert abs(metrics["top1"] - metrics["reference_top1"]) * 100 <= 0.05
    assert metrics["top1_agreement"] >= 0.999
