"""runtime_only: run artifacts with NumPy + the TVM runtime, in process and as a bundled run.py."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import pipeline.runtime.runtime_only as runtime_only
from pipeline.runtime.runtime_only import ArtifactError, LoadedArtifact, metadata_path
from pipeline.compiler.backend import compile_onnx, params_path
from targets import get_target
from conftest import REPO

SHAPE = (1, 3, 64, 64)
MODES = ("embedded", "separate")
RUNTIME_ONLY = Path(runtime_only.__file__)
# What run.py may import: the standard library it needs, NumPy and TVM's runtime.
ALLOWED_IMPORTS = {
    "__future__", "argparse", "ctypes", "glob", "hashlib", "json", "os", "platform", "re", "sys", "time", "pathlib",
    "numpy", "tvm", "tvm_ffi",
}


def _tiny_onnx(path: Path) -> Path:
    """Conv stem -> Relu -> global pool -> Gemm head, written with onnx.helper (no torch)."""
    rng = np.random.default_rng(1)
    weights = {
        "stem_w": rng.standard_normal((8, 3, 4, 4), dtype=np.float32),
        "stem_b": rng.standard_normal(8, dtype=np.float32),
        "head_w": rng.standard_normal((10, 8), dtype=np.float32),
        "head_b": rng.standard_normal(10, dtype=np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "stem_w", "stem_b"], ["c"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "head_w", "head_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(SHAPE))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        initializer=[numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    # IR version 8 / opset 17: old enough for every onnxruntime we pin.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("tiny")
    onnx_path = _tiny_onnx(directory / "tiny.onnx")
    sample = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return {"onnx": onnx_path, "sample": sample, "reference": session.run(None, {"x": sample})[0]}


@pytest.fixture(scope="session", params=MODES)
def artifact(request, tiny, tmp_path_factory) -> Path:
    library = tmp_path_factory.mktemp(f"artifact_{request.param}") / "model.so"
    compile_onnx(tiny["onnx"], get_target("x86"), library, params_mode=request.param)
    return library


def _bundle(library: Path, directory: Path) -> Path:
    """What a device bundle holds: run.py and the artifact's files, nothing else."""
    directory.mkdir()
    shutil.copy(RUNTIME_ONLY, directory / "run.py")
    for path in (library, metadata_path(library), params_path(library)):
        if path.exists():
            shutil.copy(path, directory / path.name)
    return directory


def _bare_env() -> dict[str, str]:
    # No PYTHONPATH, so `pipeline` cannot be imported by accident; no runtime-only
    # setting from the parent, so run.py has to choose it itself.
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TVM_USE_RUNTIME_LIB")}


