"""aarch64 artifacts, verified without the board: cross-linked with Debian's toolchain,
run under qemu-user by a C++ runner on the aarch64 TVM runtime, compared with x86."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_models import compiled, elf_machine, sample
from pipeline.cli import cross as cross_cli
from pipeline.runtime import cross
from pipeline.verify import qemu
from pipeline.errors import PipelineError
from pipeline.compiler.backend import compile_onnx
from pipeline.runtime.runners import load_artifact
from targets import get_target

REPO = Path(__file__).resolve().parents[1]
MISSING = [
    f"{tool} (apt-get install {package})"
    for tool, package in (
        ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
        (cross.AARCH64_GXX, cross.AARCH64_GXX_PACKAGE),
        ("qemu-aarch64-static", cross.QEMU_PACKAGE),
    )
    if shutil.which(tool) is None
]
needs_qemu = pytest.mark.skipif(bool(MISSING), reason=f"missing: {', '.join(MISSING)}")
ATOL = 1e-4


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> np.ndarray:
    """The x86 build's output on the sample: what every aarch64 build must reproduce."""
    return load_artifact(compiled(tmp_path_factory, "x86")).infer(sample())


def test_missing_cross_compiler_names_the_debian_package(tmp_path):
    target = dataclasses.replace(get_target("arm-a72"), cross_compiler="aarch64-linux-gnu-gcc-none")
    with pytest.raises(PipelineError, match=r"aarch64-linux-gnu-gcc-none is not installed.*"
                                            r"apt-get install gcc-aarch64-linux-gnu"):
        # The ONNX file does not even exist: the toolchain is checked before any work.
        compile_onnx(tmp_path / "none.onnx", target, tmp_path / "model.so")


def test_missing_qemu_names_the_package(monkeypatch):
    monkeypatch.setattr(cross.shutil, "which", lambda name: None)
    with pytest.raises(PipelineError, match="apt-get install qemu-user-static"):
        cross._qemu()


@needs_qemu
@pytest.mark.slow
@pytest.mark.parametrize(
    "name, params_mode",
    [("arm-a53", "embedded"), ("arm-neoverse-v1", "separate"), ("jetson-orin-cpu", "embedded")],
)
def test_aarch64_artifact_under_qemu_matches_x86(tmp_path_factory, reference, name, params_mode):
    library = compiled(tmp_path_factory, name, params_mode)
    assert elf_machine(library) == 183  # EM_AARCH64
    meta = json.loads(library.with_name("model.so.json").read_text())
    assert meta["target"] == name and meta["host_triple"] == "aarch64-linux-gnu"

    result = qemu.verify_under_qemu(library, sample(), reference, atol=ATOL)
    assert result["max_abs_error"] <= ATOL
    assert result["top1_agreement"] == 1.0


@needs_qemu
@pytest.mark.slow
def test_runtime_is_cached_and_built_for_aarch64(tmp_path_factory):
    first = cross.aarch64_runtime()
    assert cross.aarch64_runtime() == first
    assert elf_machine(first / "tvm_runner") == 183
    assert elf_machine(first / "lib" / "libtvm_runtime.so") == 183
    recorded = json.loads((first / "runtime.json").read_text())
    assert recorded["apache-tvm"] == cross._versions()["apache-tvm"]


@needs_qemu
@pytest.mark.slow
def test_qemu_refuses_an_x86_artifact(tmp_path_factory):
    with pytest.raises(PipelineError, match="built for target 'x86'.*not for aarch64"):
        cross.run_under_qemu(compiled(tmp_path_factory, "x86"), sample())


