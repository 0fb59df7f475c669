"""tvm_prepack: constant weights packed at compile time in the layout each tuned kernel reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import tvm

from conftest import REPO
from pipeline.config import PipelineConfig
from pipeline.engine import run_pipeline
from pipeline.stages import STAGES
from pipeline.compiler.backend import compile_onnx
from pipeline.runtime.runners import load_artifact
from targets import get_target

pytestmark = pytest.mark.slow

# The demo model and the records shipped for it, tuned before weights were marked layout free.
MODEL = dict(variant="micro", input_size=32, num_classes=10, in_chans=1,
             weights=REPO / "models" / "convnext-micro-fmnist.pth")
SHIPPED = REPO / "tuning" / "x86" / "micro-32-b1-c10-in1-fp32" / "znver4"


@pytest.fixture(scope="module")
def demo_onnx(tmp_path_factory) -> Path:
    config = PipelineConfig(**MODEL, artifacts=tmp_path_factory.mktemp("prepack") / "artifacts")
    results = run_pipeline(STAGES, config, get_target("x86"), "simplify", {"weights": MODEL["weights"]})
    return results["simplify"].outputs["onnx_simplified"]


def _reference(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_unmarked_records_apply_to_marked_kernels_and_weights_are_packed_once(demo_onnx, tmp_path):
    library = tmp_path / "lib" / "model.so"
    info = compile_onnx(demo_onnx, get_target("x86"), library, input_shape=(1, 1, 32, 32),
                        tuning_database=SHIPPED, dump_ir_dir=tmp_path / "ir")
    tuning = info["tuning"]
    # Every kernel but the three squarings of the channels-first LayerNorms, one per shape:
    # they were pow kernels when these records were made and are x * x since (integer
    # powers become multiplies: pipeline/compiler/graph_rewrites.py), so no record matches them.
    assert tuning["tasks_total"] - tuning["tasks_from_records"] == 3

    # The tuned GEMMs read packed weights: their layout rewrite was split out of the kernel
    # and folded into the embedded constant, so the module calls no rewrite at run time.
    scheduled = next((tmp_path / "ir").glob("*_schedule.py")).read_text()
    main = scheduled[scheduled.index("def main("):]
    assert "_prepacked" in main
    assert "_weight_prepack" not in main

    x = np.random.default_rng(0).standard_normal((1, 1, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(load_artifact(library).infer(x), _reference(demo_onnx, x), rtol=1e-4, atol=1e-4)


def test_default_schedules_pack_weights_too(demo_onnx, tmp_path):
    library = tmp_path / "lib" / "model.so"
    info = compile_onnx(demo_onnx, get_target("x86"), library, input_shape=(1, 1, 32, 32),
                        tuning_database=None, dump_ir_dir=tmp_path / "ir")
    assert info["tuning"]["default_tiled"] >= 1
    scheduled = next((tmp_path / "ir").glob("*_schedule.py")).read_text()
    assert "_prepacked" in scheduled[scheduled.index("def main("):]
    x = np.random.default_rng(1).standard_normal((1, 1, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(load_artifact(library).infer(x), _reference(demo_onnx, x), rtol=1e-4, atol=1e-4)


def test_unmarked_strips_only_the_mark():
    from tvm import te

    from pipeline.compiler.prepack import LAYOUT_FREE, unmarked

    a = te.placeholder((4,), name="a")
    w = te.placeholder((4,), name="w")
    out = te.compute((4,), lambda i: a[i] * w[i], name="out")
    func = te.create_prim_func([a, w, out]).with_attr("global_symbol", "main").with_attr(LAYOUT_FREE, [1])
    plain = unmarked(tvm.IRModule({"main": func}))
    assert LAYOUT_FREE not in plain["main"].attrs and plain["main"].attrs["global_symbol"] == "main"
    assert unmarked(plain) is None