def test_imports_only_the_runtime():
    tree = ast.parse(RUNTIME_ONLY.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
        else:
            continue
        for module in modules:
            assert module.split(".")[0] in ALLOWED_IMPORTS, module
            if module.startswith("tvm."):
                assert module.startswith("tvm.runtime"), module


@pytest.mark.slow
def test_infer_matches_onnxruntime(artifact, tiny):
    output = LoadedArtifact(artifact).infer(tiny["sample"])
    assert np.abs(output - tiny["reference"]).max() < 1e-4


@pytest.mark.slow
def test_bundled_run_py_in_a_fresh_process(artifact, tiny, tmp_path):
    bundle = _bundle(artifact, tmp_path / "bundle")
    np.save(bundle / "in.npy", tiny["sample"])
    # Run run.py as __main__ (exactly as `python run.py ...` would), then list what got imported.
    script = (
        "import json, runpy, sys\n"
        "sys.argv = ['run.py', 'model.so', '--input', 'in.npy', '--output', 'out.npy',"
        " '--repeat', '3', '--target', 'x86']\n"
        "try:\n"
        "    runpy.run_path('run.py', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "print('MODULES=' + json.dumps(sorted(sys.modules)))\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=bundle, env=_bare_env(),
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "latency median" in result.stdout
    modules = json.loads(result.stdout.split("MODULES=", 1)[1])
    assert "tvm.runtime" in modules
    # tvm/__init__ still imports the pure-Python tvm.te and tvm.tirx in runtime-only mode
    # (TVM 0.27), and tvm_ffi imports torch when it is installed; neither loads the compiler.
    compiler = [m for m in modules if m.split(".")[0] in ("pipeline", "onnx")
                or m.startswith(("tvm.relax", "tvm.s_tir.meta_schedule"))]
    assert compiler == []
    output = np.load(bundle / "out.npy")
    assert np.abs(output - tiny["reference"]).max() < 1e-4


@pytest.mark.slow
def test_cli_rejects_another_target(artifact, tiny, tmp_path):
    bundle = _bundle(artifact, tmp_path / "bundle")
    np.save(bundle / "in.npy", tiny["sample"])
    result = subprocess.run(
        [sys.executable, "run.py", "model.so", "--input", "in.npy", "--target", "jetson-orin-nano"],
        cwd=bundle, env=_bare_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: model.so was built for target 'x86', not 'jetson-orin-nano'; "
        "compile it for 'jetson-orin-nano'"
    )


@pytest.mark.slow
def test_check_target(artifact):
    loaded = LoadedArtifact(artifact)
    loaded.check_target("x86")
    with pytest.raises(ArtifactError, match="built for target 'x86', not 'rpi4'"):
        loaded.check_target("rpi4")


@pytest.mark.slow
def test_input_must_have_the_compiled_shape_and_dtype(artifact, tiny):
    loaded = LoadedArtifact(artifact)
    assert loaded.input_shape == SHAPE and loaded.output_shape == (1, 10)
    with pytest.raises(ArtifactError, match=r"input is float32 \[2, 3, 64, 64\]"):
        loaded.infer(np.zeros((2, 3, 64, 64), np.float32))
    with pytest.raises(ArtifactError, match="input is float64"):
        loaded.infer(tiny["sample"].astype(np.float64))


@pytest.mark.slow
def test_metadata_must_travel_with_the_library(artifact, tmp_path):
    shutil.copy(artifact, tmp_path / "model.so")
    with pytest.raises(ArtifactError, match=r"model\.so\.json is missing"):
        LoadedArtifact(tmp_path / "model.so")


@pytest.mark.slow
@pytest.mark.parametrize("artifact", ["separate"], indirect=True)
def test_separate_weights_must_travel_with_the_library(artifact, tmp_path):
    shutil.copy(artifact, tmp_path / "model.so")
    shutil.copy(metadata_path(artifact), tmp_path / "model.so.json")
    with pytest.raises(ArtifactError, match=r"weights file .*model\.params\.npz is missing"):
        LoadedArtifact(tmp_path / "model.so")


def test_missing_library(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        LoadedArtifact(tmp_path / "model.so")


def test_tvm_runs_on_every_physical_core_unless_told_otherwise():
    """TVM 0.27 would start logical CPUs / 2 threads on x86 (assumed SMT): half the cores here."""
    code = (
        "from pipeline.runtime.runtime_only import configure_cpu_threads, physical_cores\n"
        "n = configure_cpu_threads()\n"
        "import tvm\n"
        "print(n, tvm.runtime.num_threads(), physical_cores())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    configured, running, cores = map(int, out.stdout.split())
    assert configured == running == cores >= 1
    out = subprocess.run([sys.executable, "-c", code], env={**env, "TVM_NUM_THREADS": "1"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split()[:2] == ["1", "1"]


def _has_gpu_driver() -> bool:
    import ctypes.util

    return ctypes.util.find_library("cuda") is not None


@pytest.mark.slow
@pytest.mark.skipif(_has_gpu_driver(), reason="this machine has an NVIDIA driver")
def test_run_py_on_cuda_without_a_driver_names_the_missing_driver(artifact, tiny, tmp_path):
    """run.py registers TVM's CUDA runtime itself (runtime-only TVM 0.27 never loads it);
    on a machine without the driver that fails with one line saying what is missing."""
    bundle = _bundle(artifact, tmp_path / "bundle")
    np.save(bundle / "in.npy", tiny["sample"])
    metadata = json.loads((bundle / "model.so.json").read_text())
    (bundle / "model.so.json").write_text(json.dumps({**metadata, "device": "cuda"}))
    result = subprocess.run(
        [sys.executable, "run.py", "model.so", "--input", "in.npy", "--device", "cuda"],
        cwd=bundle, env=_bare_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: the NVIDIA driver library libcuda.so.1 is not installed")


def test_a_missing_cuda_runtime_library_is_named(monkeypatch):
    import ctypes

    import tvm_ffi

    real_get = tvm_ffi.get_global_func
    monkeypatch.setattr(tvm_ffi, "get_global_func", lambda name, allow_missing=False: None
                        if name == "device_api.cuda" else real_get(name, allow_missing=allow_missing))

    def cdll(path, mode=0):
        raise OSError("libcudart.so.13: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setattr(runtime_only, "_cudart_candidates", lambda soname: [])
    with pytest.raises(ArtifactError, match=r"CUDA runtime library libcudart\.so\.13 is not found.*LD_LIBRARY_PATH"):
        runtime_only.load_cuda_runtime()


@pytest.mark.slow
def test_an_artifact_for_another_architecture_is_refused_before_loading(artifact, tiny, tmp_path):
    """An aarch64 library on an x86 machine: say so, not "cannot open shared object file"."""
    bundle = _bundle(artifact, tmp_path / "bundle")
    np.save(bundle / "in.npy", tiny["sample"])
    metadata = json.loads((bundle / "model.so.json").read_text())
    other = "aarch64" if runtime_only.machine_arch() != "aarch64" else "x86_64"
    (bundle / "model.so.json").write_text(json.dumps(
        {**metadata, "host_triple": f"{other}-linux-gnu", "target": "arm-a72"}))
    result = subprocess.run(
        [sys.executable, "run.py", "model.so", "--input", "in.npy"],
        cwd=bundle, env=_bare_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: model.so was built for {other}-linux-gnu (target 'arm-a72'), but this machine is "
        f"{runtime_only.machine_arch()}; run it on a {other} machine, or compile it for a target of this one"
    )


def test_a_tvm_without_its_cuda_runtime_is_named(monkeypatch):
    import tvm_ffi

    real_get = tvm_ffi.get_global_func
    monkeypatch.setattr(tvm_ffi, "get_global_func", lambda name, allow_missing=False: None
                        if name == "device_api.cuda" else real_get(name, allow_missing=allow_missing))
    real_isfile = os.path.isfile
    monkeypatch.setattr(os.path, "isfile", lambda path: False if path.endswith("libtvm_runtime_cuda.so")
                        else real_isfile(path))
    with pytest.raises(ArtifactError, match=r"^this TVM .* has no CUDA runtime \(.*libtvm_runtime_cuda\.so is missing\)"):
        runtime_only.load_cuda_runtime()


@pytest.mark.slow
def test_an_artifact_runs_on_the_device_it_was_compiled_for_unless_told_otherwise(artifact, tiny, tmp_path):
    """A CUDA library on the CPU would fail inside TVM ("a loader of that name is not registered")."""
    bundle = _bundle(artifact, tmp_path / "bundle")
    np.save(bundle / "in.npy", tiny["sample"])

    def run_py(*args):
        return subprocess.run([sys.executable, "run.py", "model.so", "--input", "in.npy", *args], cwd=bundle,
                              env=_bare_env(), capture_output=True, text=True, timeout=120)

    assert "model.so on cpu" in run_py().stdout
    refused = run_py("--device", "cuda")
    assert refused.returncode == 2 and refused.stderr == (
        "error: model.so holds CPU code (target 'x86'), so it cannot run on device 'cuda'; "
        "pass --device cpu, or leave --device out\n")
    metadata = json.loads((bundle / "model.so.json").read_text())
    (bundle / "model.so.json").write_text(json.dumps({**metadata, "device": "cuda", "target": "cuda-sm80"}))
    refused = run_py("--device", "cpu")
    assert refused.returncode == 2 and refused.stderr == (
        "error: model.so holds CUDA kernels (target 'cuda-sm80'), so it cannot run on device 'cpu'; "
        "pass --device cuda, or leave --device out\n")