@needs_qemu
@pytest.mark.slow
def test_command_line_runs_and_compares_in_a_fresh_process(tmp_path_factory, tmp_path, reference):
    library = compiled(tmp_path_factory, "arm-a53")
    np.save(tmp_path / "x.npy", sample())
    np.save(tmp_path / "reference.npy", reference)
    np.save(tmp_path / "wrong.npy", reference + 1.0)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "pipeline.cli.cross", "run", str(library), "--input", str(tmp_path / "x.npy")]

    ok = subprocess.run([*base, "--output", str(tmp_path / "y.npy"), "--reference", str(tmp_path / "reference.npy")],
                        env=env, capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["comparison"]["max_abs_error"] <= ATOL
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), reference, atol=ATOL)

    bad = subprocess.run([*base, "--reference", str(tmp_path / "wrong.npy")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: the output differs from the reference by")


def test_verify_refuses_targets_qemu_cannot_run(tmp_path):
    from pipeline.config import PipelineConfig

    config = PipelineConfig(artifacts=tmp_path / "artifacts")
    with pytest.raises(PipelineError, match="'jetson-orin' is not one \\(try 'jetson-orin-cpu'\\)"):
        cross_cli.verify_target("jetson-orin", config)
    for name in ("cuda-sm80", "x86"):
        # Refused, not replaced by some ARM target; the message lists the ones qemu can check.
        with pytest.raises(PipelineError, match=f"'{name}' is not one \\(use one of: .*jetson-orin-cpu.*arm-a53.*"
                                                f"arm-neoverse-v1; e.g. make verify-arm TARGET=arm-a72\\)$"):
            cross_cli.verify_target(name, config)
    assert not (tmp_path / "artifacts").exists()


def test_verify_command_line_takes_the_model_options_with_help(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    shown = subprocess.run([sys.executable, "-m", "pipeline.cli.cross", "verify", "--help"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0
    help_text = " ".join(shown.stdout.split())
    for fragment in ("--weights WEIGHTS Checkpoint .pth", "--in-chans IN_CHANS Input channels",
                     "--data DATA Evaluation images",
                     "--target TARGET an aarch64 CPU target"):
        assert fragment in help_text, help_text
    # The Makefile's default MODEL_ARGS parse; a non-ARM TARGET is a one-line error, exit 2,
    # before anything is compiled.
    make_args = ["--variant", "micro", "--weights", "none", "--num-classes", "10", "--in-chans", "1",
                 "--input-size", "32", "--data", "fashion-mnist", "--preprocessing", "fashion-mnist"]
    refused = subprocess.run([sys.executable, "-m", "pipeline.cli.cross", "verify", "--target", "x86", *make_args],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: qemu checks aarch64 CPU targets; 'x86' is not one")
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "artifacts").exists()


@needs_qemu
@pytest.mark.slow
def test_verify_checks_the_given_model_on_images_of_its_data(tmp_path):
    from pipeline.checkpoints import save_checkpoint
    from pipeline.model import create_model

    save_checkpoint(create_model("micro", num_classes=4, in_chans=1, seed=3), tmp_path / "w.pth", "micro", 4, 1)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "images.npy", rng.integers(0, 255, (3, 40, 40), dtype=np.uint8))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli.cross", "verify", "--target", "arm-a72", "--weights", "w.pth",
         "--num-classes", "4", "--in-chans", "1", "--input-size", "32", "--batch-size", "2",
         "--data", "images.npy", "--preprocessing", "fashion-mnist"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr
    verified = json.loads(result.stdout)
    assert verified["target"] == "arm-a72" and verified["count"] == 2
    assert verified["input"] == "2 image(s) of images.npy"
    assert verified["max_abs_error"] <= ATOL
    # The user's model was compiled (4 outputs, 1 channel at 32), not a stand-in.
    meta = json.loads(Path(verified["library"] + ".json").read_text())
    assert meta["input"]["shape"] == [2, 1, 32, 32] and meta["output"]["shape"] == [2, 4]
    assert meta["target"] == "arm-a72"


@needs_qemu
@pytest.mark.slow
def test_many_images_run_in_chunks_of_one_qemu_process_each(tmp_path_factory):
    library = compiled(tmp_path_factory, "arm-a53")
    images = np.concatenate([sample(seed) for seed in range(5)])
    expected = load_artifact(compiled(tmp_path_factory, "x86")).infer(images[:1])
    done = []
    # Two images' bytes a process: chunks of 2, 2 and 1.
    outputs = cross.run_images_under_qemu(library, images, progress=done.append, chunk_bytes=2 * images[0].nbytes)
    assert outputs.shape == (5, 10)
    np.testing.assert_allclose(outputs[:1], expected, atol=ATOL)
    assert done == [2, 4, 5]
    # Each image's output is its own, in order, whichever process ran it.
    np.testing.assert_allclose(outputs[3:4], cross.run_under_qemu(library, images[3:4])[0], atol=ATOL)
