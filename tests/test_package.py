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

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from edge_models import compiled, sample
from pipeline.errors import PipelineError
from pipeline.package import write_bundle
from pipeline.package_command import register
from pipeline.tvm_backend import load_artifact
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
    expected = {"model.so", "model.so.json", "run.py", "manifest.json"}
    if params_mode == "separate":
        expected.add("model.params.npz")
    assert {p.name for p in bundle.iterdir()} == expected
    assert (bundle / "run.py").read_bytes() == (Path(__file__).parents[1] / "pipeline" / "runtime_only.py").read_bytes()

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


@pytest.mark.slow
def test_package_command_compiles_and_bundles(tmp_path, monkeypatch):
    app = typer.Typer()
    register(app)
    app.command(name="unused")(lambda: None)  # typer runs a lone command without its name
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["package", "--target", "x86", "--variant", "micro", "--input-size", "64",
                                      "--num-classes", "10", "--params", "separate"])
    assert result.exit_code == 0, result.output
    bundle = tmp_path / "dist" / "convnext-micro-64-x86.tar.gz"
    assert f"bundle: {Path('dist') / bundle.name}" in result.output
    top = _unpack(bundle, tmp_path / "device")
    manifest = json.loads((top / "manifest.json").read_text())
    assert manifest["model"]["variant"] == "micro" and manifest["input"]["shape"] == [1, 3, 64, 64]
    assert "model.params.npz" in manifest["files"]
