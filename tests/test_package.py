"""Device bundles: unpacked anywhere, run.py runs the model in a fresh process with only
the TVM runtime and NumPy (no pipeline package on the path)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import ctypes.util
import shutil

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from edge_models import compiled, sample
from pipeline.errors import PipelineError
from pipeline.runtime.package import write_bundle
from pipeline.cli.package import register
from pipeline.runtime.runners import load_artifact
from targets import get_target


def _unpack(bundle: Path, into: Path) -> Path:
    with tarfile.open(bundle) as archive:
        archive.extractall(into, filter="data")
    (top,) = into.iterdir()
    return top


def _run_py(directory: Path, *args: str) -> subprocess.CompletedProcess:
    """`python run.py ...` as on a device: the bundle is the working directory and nothing
    of this repository is importable."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "run.py", *args], cwd=directory, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("params_mode", ["embedded", "separate"])
def test_unpacked_bundle_runs_with_run_py_in_a_fresh_process(tmp_path_factory, tmp_path, params_mode):
    library = compiled(tmp_path_factory, "x86", params_mode)
    manifest = write_bundle(library, get_target("x86"), tmp_path / "micro-x86.tar.gz", {"variant": "micro"})
    bundle = _unpack(tmp_path / "micro-x86.tar.gz", tmp_path / "device")
    assert bundle.name == "micro-x86"
    expected = {"model.so", "model.so.json", "run.py", "manifest.json", "README.md"}
    if params_mode == "separate":
        expected.add("model.params.npz")
    assert {p.name for p in bundle.iterdir()} == expected
    assert (bundle / "run.py").read_bytes() == (Path(__file__).parents[1] / "pipeline" / "runtime" / "runtime_only.py").read_bytes()

    np.save(bundle / "x.npy", sample())
    result = _run_py(bundle, "model.so", "--input", "x.npy", "--output", "y.npy", "--target", "x86")
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(bundle / "y.npy"), load_artifact(library).infer(sample()), atol=1e-6)

    on_disk = json.loads((bundle / "manifest.json").read_text())
    assert on_disk == manifest
    assert on_disk["target"] == "x86" and on_disk["params_mode"] == params_mode
    assert on_disk["run"] == "python run.py model.so --input x.npy --output y.npy"
    for name, entry in on_disk["files"].items():
        assert hashlib.sha256((bundle / name).read_bytes()).hexdigest() == entry["sha256"]

    # The bundle remembers its target: run.py refuses to run it as another.
    wrong = _run_py(bundle, "model.so", "--input", "x.npy", "--target", "arm-a53")
    assert wrong.returncode == 2 and "built for target 'x86', not 'arm-a53'" in wrong.stderr


@pytest.mark.slow
def test_an_arm_bundle_carries_the_aarch64_library_and_its_target(tmp_path_factory, tmp_path):
    library = compiled(tmp_path_factory, "arm-a53")
    manifest = write_bundle(library, get_target("arm-a53"), tmp_path / "a53.tar.gz")
    bundle = _unpack(tmp_path / "a53.tar.gz", tmp_path / "out")
    assert (bundle / "model.so").read_bytes() == library.read_bytes()
    assert manifest["host_triple"] == "aarch64-linux-gnu" and manifest["device"] == "cpu"
    assert json.loads((bundle / "model.so.json").read_text())["target"] == "arm-a53"


def test_artifact_for_another_target_is_refused(tmp_path):
    (tmp_path / "model.so").write_bytes(b"\0")
    (tmp_path / "model.so.json").write_text('{"target": "x86"}')
    with pytest.raises(PipelineError, match="built for target 'x86', not 'arm-a72'; pass --target x86"):
        write_bundle(tmp_path / "model.so", get_target("arm-a72"), tmp_path / "b.tar.gz")
    assert not (tmp_path / "b.tar.gz").exists()


def test_missing_artifact_and_bad_output_name(tmp_path):
    with pytest.raises(PipelineError, match="does not exist; run `pipeline compile` first"):
        write_bundle(tmp_path / "model.so", get_target("x86"), tmp_path / "b.tar.gz")
    with pytest.raises(PipelineError, match="must end in .tar.gz"):
        write_bundle(tmp_path / "model.so", get_target("x86"), tmp_path / "b.zip")


def _image_folder(root: Path, classes: tuple[str, ...]) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / name / "0.png")
    return root


