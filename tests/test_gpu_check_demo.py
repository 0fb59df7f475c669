"""The GPU check's demo model without a GPU: what the bundle carries for it (checkpoint by
digest, the labeled test set), the check's evaluation of it on those images with a stand-in
artifact on the CPU (top-1, top-5, agreement), and its reports in the demo model's table of
reports/README.md."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark_scripts import load
from calibration import fashion_mnist, load_dataset
from demo_model import model_args
from pipeline.compare import compare_logits, topk_accuracy
from pipeline.errors import PipelineError
from pipeline.latency_stats import latency_stats

REPO = Path(__file__).resolve().parents[1]
needs_fashion_mnist = pytest.mark.skipif(not fashion_mnist.available(), reason="Fashion-MNIST is not installed")


gpu_check = load("gpu_check")
gpu_bundle = load("gpu_bundle")
check_report = load("gpu_check_report")


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory) -> tuple[Path, dict]:
    """A bundle folder holding what gpu_bundle.py stores for the demo (no artifacts compiled)."""
    if not fashion_mnist.available():
        pytest.skip("Fashion-MNIST is not installed")
    bundle = tmp_path_factory.mktemp("demo-bundle")
    demo = gpu_bundle.parse_demo_args(model_args())
    into = bundle / "artifacts"
    part = {"model": gpu_bundle.demo_checkpoint(demo, into), "data": gpu_bundle.demo_test_set(demo, into),
            "configs": [{"name": "demo-fp32-b1", "precision": "fp32", "batch_size": 1, "gpu_split_k": True}]}
    manifest = {"target": "cuda-sm90", "artifacts": {"demo-fp32-b1": {}}, "demo": part}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle, manifest


@needs_fashion_mnist
def test_the_bundle_carries_the_demo_checkpoint_by_digest_and_its_whole_labeled_test_set(demo_bundle):
    bundle, manifest = demo_bundle
    model, data = manifest["demo"]["model"], manifest["demo"]["data"]
    record = json.loads((REPO / "models" / "convnext-micro-fmnist.json").read_text())
    # The trained checkpoint as it is, not seeded weights: the digest is the training record's.
    assert model["checkpoint_sha256"] == record["sha256"]
    assert (model["variant"], model["num_classes"], model["in_chans"], model["input_size"]) == ("micro", 10, 1, 32)
    assert model["training"]["test_top1"] == record["test_top1"]
    with np.load(bundle / "artifacts" / data["file"]) as stored:
        assert stored["images"].dtype == np.uint8 and stored["images"].shape == (10000, 28, 28)
        assert stored["labels"].shape == (10000,) and set(np.unique(stored["labels"])) == set(range(10))
    assert data["source"] == "fashion-mnist:test" and data["set_size"] == 10000

    # What the check feeds the model is what the pipeline's evaluation feeds it.
    images, labels = gpu_check.demo_images(bundle / "artifacts", manifest["demo"])
    expected = load_dataset("fashion-mnist", 32, "fashion-mnist", in_chans=1)
    np.testing.assert_array_equal(images, expected.images)
    np.testing.assert_array_equal(labels, expected.labels)
    assert gpu_check.unpack_artifacts(bundle, manifest) == bundle / "artifacts"


@needs_fashion_mnist
def test_a_changed_checkpoint_or_test_set_is_caught_by_its_digest(demo_bundle, tmp_path):
    bundle, manifest = demo_bundle
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    data = copy / "artifacts" / manifest["demo"]["data"]["file"]
    with np.load(data) as stored:
        arrays = {name: stored[name] for name in stored.files}
    arrays["labels"][0] = (arrays["labels"][0] + 1) % 10
    np.savez(data, **arrays)
    with pytest.raises(gpu_check.CheckError, match="differ from the ones the bundle was built with"):
        gpu_check.demo_images(copy / "artifacts", manifest["demo"])

    checkpoint = copy / "artifacts" / manifest["demo"]["model"]["checkpoint"]
    checkpoint.write_bytes(checkpoint.read_bytes() + b"\0")
    with pytest.raises(gpu_check.CheckError, match="demo checkpoint .* differs from the one its artifacts"):
        gpu_check.unpack_artifacts(copy, manifest)


class _StandIn:
    """An artifact that runs the demo checkpoint in PyTorch and reverses the logits of the
    images in ``flipped`` (by call order), so that they disagree with the reference."""

    net = None
    flipped: set[int] = set()

    def __init__(self, path, device=None):
        self.calls = 0

    def infer(self, x):
        with torch.inference_mode():
            logits = self.net(torch.from_numpy(x)).numpy()
        if self.calls in self.flipped:
            logits = logits[:, ::-1].copy()
        self.calls += 1
        return logits

    def time_calls(self, x, warmup, repeats):
        return [1e-3] * repeats


@needs_fashion_mnist
def test_the_demo_is_scored_on_its_labels_against_pytorch_from_the_same_checkpoint(demo_bundle, monkeypatch):
    from pipeline.runtime import runtime_only
    from reports.aggregate import evaluated_on

    bundle, manifest = demo_bundle
    folder = bundle / "artifacts"
    net = gpu_check.demo_model(folder, manifest["demo"])
    monkeypatch.setattr(_StandIn, "net", net)
    monkeypatch.setattr(_StandIn, "flipped", {3, 50, 51, 299})
    monkeypatch.setattr(runtime_only, "LoadedArtifact", _StandIn)
    args = argparse.Namespace(demo_images=300, device="cpu", warmup=1, repeats=3, skip_compile=True, profile_calls=0)
    demo = gpu_check.run_demo(folder, manifest, args)

    # Independently: the pipeline's images and labels, the model in PyTorch.
    dataset = load_dataset("fashion-mnist", 32, "fashion-mnist", in_chans=1)
    images, labels = dataset.images[:300], dataset.labels[:300]
    with torch.inference_mode():
        reference = net(torch.from_numpy(images)).numpy()
    outputs = reference.copy()
    for index in _StandIn.flipped:
        outputs[index] = outputs[index, ::-1]
    [row] = demo["rows"]
    accuracy = row["accuracy"]
    assert accuracy["count"] == 300
    assert accuracy["top1"] == pytest.approx(topk_accuracy(outputs, labels, 1))
    assert accuracy["top5"] == pytest.approx(topk_accuracy(outputs, labels, 5))
    assert accuracy["reference_top1"] == pytest.approx(topk_accuracy(reference, labels, 1))
    changed = int(np.sum(outputs.argmax(1) != reference.argmax(1)))
    assert changed == 4 and accuracy["top1_agreement"] == pytest.approx(1 - changed / 300)
    assert accuracy["reference_top1"] > 0.85  # the trained model, not seeded weights
    assert row["model"] == "demo" and row["latency"]["median_ms"] == pytest.approx(1.0)
    assert set(demo["pytorch"]["1"]) == {"pytorch_fp32"}
    # A run on part of the set says so, and how much of it.
    assert demo["data"]["count"] == 300
    assert evaluated_on({"data": demo["data"]}) == "fashion-mnist:test, 300 of 10000 images"


def _row(precision: str, reference, output, labels, ms: float, model: str = "") -> dict:
    return {"name": f"{'demo-' if model else ''}{precision}-b1", "precision": precision, "batch_size": 1,
            "variant": "", **({"model": model} if model else {}),
            "accuracy": compare_logits(reference, output, labels), "artifact_bytes": 1_600_000,
            "latency": latency_stats([ms / 1e3] * 5, 1)}


def _results(count: int, set_size: int = 10000) -> dict:
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((count, 10))
    labels = reference.argmax(1)
    labels[: count // 10] = (labels[: count // 10] + 1) % 10  # 90% top-1
    half = reference + rng.standard_normal(reference.shape) * 1e-3
    stats = lambda ms: latency_stats([ms / 1e3] * 5, 1)  # noqa: E731
    tiny_reference = rng.standard_normal((16, 1000))
    rows = [_row("fp32", tiny_reference, tiny_reference, None, 2.5), _row("fp16", tiny_reference, tiny_reference, None, 0.6)]
    demo_rows = [_row("fp32", reference, reference, labels, 0.05, "demo"), _row("fp16", reference, half, labels, 0.04, "demo")]
    using = f"all {count}" if count == set_size else f"the first {count}"
    return {
        "manifest": {"target": "cuda-sm90", "commit": "abc123", "created": "2026-12-08T00:00:00Z",
                     "model": {"variant": "tiny", "num_classes": 1000, "in_chans": 3, "input_size": 224, "seed": 0,
                               "weights": "seeded"},
                     "configs": [{"name": r["name"], "precision": r["precision"], "batch_size": 1} for r in rows]},
        "environment": {"gpu": "NVIDIA H200", "driver": "580.1", "cuda": "13.0", "compute_capability": "sm_90",
                        "cpu": "Some CPU", "cores": 16, "machine": "x86_64",
                        "tools": {"python": "3.12", "torch": "2.11.0+cu130", "apache-tvm": "0.27.0.post1"}},
        "settings": {"images": 16, "warmup": 20, "repeats": 300, "device": "cuda"},
        "date": "2026-12-08T00:00:00Z", "command": "gpu_check.py --out x --pack",
        "pytorch": {"1": {"pytorch_fp32": stats(3.0), "pytorch_fp16": stats(2.8)}},
        "rows": rows,
        "demo": {
            "model": {"variant": "micro", "num_classes": 10, "in_chans": 1, "input_size": 32,
                      "weights": "models/convnext-micro-fmnist.pth", "checkpoint_sha256": "8b165a15f622" + "0" * 52},
            "data": {"source": "fashion-mnist:test", "count": count, "labeled": True, "preprocessing": "fashion-mnist",
                     "description": f"Fashion-MNIST test split: the set has {set_size} images: using {using}"},
            "pytorch": {"1": {"pytorch_fp32": stats(0.5), "pytorch_fp16": stats(0.45),
                              "torch_compile_cudagraphs_fp16": stats(0.08)}},
            "rows": demo_rows,
        },
        "failures": [],
    }


def _readme(tmp_path: Path, results: dict | None) -> str:
    """reports/README.md over the committed demo x86 report, ConvNeXt-T's cuda-sm90 and the
    check's OUT/reports (as a GPU session copies them in)."""
    from reports.aggregate import regenerate

    reports = tmp_path / "reports"
    for folder in ("x86", "cuda-sm90", "cuda-sm90-fp16"):
        shutil.copytree(REPO / "reports" / folder, reports / folder)
    if results is not None:
        check_report.write_outputs(results, tmp_path / "out")
        for folder in (tmp_path / "out" / "reports").iterdir():
            shutil.copytree(folder, reports / folder.name, dirs_exist_ok=True)
    return regenerate(reports).readme.read_text()


