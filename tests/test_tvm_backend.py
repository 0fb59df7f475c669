"""compile_onnx: a tiny ConvNeXt-like ONNX model -> x86 library, checked against onnxruntime."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from pipeline.errors import PipelineError
from pipeline.runtime.runtime_only import metadata_path
from pipeline.compiler.backend import compile_onnx, params_path
from pipeline.runtime.runners import load_artifact
from targets import get_target

SHAPE = (1, 3, 64, 64)
MODES = ("embedded", "separate")


class TinyConvNeXt(nn.Module):
    """Every op a ConvNeXt exports to: patchify stem, LayerNorm, depthwise 7x7, MLP, pool, head."""

    def __init__(self, dim: int = 16, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.stem_norm = nn.LayerNorm(dim)
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.head_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        x = self.stem_norm(x).permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        x = x + y.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        return self.head(self.head_norm(x.mean((-2, -1))))


def _export(path: Path, dynamic_batch: bool) -> Path:
    torch.manual_seed(0)
    model = TinyConvNeXt().eval()
    dynamic_axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        # torch 2.13 deprecates the TorchScript exporter (dynamo=False); it still works.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (torch.randn(SHAPE),), str(path), dynamo=False, opset_version=17,
            input_names=["input"], output_names=["logits"], dynamic_axes=dynamic_axes,
        )
    return path


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("onnx")
    _export(directory / "static.onnx", dynamic_batch=False)
    _export(directory / "dynamic.onnx", dynamic_batch=True)
    return directory


@pytest.fixture(scope="session")
def sample() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)


@pytest.fixture(scope="session")
def reference(onnx_dir, sample) -> np.ndarray:
    session = ort.InferenceSession(str(onnx_dir / "static.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": sample})[0]


@pytest.fixture(scope="session", params=MODES)
def compiled(request, onnx_dir, tmp_path_factory) -> dict:
    """One build per params mode, from the dynamic-batch export with a fixed input_shape
    (what the compile stage does), dumping IR between phases."""
    out_dir = tmp_path_factory.mktemp(f"build_{request.param}")
    library = out_dir / "model.so"
    dump_dir = tmp_path_factory.mktemp(f"ir_{request.param}")
    info = compile_onnx(
        onnx_dir / "dynamic.onnx", get_target("x86"), library,
        params_mode=request.param, input_shape=SHAPE, dump_ir_dir=dump_dir,
    )
    return {"mode": request.param, "library": library, "info": info, "dump_dir": dump_dir}


@pytest.mark.slow
def test_output_matches_onnxruntime(compiled, sample, reference):
    output = load_artifact(compiled["library"]).infer(sample)
    assert output.shape == reference.shape == (1, 10)
    assert np.abs(output - reference).max() < 1e-4


@pytest.mark.slow
def test_info_describes_the_build(compiled):
    info, library = compiled["info"], compiled["library"]
    assert info["library_bytes"] == library.stat().st_size > 0
    assert info["params_mode"] == compiled["mode"]
    assert info["input"] == {"name": "input", "shape": list(SHAPE), "dtype": "float32"}
    assert info["output"] == {"shape": [1, 10], "dtype": "float32"}
    assert info["num_primfuncs"] > 0
    assert info["compile_s"] > 0
    assert info["tvm_version"].startswith("0.27")
    json.dumps(info)  # goes into the stage manifest
    if compiled["mode"] == "separate":
        assert info["params_file"] == str(params_path(library))
    else:
        assert info["params_file"] is None


@pytest.mark.slow
def test_metadata_is_written_beside_the_library(compiled):
    library, target = compiled["library"], get_target("x86")
    meta = json.loads(metadata_path(library).read_text())
    assert meta["target"] == "x86"
    assert meta["target_json"] == target.tvm_target
    assert meta["input"] == {"name": "input", "shape": list(SHAPE), "dtype": "float32"}
    assert meta["output"] == {"shape": [1, 10], "dtype": "float32"}
    if compiled["mode"] == "separate":
        assert meta["params_file"] == "model.params.npz"
        with np.load(library.with_name(meta["params_file"])) as weights:
            assert sorted(weights.files) == sorted(meta["params_order"])
        assert meta["params_order"][:2] == ["stem.weight", "stem.bias"]
    else:
        assert meta["params_file"] is None and meta["params_order"] == []


@pytest.mark.slow
def test_no_temporary_files_are_left(compiled):
    expected = {"model.so", "model.so.json"}
    if compiled["mode"] == "separate":
        expected.add("model.params.npz")
    assert {p.name for p in compiled["library"].parent.iterdir()} == expected


@pytest.mark.slow
def test_separate_library_carries_no_weights(onnx_dir, tmp_path):
    # A LayerNorm's weight keeps its layout through lowering (convolution weights do not:
    # they are permuted for channels-last compute), so its raw bytes are in the embedded
    # library's constant pool and must be absent from the separate one.
    target = get_target("x86")
    embedded, separate = tmp_path / "e" / "model.so", tmp_path / "s" / "model.so"
    compile_onnx(onnx_dir / "static.onnx", target, embedded, params_mode="embedded")
    compile_onnx(onnx_dir / "static.onnx", target, separate, params_mode="separate")
    with np.load(params_path(separate)) as weights:
        norm_weight = weights["stem_norm.weight"].tobytes()
    assert norm_weight in embedded.read_bytes()
    assert norm_weight not in separate.read_bytes()


@pytest.mark.slow
def test_ir_dumps_follow_the_phases(compiled):
    names = sorted(p.name for p in compiled["dump_dir"].iterdir())
    assert names[0] == "00_imported.py" and names[-1].endswith("_finalize.py")
    assert ("01_params_bound.py" in names) == (compiled["mode"] == "embedded")
    assert any(name.endswith("_fuse.py") for name in names)
    assert "R.function" in (compiled["dump_dir"] / names[-1]).read_text()


@pytest.mark.slow
def test_cross_compiler_hook_links_the_library(onnx_dir, tmp_path, sample, reference):
    # Name the host compiler as a "cross" compiler: proves the link hook works on x86.
    compiler = shutil.which("g++") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler on PATH")
    target = dataclasses.replace(get_target("x86"), cross_compiler=compiler)
    library = tmp_path / "model.so"
    compile_onnx(onnx_dir / "static.onnx", target, library)
    assert np.abs(load_artifact(library).infer(sample) - reference).max() < 1e-4


def test_corrupt_onnx_leaves_no_library(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07this is not protobuf" + bytes(range(256)))
    library = tmp_path / "out" / "model.so"
    with pytest.raises(PipelineError, match=r"is not a valid ONNX model: .*re-run `pipeline export`"):
        compile_onnx(bad, get_target("x86"), library)
    assert not library.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_empty_onnx_is_rejected(tmp_path):
    empty = tmp_path / "model.onnx"
    empty.write_bytes(b"")  # parses as an empty ModelProto; only the checker notices
    with pytest.raises(PipelineError, match="is not a valid ONNX model"):
        compile_onnx(empty, get_target("x86"), tmp_path / "model.so")


def test_missing_onnx(tmp_path):
    with pytest.raises(PipelineError, match="does not exist; re-run `pipeline export`"):
        compile_onnx(tmp_path / "nope.onnx", get_target("x86"), tmp_path / "model.so")


def test_input_shape_must_match_the_model(onnx_dir, tmp_path):
    with pytest.raises(PipelineError, match=r"input_shape \(1, 3, 32, 32\) does not match .*\(1, 3, 64, 64\)"):
        compile_onnx(onnx_dir / "static.onnx", get_target("x86"), tmp_path / "m.so", input_shape=(1, 3, 32, 32))
    with pytest.raises(PipelineError, match="does not match"):
        compile_onnx(onnx_dir / "dynamic.onnx", get_target("x86"), tmp_path / "m.so", input_shape=(3, 64, 64))
    assert list(tmp_path.iterdir()) == []


def test_dynamic_batch_needs_an_input_shape(onnx_dir, tmp_path):
    with pytest.raises(PipelineError, match=r"dynamic dims \(batch, 3, 64, 64\)"):
        compile_onnx(onnx_dir / "dynamic.onnx", get_target("x86"), tmp_path / "m.so")


def test_unknown_input_name(onnx_dir, tmp_path):
    with pytest.raises(PipelineError, match="no input 'image'; its inputs are: input"):
        compile_onnx(onnx_dir / "static.onnx", get_target("x86"), tmp_path / "m.so", input_name="image")


def test_unknown_params_mode(onnx_dir, tmp_path):
    with pytest.raises(PipelineError, match="unknown params_mode 'shared'"):
        compile_onnx(onnx_dir / "static.onnx", get_target("x86"), tmp_path / "m.so", params_mode="shared")


def test_unsupported_operator_is_named(tmp_path):
    # Celu is valid ONNX (opset 12) that TVM 0.27's Relax frontend has no converter for.
    graph = helper.make_graph(
        [helper.make_node("Celu", ["x"], ["y"])], "celu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    path = tmp_path / "celu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    library = tmp_path / "celu.so"
    with pytest.raises(PipelineError, match="cannot import: Celu"):
        compile_onnx(path, get_target("x86"), library)
    assert not library.exists()


@pytest.mark.slow
def test_load_artifact_raises_pipeline_errors(compiled, sample):
    artifact = load_artifact(compiled["library"])
    artifact.check_target("x86")
    with pytest.raises(PipelineError, match="built for target 'x86', not 'jetson'"):
        artifact.check_target("jetson")
    with pytest.raises(PipelineError, match=r"compiled for float32 \[1, 3, 64, 64\]"):
        artifact.infer(sample[:, :, :32, :32])