@pytest.mark.slow
def test_package_command_takes_the_model_options_and_writes_a_readme(tmp_path, monkeypatch):
    app = typer.Typer()
    register(app)
    app.command(name="unused")(lambda: None)  # typer runs a lone command without its name
    monkeypatch.chdir(tmp_path)
    data = _image_folder(tmp_path / "data", ("ant", "bee", "cat"))
    # What `make package` passes: the model and data options (MODEL_ARGS) of every model command.
    result = CliRunner().invoke(app, ["package", "--target", "x86", "--variant", "micro", "--input-size", "64",
                                      "--num-classes", "3", "--params", "separate", "--data", str(data),
                                      "--preprocessing", "imagenet"])
    assert result.exit_code == 0, result.output
    bundle = tmp_path / "dist" / "convnext-micro-64-x86.tar.gz"
    assert f"bundle: {Path('dist') / bundle.name}" in result.output
    top = _unpack(bundle, tmp_path / "device")
    manifest = json.loads((top / "manifest.json").read_text())
    assert manifest["model"]["variant"] == "micro" and manifest["input"]["shape"] == [1, 3, 64, 64]
    assert manifest["model"]["preprocessing"] == "imagenet"
    assert {"model.params.npz", "README.md", "labels.txt"} <= set(manifest["files"])
    assert (top / "labels.txt").read_text().splitlines() == ["ant", "bee", "cat"]
    readme = (top / "README.md").read_text()
    import tvm

    assert f"python3 -m pip install apache-tvm=={tvm.__version__} apache-tvm-ffi==" in readme
    assert "python3 run.py model.so --input x.npy --output y.npy" in readme
    assert "shape (1, 3, 64, 64), layout NCHW" in readme and "**logits**" in readme
    assert "0. ant\n1. bee\n2. cat" in readme

    # The README's preprocessing snippet, run as written on the board, feeds run.py.
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 70, 3), dtype=np.uint8)).save(top / "photo.png")
    (top / "preprocess.py").write_text(_python_block(readme, after="In Python"))
    assert _run_py_script(top, "preprocess.py", "photo.png").returncode == 0
    ran = _run_py(top, "model.so", "--input", "x.npy", "--output", "y.npy")
    assert ran.returncode == 0, ran.stderr
    assert np.load(top / "y.npy").shape == (1, 3)


def _python_block(markdown: str, after: str) -> str:
    """The first ```python block after the line that starts with `after`."""
    rest = markdown[markdown.index(after):]
    start = rest.index("```python\n") + len("```python\n")
    return rest[start:rest.index("```", start)]


def _run_py_script(directory: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=directory, env=env, capture_output=True, text=True,
                          timeout=120, check=True)


METADATA = {"input": {"name": "input", "shape": [1, 3, 48, 48], "dtype": "float32"},
            "output": {"shape": [1, 1000], "dtype": "float32"}, "tvm_version": "0.27.0.post1"}


@pytest.mark.parametrize(("preprocessing", "in_chans"), [("imagenet", 3), ("fashion-mnist", 1),
                                                          ("fashion-mnist", 3), ("imagenet", 1)])
def test_readme_preprocessing_snippet_matches_the_pipeline(tmp_path, preprocessing, in_chans):
    from calibration.preprocess import get_preprocessing, preprocess_image
    from pipeline.runtime.package import bundle_readme

    metadata = {**METADATA, "input": {**METADATA["input"], "shape": [2, in_chans, 64, 64]}}
    readme = bundle_readme("b", get_target("x86"), metadata, {"preprocessing": preprocessing}, ["numpy"], "python run.py")
    (tmp_path / "preprocess.py").write_text(_python_block(readme, after="In Python"))
    photo = Image.fromarray(np.random.default_rng(2).integers(0, 255, (75, 120, 3), dtype=np.uint8))
    photo.save(tmp_path / "photo.png")
    _run_py_script(tmp_path, "preprocess.py", "photo.png")
    expected = preprocess_image(photo, 64, get_preprocessing(preprocessing), in_chans)
    written = np.load(tmp_path / "x.npy")
    assert written.shape == (2, in_chans, 64, 64) and written.dtype == np.float32
    np.testing.assert_allclose(written[1], expected, atol=1e-5)