def _section(markdown: str, heading: str) -> str:
    start = markdown.index(f"## {heading}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start:end]


def _cells(section: str, link: str) -> list[str]:
    return next(line for line in section.splitlines() if line.startswith(f"| [cuda-sm90]({link})")).split(" | ")


def test_measured_demo_rows_take_the_place_of_the_demo_tables_no_gpu_line(tmp_path):
    before = _section(_readme(tmp_path / "before", None), "micro, 10 classes, input 1x1x32x32")
    assert "| cuda-sm90 | fp32, fp16 | no device: needs an NVIDIA GPU |" in before

    markdown = _readme(tmp_path / "after", _results(10000))
    demo = _section(markdown, "micro, 10 classes, input 1x1x32x32")
    assert "| cuda-sm90 | fp32, fp16 |" not in demo
    # Other GPU targets keep theirs: one GPU measured one target.
    assert "| cuda-sm80 | fp32, fp16 | no device: needs an NVIDIA GPU |" in demo
    fp32, fp16 = _cells(demo, "cuda-sm90-demo/report.md"), _cells(demo, "cuda-sm90-demo-fp16/report.md")
    assert fp32[1] == "fp32" and fp16[1] == "fp16"
    assert "90.00%" in fp32 and "fashion-mnist:test, all 10000 images" in fp32 and "NVIDIA H200" in fp32
    assert "0.040" in fp16 and "2.00x vs torch.compile reduce-overhead (CUDA graphs) fp16" in fp16
    # ConvNeXt-T's rows stay in their own table.
    tiny = _section(markdown, "tiny, 1000 classes, input 1x3x224x224")
    assert "cuda-sm90-demo" not in tiny and "(cuda-sm90/report.md)" in tiny

    assert (tmp_path / "after" / "reports" / "cuda-sm90-demo-fp16" / "report.md").read_text().startswith(
        "# ConvNeXt-micro on `cuda-sm90` (FP16, batch 1)")
    report = (tmp_path / "after" / "reports" / "cuda-sm90-demo" / "report.md").read_text()
    assert "- weights: models/convnext-micro-fmnist.pth (sha256 8b165a15f622)" in report
    assert "| top-1 (labels) | 90.00% |" in report and "| PyTorch float32 top-1 | 90.00% |" in report
    accuracy = json.loads((tmp_path / "after" / "reports" / "cuda-sm90-demo" / "accuracy.json").read_text())
    assert accuracy["reference"] == "pytorch float32 on the same cuda, TF32 off, from the same checkpoint"
    summary = (tmp_path / "after" / "out" / "summary.md").read_text()
    # Each row beside the fastest PyTorch row of its own precision.
    assert "| demo fp32 b1 | 0.050 | 0.500 | 90.00% |" in summary and "| demo fp16 b1 | 0.040 | 0.080 |" in summary


def test_a_demo_row_of_part_of_the_set_says_how_many_images(tmp_path):
    demo = _section(_readme(tmp_path, _results(500)), "micro, 10 classes, input 1x1x32x32")
    assert "fashion-mnist:test, 500 of 10000 images" in _cells(demo, "cuda-sm90-demo/report.md")


def test_a_demo_row_that_fails_a_criterion_is_named_as_the_demo():
    reference = np.random.default_rng(1).standard_normal((16, 10))
    swapped = reference.copy()
    swapped[:2] = -swapped[:2]
    assert check_report.failed_criteria([_row("fp16", reference, swapped, None, 1.0, "demo")]) == [
        "demo fp16 batch 1: top-1 agreement 87.50% < 99%"]


@pytest.mark.parametrize("args, message", [
    ("--variant micro --weights none --data fashion-mnist", "--demo-args: --weights none is not a checkpoint file"),
    ("--weights models/convnext-micro-fmnist.pth --data sample-photos",
     "--demo-args: --data sample-photos is not Fashion-MNIST"),
    ("--weights models/convnext-micro-fmnist.pth --data fashion-mnist --batch-size 4",
     "--demo-args: '--batch-size' is not one of the options the bundle reads"),
    ("--weights models/convnext-micro-fmnist.pth --num-classes ten", "--demo-args: argument --num-classes"),
])
def test_bad_demo_args_are_one_line_errors(args, message, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(PipelineError) as refused:
        gpu_bundle.parse_demo_args(args)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_a_negative_demo_image_count_is_a_one_line_error(capsys):
    assert gpu_check.main(["--demo-images", "-5", "--device", "cpu", "--bundle", "/nonexistent"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --demo-images -5 is negative") and "\n" not in error

