"""benchmarks/gpu_check.py without a GPU: its comparison, criteria and report writing on
synthetic results, and the whole check on a CPU bundle (--target x86, --device cpu), whose
reports the aggregate report reads like any other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from calibration import fashion_mnist
from benchmark_scripts import load
from demo_model import model_args
from pipeline.compare import compare_logits
from pipeline.latency_stats import latency_stats

REPO = Path(__file__).resolve().parents[1]


gpu_check = load("gpu_check")
check_report = load("gpu_check_report")


def _row(precision: str, batch: int, reference: np.ndarray, output: np.ndarray, ms: float) -> dict:
    return {"name": f"{precision}-b{batch}", "precision": precision, "batch_size": batch,
            "accuracy": compare_logits(reference, output), "artifact_bytes": 1000,
            "latency": latency_stats([ms / 1e3] * 5, batch)}


def _results(rows: list[dict]) -> dict:
    stats = lambda ms, b: latency_stats([ms / 1e3] * 5, b)  # noqa: E731
    return {
        "manifest": {"target": "cuda-sm90", "commit": "abc123", "created": "2026-11-29T00:00:00Z",
                     "model": {"variant": "tiny", "num_classes": 1000, "in_chans": 3, "input_size": 224,
                               "seed": 0, "weights": "seeded"},
                     "configs": [{"name": r["name"], "precision": r["precision"], "batch_size": r["batch_size"]}
                                 for r in rows]},
        "environment": {"gpu": "NVIDIA H200", "driver": "580.1", "cuda": "13.0", "compute_capability": "sm_90",
                        "cpu": "Some CPU", "cores": 16, "machine": "x86_64",
                        "tools": {"python": "3.12", "torch": "2.11.0+cu130", "apache-tvm": "0.27.0.post1"}},
        "settings": {"images": 16, "warmup": 20, "repeats": 300, "device": "cuda"},
        "date": "2026-11-29T00:00:00Z", "command": "gpu_check.py --out x",
        "pytorch": {"1": {"pytorch_fp32": stats(3.0, 1), "pytorch_fp16": stats(2.8, 1),
                          "pytorch_fp16_channels_last": stats(2.9, 1),
                          "torch_compile_fp16": {"error": "RuntimeError: no triton"},
                          "torch_compile_cudagraphs_fp16": stats(0.7, 1)}},
        "rows": rows,
        "failures": gpu_check.failed_criteria(rows),
    }


def test_the_criteria_name_nan_fp32_error_and_fp16_agreement():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((16, 10))
    good = [_row("fp32", 1, reference, reference + 1e-6, 1.0), _row("fp16", 1, reference, reference + 1e-3, 1.0)]
    assert gpu_check.failed_criteria(good) == []

    nan = reference.copy()
    nan[0, 0] = np.nan
    off = reference + 1e-3
    swapped = reference.copy()
    swapped[:2] = -swapped[:2]  # two of 16 rows change their top-1: 87.5% agreement
    failures = gpu_check.failed_criteria([
        _row("fp16", 1, reference, nan, 1.0), _row("fp32", 1, reference, off, 1.0),
        _row("fp16", 8, reference, swapped, 1.0),
    ])
    assert failures == [
        "fp16 batch 1: 1 NaN outputs",
        "fp16 batch 1: top-1 agreement 93.75% < 99%",  # argmax takes the NaN
        "fp32 batch 1: max abs error 0.001 > 0.0001",
        "fp16 batch 8: top-1 agreement 87.50% < 99%",
    ]


def test_reports_land_in_the_folders_and_format_the_aggregate_reads(tmp_path):
    from reports.aggregate import gather, row_cells

    reference = np.random.default_rng(1).standard_normal((16, 10))
    rows = [_row("fp32", 1, reference, reference, 2.0), _row("fp16", 1, reference, reference, 1.4)]
    results = _results(rows)
    gpu_check.write_outputs(results, tmp_path)

    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["cuda-sm90", "cuda-sm90-fp16"]
    latency = json.loads((tmp_path / "reports" / "cuda-sm90-fp16" / "latency.json").read_text())
    # PyTorch eager fp16 is the report's PyTorch column; each mode has its ratio; a mode that
    # failed is reported as such, not dropped silently.
    assert latency["backends"]["pytorch"]["median_ms"] == pytest.approx(2.8)
    assert latency["tvm_speedup"]["vs_pytorch"] == pytest.approx(2.0)
    assert latency["tvm_speedup"]["vs_torch_compile_cudagraphs_fp16"] == pytest.approx(0.5)
    assert latency["backend_errors"] == {"torch_compile_fp16": "RuntimeError: no triton"}
    assert latency["provenance"]["gpu"].startswith("NVIDIA H200 (sm_90), driver 580.1, CUDA 13.0")
    report = (tmp_path / "reports" / "cuda-sm90-fp16" / "report.md").read_text()
    assert "| torch_compile_fp16 | failed: RuntimeError: no triton |" in report
    assert "| NaN outputs | 0 |" in report

    warnings: list[str] = []
    gathered = gather(tmp_path / "reports", warnings)
    assert warnings == []
    assert {(r.target, r.precision) for r in gathered} == {("cuda-sm90", "fp32"), ("cuda-sm90", "fp16")}
    fp16 = next(r for r in gathered if r.precision == "fp16")
    cells = row_cells(fp16)
    assert cells[:3] == ["cuda-sm90", "fp16", "1.40"] and "NVIDIA H200" in cells
    summary = (tmp_path / "summary.md").read_text()
    assert "| fp16 b1 | 1.400 |" in summary and "Criteria: all hold." in summary


def test_packed_reports_are_three_files(tmp_path):
    import tarfile

    reference = np.random.default_rng(1).standard_normal((16, 10))
    gpu_check.write_outputs(_results([_row("fp16", 8, reference, reference, 1.0)]), tmp_path, pack=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "reports.tar.gz", "summary.md"]
    with tarfile.open(tmp_path / "reports.tar.gz") as archive:
        assert sorted(archive.getnames()) == [
            "reports", "reports/cuda-sm90-fp16-b8", "reports/cuda-sm90-fp16-b8/accuracy.json",
            "reports/cuda-sm90-fp16-b8/latency.json", "reports/cuda-sm90-fp16-b8/report.md"]


def test_a_kernel_profile_becomes_kernels_json_and_a_table_in_the_report(tmp_path):
    from pipeline import kernel_profile

    reference = np.random.default_rng(1).standard_normal((16, 10))
    profiled, failed = _row("fp16", 1, reference, reference, 0.05), _row("fp16", 8, reference, reference, 0.2)
    rows = [{"kernel": "fused_matmul1_add", "launches": 1.0, "us": 32.0, "us_per_launch": 32.0,
             "rule": "TensorCoreMatmul", "blocks": 196, "threads": 128, "roofline_us": 4.0, "x_roofline": 8.0}]
    profiled["kernel_profile"] = {"calls": 20, "kernels": rows, "summary": kernel_profile.summary(rows, 0.05)}
    failed["kernel_profile"] = {"calls": 20, "error": "RuntimeError: CUPTI unavailable"}
    gpu_check.write_outputs(_results([profiled, failed]), tmp_path)

    folder = tmp_path / "reports" / "cuda-sm90-fp16"
    assert json.loads((folder / "kernels.json").read_text())["kernels"] == rows
    report = (folder / "report.md").read_text()
    assert "## Kernels (GPU time per call, from a profiler trace of 20 calls)" in report
    assert "32.0 us of kernel time of a 50.0 us median call (18.0 us between kernels)" in report
    b8 = (tmp_path / "reports" / "cuda-sm90-fp16-b8" / "report.md").read_text()
    assert "No kernel table: RuntimeError: CUPTI unavailable." in b8


def test_the_gemm_sweep_times_each_kernel_of_its_library_and_tables_them_per_gemm(tmp_path):
    """measure_gemm_sweep on a CPU library (the GPU check times CUDA kernels the same way)."""
    import tvm
    from tvm import te

    a = te.placeholder((64, 64), "float32", name="a")
    names = ("t64", "t16")
    module = tvm.IRModule({
        name: te.create_prim_func([a, te.compute((64, 64), lambda i, j: a[i, j] * 2, name="b")])
        .with_attr("global_symbol", name) for name in names})
    tvm.tirx.build(module, target="llvm").export_library(str(tmp_path / "sweep.so"))
    entry = {"gemm": "fused_matmul1", "batch": 1, "m": 64, "n": 64, "k": 64, "splits": 1, "modeled_steps": 16.0,
             "args": [{"shape": [64, 64], "dtype": "float32"}] * 2}
    listing = {"library": "sweep.so", "kernels": [
        {**entry, "kernel": "t64", "tile": [64, 64], "default": True},
        {**entry, "kernel": "t16", "tile": [16, 16], "default": False, "splits": 2}]}
    sweep = gpu_check.measure_gemm_sweep(tmp_path, listing, "cpu", 1)
    assert "error" not in sweep and [r["kernel"] for r in sweep["rows"]] == ["t64", "t16"]
    assert all(r["us"] > 0 and "args" not in r for r in sweep["rows"])
    text = check_report.gemm_sweep_markdown(sweep)
    assert "| 1 | fused_matmul1 (64 x 64 x 64) | 64x64 * |" in text and "| 16x16, 2 slices |" in text
    assert text.count("(best)") == 1
    # A split's partial GEMM lacks its sum kernel's time: never the best, however fast.
    assert "(best)" not in next(line for line in text.splitlines() if "2 slices" in line)

    missing = gpu_check.measure_gemm_sweep(tmp_path, {**listing, "library": "absent.so"}, "cpu", 1)
    assert missing["rows"] == [] and missing["error"]  # reported, not raised


def test_a_negative_profile_count_is_a_one_line_error(capsys):
    assert gpu_check.main(["--profile-calls", "-1", "--device", "cpu", "--bundle", "/nonexistent"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --profile-calls -1 is negative") and "\n" not in error


def test_report_folders_follow_the_repository_naming():
    assert check_report.report_folder("cuda-sm90", "fp32", 1) == "cuda-sm90"
    assert check_report.report_folder("cuda-sm90", "fp16", 1) == "cuda-sm90-fp16"
    assert check_report.report_folder("cuda-sm90", "fp16", 8) == "cuda-sm90-fp16-b8"
    assert check_report.report_folder("x86", "int8", 1) == "x86-int8"


def test_the_default_bundle_offers_no_int8_on_gpu_targets():
    """GPU targets do not offer int8 (issue #16: 5.6x slower than fp16 on an H200): the bundle's
    default configurations leave it out, asking for it names the reason, and int8 bundles
    (BASELINES["int8"]) are for x86."""
    from pipeline.errors import PipelineError
    from targets import GPU_INT8_REASON, get_target

    gpu_bundle = load("gpu_bundle")
    defaults = gpu_bundle.parse_args([])
    target = get_target(defaults.target)
    assert target.device == "cuda"
    assert [c.name for c in gpu_bundle.parse_configs(defaults.configs, target)] == [
        "fp32-b1", "fp16-b1", "fp16-b8", "fp16-b1-no-split-k", "fp16-b8-no-split-k"]
    with pytest.raises(PipelineError) as refused:
        gpu_bundle.parse_configs("fp32:1,int8:1", target)
    message = str(refused.value)
    assert message.startswith("target 'cuda-sm90' does not offer precision 'int8'")
    assert message.endswith(GPU_INT8_REASON) and "\n" not in message
    assert gpu_bundle.parse_configs("fp32:1,int8:1", get_target("x86")) == [("fp32", 1, True), ("int8", 1, True)]


def test_a_bundle_configuration_without_split_k_is_named_for_it_and_only_for_gpu_targets():
    from pipeline.errors import PipelineError
    from targets import get_target

    gpu_bundle = load("gpu_bundle")
    configs = gpu_bundle.parse_configs("fp16:8,fp16:8:no-split-k", get_target("cuda-sm90"))
    assert configs == [("fp16", 8, True), ("fp16", 8, False)]
    assert [c.name for c in configs] == ["fp16-b8", "fp16-b8-no-split-k"]
    for text, start in (("fp16:8:fast", "--configs item 'fp16:8:fast' is not precision:batch[:no-split-k]"),
                        ("fp16:8:no-split-k,fp16:8:no-split-k", "--configs 'fp16:8:no-split-k,fp16:8:no-split-k' "
                                                                "names a configuration twice")):
        with pytest.raises(PipelineError) as refused:
            gpu_bundle.parse_configs(text, get_target("cuda-sm90"))
        assert str(refused.value).startswith(start)
    with pytest.raises(PipelineError) as refused:
        gpu_bundle.parse_configs("fp32:1:no-split-k", get_target("x86"))
    assert "no-split-k is for GPU targets" in str(refused.value)


def test_a_variant_row_reports_beside_its_configuration_where_the_aggregate_does_not_look(tmp_path):
    from reports.aggregate import gather

    reference = np.random.default_rng(1).standard_normal((16, 10))
    plain, variant = _row("fp16", 1, reference, reference, 1.4), _row("fp16", 1, reference, reference, 1.6)
    variant.update(name="fp16-b1-no-split-k", variant=gpu_check.config_variant({"gpu_split_k": False}))
    gpu_check.write_outputs(_results([plain, variant]), tmp_path)

    folder = tmp_path / "reports" / "cuda-sm90-fp16"
    assert json.loads((folder / "no-split-k" / "latency.json").read_text())["variant"] == "no-split-k"
    assert "batch 1, no-split-k)" in (folder / "no-split-k" / "report.md").read_text().splitlines()[0]
    assert "variant" not in json.loads((folder / "latency.json").read_text())
    assert [r.precision for r in gather(tmp_path / "reports", [])] == ["fp16"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| fp16 b1 | 1.400 |" in summary and "| fp16 b1 no-split-k | 1.600 |" in summary


@pytest.mark.slow
def test_the_whole_check_runs_on_a_cpu_bundle(tmp_path):
    """Everything but CUDA, end to end: a bundle built for x86, unpacked, weights derived and
    verified, PyTorch reference, TVM rows, reports; so a GPU session spends no time on bugs."""
    configs = "fp32:1,int8:1" if fashion_mnist.available() else "fp32:1"
    # The demo model on part of its test set (x86 offers no fp16: its fp32 only).
    demo = ["--demo-args", model_args()] if fashion_mnist.available() else []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    built = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_bundle.py"), "--variant", "micro", "--input-size", "32",
         "--num-classes", "10", "--target", "x86", "--configs", configs, "--calib-size", "8", *demo,
         "--output", str(tmp_path / "bundle"), "--artifacts", str(tmp_path / "artifacts")],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert built.returncode == 0, built.stderr
    checked = subprocess.run(
        [sys.executable, str(tmp_path / "bundle" / "gpu_check.py"), "--device", "cpu", "--skip-compile",
         "--images", "16", "--demo-images", "400", "--warmup", "1", "--repeats", "5", "--out", str(tmp_path / "out")],
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, capture_output=True, text=True,
        timeout=600,
    )
    assert checked.returncode == 0, checked.stderr
    results = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [r["name"] for r in results["rows"]] == configs.replace(":", "-b").split(",")
    fp32 = results["rows"][0]
    assert fp32["accuracy"]["nan_count"] == 0 and fp32["accuracy"]["max_abs_error"] < 1e-4
    assert fp32["latency"]["repeats"] == 5
    assert "kernel_profile" not in fp32  # the profiler's table is for CUDA devices
    assert results["settings"]["profile_calls"] == 0
    assert (tmp_path / "out" / "reports" / "x86" / "report.md").is_file()
    if demo:
        [row] = results["demo"]["rows"]
        assert row["name"] == "demo-fp32-b1" and row["accuracy"]["count"] == 400
        # The TVM build of the trained checkpoint scores as PyTorch does on the same labeled images.
        assert row["accuracy"]["top1_agreement"] == 1.0 and row["accuracy"]["max_abs_error"] < 1e-4
        assert row["accuracy"]["top1"] == row["accuracy"]["reference_top1"] > 0.85
        accuracy = json.loads((tmp_path / "out" / "reports" / "x86-demo" / "accuracy.json").read_text())
        assert accuracy["data"]["description"].endswith("the set has 10000 images: using the first 400")