def test_readme_says_what_the_board_needs_and_when_classes_are_unknown():
    from pipeline.runtime.package import bundle_readme

    gpu = bundle_readme("b", get_target("jetson-orin"), {**METADATA, "device_code": ["sass:sm_87"]}, {},
                        ["apache-tvm==0.27.0.post1", "numpy"], "python run.py model.so --device cuda")
    assert "aarch64 Linux code (`aarch64-linux-gnu`) with CUDA kernels (sass:sm_87)" in gpu
    assert "tvm.cuda(0).exist" in gpu and "-DUSE_CUDA=ON" in gpu
    assert "python3 run.py model.so --device cuda" in gpu
    assert "each image's top class." in gpu and "refuses a file it loads that differs" in gpu
    assert "not recorded in this bundle" in gpu  # no --preprocessing known for a given --library
    assert "ImageNet-1k checkpoint" in gpu  # 1000 outputs, no names
    cpu = bundle_readme("b", get_target("arm-a72"), METADATA,
                        {"class_names_mismatch": "data/ has 2 classes", "preprocessing": "imagenet"}, [], "python run.py")
    assert "tvm.cuda" not in cpu and "armv7l" in cpu
    assert "Not known: data/ has 2 classes, the model has 1000 outputs" in cpu


def _bundle_with_labels(tmp_path_factory, tmp_path, params_mode: str = "embedded") -> Path:
    names = [f"class {i}" for i in range(10)]
    write_bundle(compiled(tmp_path_factory, "x86", params_mode), get_target("x86"), tmp_path / "b.tar.gz",
                 {"class_names": names, "class_names_from": "data/"})
    bundle = _unpack(tmp_path / "b.tar.gz", tmp_path / "device")
    np.save(bundle / "x.npy", sample())
    return bundle


@pytest.mark.slow
def test_run_py_prints_each_images_top_class_named_from_labels_txt(tmp_path_factory, tmp_path):
    bundle = _bundle_with_labels(tmp_path_factory, tmp_path)
    logits = load_artifact(bundle / "model.so").infer(sample())[0]
    top = int(np.argmax(logits))
    ran = _run_py(bundle, "model.so", "--input", "x.npy")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines()[-1] == f"top class: {top} class {top} (logit {logits[top]:.3f})"
    # Without labels.txt (a library outside a bundle), the class number alone.
    (bundle / "labels.txt").unlink()
    ran = _run_py(bundle, "model.so", "--input", "x.npy")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines()[-1] == f"top class: {top} (logit {logits[top]:.3f})"


@pytest.mark.slow
@pytest.mark.parametrize("params_mode", ["separate"])
def test_run_py_refuses_a_file_that_differs_from_the_manifest(tmp_path_factory, tmp_path, params_mode):
    bundle = _bundle_with_labels(tmp_path_factory, tmp_path, params_mode)
    assert _run_py(bundle, "model.so", "--input", "x.npy").returncode == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    for name in ("model.so", "model.so.json", "model.params.npz", "labels.txt"):
        original = (bundle / name).read_bytes()
        (bundle / name).write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        changed = hashlib.sha256((bundle / name).read_bytes()).hexdigest()
        ran = _run_py(bundle, "model.so", "--input", "x.npy")
        assert ran.returncode == 2
        assert ran.stderr == (
            f"error: {name} does not match manifest.json (sha256 {changed[:12]}, listed "
            f"{manifest['files'][name]['sha256'][:12]}): it was damaged or changed since packaging; "
            "copy and unpack the bundle again\n"), name
        (bundle / name).write_bytes(original)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed")
def test_a_cuda_bundles_run_py_needs_no_device_flag(tmp_path_factory, tmp_path):
    """It ran the CUDA library on the CPU and printed TVM's "a loader of that name is not registered"."""
    write_bundle(compiled(tmp_path_factory, "cuda-sm80"), get_target("cuda-sm80"), tmp_path / "gpu.tar.gz")
    bundle = _unpack(tmp_path / "gpu.tar.gz", tmp_path / "device")
    np.save(bundle / "x.npy", sample())
    ran = _run_py(bundle, "model.so", "--input", "x.npy")
    if ctypes.util.find_library("cuda") is None:
        assert ran.returncode == 2 and ran.stderr == (
            "error: the NVIDIA driver library libcuda.so.1 is not installed on this machine, so CUDA artifacts "
            "cannot run here; install the NVIDIA driver (JetPack on a Jetson)\n")
    else:
        assert ran.returncode == 0 and "model.so on cuda" in ran.stdout, ran.stderr
    on_cpu = _run_py(bundle, "model.so", "--input", "x.npy", "--device", "cpu")
    assert on_cpu.returncode == 2 and on_cpu.stderr == (
        "error: model.so holds CUDA kernels (target 'cuda-sm80'), so it cannot run on device 'cpu'; "
        "pass --device cuda, or leave --device out\n")
