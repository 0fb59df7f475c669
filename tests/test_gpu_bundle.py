"""benchmarks/gpu_bundle.py: the one-call GPU check's folder, built for cuda-sm90 without a
GPU: what it holds, its size, runtime without the compiler, weights stored once and
verified, and a runner that starts and fails cleanly where there is no GPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from benchmark_scripts import load
from calibration import fashion_mnist
from demo_model import model_args


REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_bundle.py"
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed")


def _gpu_check():
    return load("gpu_check")


def _build(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--variant", "micro", "--input-size", "32", "--num-classes", "10",
         "--output", str(tmp_path / "bundle"), "--artifacts", str(tmp_path / "artifacts"), *args],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=900,
    )


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc (CUDA toolkit) is not installed")
    if not fashion_mnist.available():
        pytest.skip("Fashion-MNIST is not installed (the demo's test images)")
    tmp_path = tmp_path_factory.mktemp("gpu-bundle")
    built = _build(tmp_path, "--target", "cuda-sm90", "--configs", "fp32:1,fp16:1,fp16:8", "--demo-args", model_args())
    assert built.returncode == 0, built.stderr
    return tmp_path / "bundle"


@pytest.mark.slow
def test_the_bundle_holds_the_check_the_runtime_and_the_artifacts(bundle):
    names = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file())
    wheel = [n for n in names if n.startswith("runtime/apache_tvm_ffi-")]
    assert len(wheel) == 1 and "-cp312-" in wheel[0]
    assert {"README.md", "artifacts.tar.xz", "gpu_check.py", "gpu_check_report.py", "manifest.json", "run.sh",
            "runtime/tvm-runtime.tar.xz"} <= set(names)
    assert sorted(n for n in names if n.startswith("lib/")) == sorted(
        ["lib/pipeline/__init__.py", "lib/pipeline/runtime/__init__.py"]
        + [f"lib/pipeline/{m}" for m in ("errors.py", "model.py", "seeded_weights.py", "runtime/runtime_only.py",
                                         "compare.py", "latency_stats.py", "kernel_profile.py")])
    total = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert total < 60 * 1024 * 1024

    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["target"] == "cuda-sm90"
    assert [c["name"] for c in manifest["configs"]] == ["fp32-b1", "fp16-b1", "fp16-b8"]
    with tarfile.open(bundle / "artifacts.tar.xz") as archive:
        members = {m.name.removeprefix("./") for m in archive.getmembers() if m.isfile()}
    for name in ("fp32-b1", "fp16-b1", "fp16-b8"):
        assert {f"{name}/model.so", f"{name}/model.so.json", f"{name}/model.cu"} <= members
    # One seeded weights file: fp32 and fp16 b8 are derived from fp16 b1 on the GPU machine.
    assert [m for m in members if m.endswith(".npz") and not m.startswith("demo")] == ["fp16-b1/model.params.npz"]
    assert manifest["artifacts"]["fp32-b1"]["derived_params"]["from"] == "fp16-b1/model.params.npz"
    # Compile's record of each kernel travels along, for the check's kernel table.
    for name in ("fp32-b1", "fp16-b1", "fp16-b8"):
        kernels = manifest["artifacts"][name]["kernels"]
        assert kernels and all(k["rule"] and k["roofline_us"] > 0 for k in kernels if k["flops"] > 0)
        assert {"DepthwiseNHWC", "RowReductionPerWarp"} <= {k["rule"] for k in kernels}
    # The GEMM sweep (benchmarks/gemm_sweep.py): the fp16 models' GEMMs at batch 1 and 8 in
    # every tile, one variant of each the default schedules' choice, in a library of its own.
    sweep = manifest["gemm_sweep"]
    assert {"gemm-sweep/gemm_sweep.so", "gemm-sweep/gemm_sweep.json"} <= members
    assert {k["batch"] for k in sweep["kernels"]} == {1, 8}
    gemms = {(k["batch"], k["gemm"]) for k in sweep["kernels"]}
    assert gemms and all(sum(k["default"] for k in sweep["kernels"] if (k["batch"], k["gemm"]) == g) == 1
                         for g in gemms)


@pytest.mark.slow
def test_the_runtime_has_no_compiler_and_imports_alone(bundle, tmp_path):
    with tarfile.open(bundle / "runtime" / "tvm-runtime.tar.xz") as archive:
        names = archive.getnames()
        archive.extractall(tmp_path, filter="data")
    assert "tvm/lib/libtvm_runtime.so" in names and "tvm/lib/libtvm_runtime_cuda.so" in names
    assert not [n for n in names if n.endswith("libtvm_compiler.so") or n.startswith(("tvm/3rdparty", "tvm/src"))]
    # Runtime-only TVM from the archive (this Python's tvm-ffi stands in for the cp312 wheel).
    code = "import tvm, sys; print(tvm.__file__); print('tvm.relax' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TVM_USE_RUNTIME_LIB": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(tmp_path / "tvm" / "__init__.py"), "False"]


@pytest.mark.slow
def test_derived_weights_are_rebuilt_and_verified(bundle, tmp_path):
    gpu_check = _gpu_check()
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    folder = gpu_check.unpack_artifacts(copy, manifest)
    with np.load(folder / "fp16-b1" / "model.params.npz") as half, np.load(folder / "fp32-b1" / "model.params.npz") as full:
        assert {str(full[n].dtype) for n in full.files if full[n].dtype.kind == "f"} == {"float32"}
        name = "stages.0.0.dwconv.weight"
        assert half[name].dtype == np.float16
        np.testing.assert_array_equal(full[name], half[name].astype(np.float32))
    with np.load(folder / "fp16-b8" / "model.params.npz") as b8:
        # The reshape targets carry the batch size: the one difference from batch 1's weights.
        assert any(b8[n].dtype == np.int64 and 8 in b8[n] for n in b8.files)

    # A damaged weights file is caught by its digest, not measured.
    (folder / "fp32-b1" / "model.params.npz").unlink()
    stored = folder / "fp16-b1" / "model.params.npz"
    with np.load(stored) as data:
        arrays = {n: data[n] for n in data.files}
    arrays["stages.0.0.dwconv.weight"] = arrays["stages.0.0.dwconv.weight"] + np.float16(1)
    np.savez(stored, **arrays)
    with pytest.raises(gpu_check.CheckError, match="differ from the ones it was compiled with"):
        gpu_check.unpack_artifacts(copy, manifest)


@pytest.mark.slow
def test_the_runner_starts_and_fails_cleanly_without_a_gpu(bundle, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(["bash", str(bundle / "run.sh"), "--out", str(tmp_path / "out")],
                            env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: PyTorch sees no CUDA GPU on this machine; run the check where `nvidia-smi` lists one"
    )
    assert not (tmp_path / "out").exists()


def test_bad_settings_are_one_line_errors(tmp_path):
    for args, message in [
        (["--target", "arm-a72"], "error: --target arm-a72 is not a CUDA target"),
        (["--target", "cuda-sm90", "--configs", "fp16"], "error: --configs item 'fp16' is not precision:batch"),
        (["--target", "x86", "--configs", "fp16:1"], "error: target 'x86' does not offer precision 'fp16'"),
    ]:
        result = _build(tmp_path, *args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().startswith(message), result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "bundle").exists()


@pytest.mark.slow
def test_the_bundle_carries_the_demo_model_its_checkpoint_and_its_labeled_test_set(bundle, tmp_path):
    """make gpu-bundle's --demo-args: the MODEL_ARGS model's cuda-sm90 artifacts from its trained
    checkpoint (carried as it is, checked by sha256) and its 10 000 labeled test images."""
    gpu_check = _gpu_check()
    manifest = json.loads((bundle / "manifest.json").read_text())
    demo = manifest["demo"]
    assert [c["name"] for c in demo["configs"]] == ["demo-fp32-b1", "demo-fp16-b1"]
    assert [c["name"] for c in manifest["configs"]] == ["fp32-b1", "fp16-b1", "fp16-b8"]  # the demo's apart
    record = json.loads((REPO / "models" / "convnext-micro-fmnist.json").read_text())
    assert demo["model"]["checkpoint_sha256"] == record["sha256"]
    assert demo["data"]["source"] == "fashion-mnist:test" and demo["data"]["set_size"] == 10000
    with tarfile.open(bundle / "artifacts.tar.xz") as archive:
        members = {m.name.removeprefix("./") for m in archive.getmembers() if m.isfile()}
    assert {demo["model"]["checkpoint"], demo["data"]["file"]} <= members
    for name in ("demo-fp32-b1", "demo-fp16-b1"):
        entry = manifest["artifacts"][name]
        assert entry["input"]["shape"] == [1, 1, 32, 32] and entry["output"]["shape"] == [1, 10]
        # Trained weights are not a cast of each other: each artifact stores its own.
        assert f"{name}/model.params.npz" in members and "derived_params" not in entry

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    folder = gpu_check.unpack_artifacts(copy, manifest)  # every digest holds
    images, labels = gpu_check.demo_images(folder, demo)
    assert images.shape == (10000, 1, 32, 32) and labels.shape == (10000,)
    import torch

    trained = torch.load(REPO / "models" / "convnext-micro-fmnist.pth", weights_only=True)["model"]
    loaded = gpu_check.demo_model(folder, demo).state_dict()
    assert set(loaded) == set(trained) and all(torch.equal(loaded[k], trained[k]) for k in trained)
