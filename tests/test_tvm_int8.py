"""INT8 in TVM: the QDQ -> integer rewrite (pipeline/compiler/int8.py), the compiled artifact
against ONNX Runtime on the same QDQ model, and `pipeline run --precision int8`."""

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.quantization import qdq, sensitivity
from pipeline.quantization.sensitivity import logit_metrics
from pipeline.quantization.settings import QuantizeSettings
from test_quantize import MICRO_LAYERS, SIZE, calibration_images, make_float_onnx, save_model_checkpoint

TINY = ["--variant", "micro", "--input-size", str(SIZE), "--num-classes", "10", "--warmup", "1", "--repeats", "3"]


def relax_module(onnx_path: Path):
    """The QDQ model imported into Relax with its weights bound, as compile_onnx does it."""
    from pipeline.compiler.onnx_import import bind_weights, import_relax, resolve_input
    from pipeline.onnx_io import load_onnx

    model = load_onnx(onnx_path)
    name, shape, dtype = resolve_input(model, None, None)
    mod, _, values = import_relax(model, onnx_path, name, shape, dtype)
    return bind_weights(mod, values)


def quantized(tmp_path: Path, **settings) -> Path:
    images = calibration_images(16)
    calibrated, excluded = qdq.prepare(
        qdq.load_float_model(make_float_onnx(tmp_path / "float.onnx")), images, QuantizeSettings(**settings), tmp_path
    )
    return calibrated.quantize(tmp_path / "model.int8.onnx", exclude=excluded)


@pytest.fixture(scope="module")
def qdq_requantized(tmp_path_factory) -> Path:
    """ONNX Runtime's own QDQ layout: every quantized layer's output is requantized to int8."""
    return quantized(tmp_path_factory.mktemp("requant"), float_outputs=False)


# --- the rewrite ----------------------------------------------------------------------------


def test_every_conv_and_matmul_becomes_int8_x_int8_to_int32(qdq_requantized):
    from pipeline.compiler.int8 import Int8Report, compute_ops, lower_qdq_to_integer

    before = compute_ops(relax_module(qdq_requantized))
    assert len(before) == MICRO_LAYERS and all(op["inputs"] == ["float32", "float32"] for op in before)

    report = Int8Report()
    after = compute_ops(lower_qdq_to_integer(relax_module(qdq_requantized), report))
    assert len(after) == MICRO_LAYERS
    assert all(op["inputs"] == ["int8", "int8"] and op["output"] == "int32" for op in after), after
    assert report.to_dict()["integer_ops"] == {"conv2d": 9, "matmul": 11}
    assert report.with_requantize == MICRO_LAYERS and report.float_kept == []


def test_the_lowering_pass_hands_its_report_on_the_module_it_returns(qdq_requantized):
    """A pure pass: nothing outside it is written to; what it lowered is a result on the
    module (pass_results.py), and taking it off leaves the module lower_qdq_to_integer makes."""
    from pipeline.compiler import pass_results
    from pipeline.compiler.int8 import INT8_RESULT, int8_lowering_pass, lower_qdq_to_integer

    mod = relax_module(qdq_requantized)
    lowered, results = pass_results.take_results(int8_lowering_pass()(mod))
    assert results[INT8_RESULT]["integer_ops"] == {"conv2d": 9, "matmul": 11}
    assert results[INT8_RESULT]["requantize_epilogues"] == MICRO_LAYERS
    assert pass_results.take_results(lowered)[1] == {}
    assert lowered.script(show_meta=True) == lower_qdq_to_integer(mod).script(show_meta=True)


def test_the_requantize_epilogue_is_fused_into_the_integer_kernel(qdq_requantized):
    import tvm
    from tvm import relax

    from pipeline.compiler.int8 import lower_qdq_to_integer, primfunc_compute_dtypes

    mod = lower_qdq_to_integer(relax_module(qdq_requantized))
    with tvm.target.Target("llvm"):
        legalized = tvm.transform.Sequential([
            relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
        ])(mod)
        kernels = primfunc_compute_dtypes(legalized)
        fused = relax.transform.FuseTIR()(relax.transform.FuseOps()(legalized))
    # TIR level: every convolution and matmul reads int8 and accumulates into int32.
    assert len(kernels) >= 9 and all(k["inputs"] == ["int8", "int8"] and k["output"] == "int32" for k in kernels), kernels
    names = [str(gv.name_hint) for gv in fused.functions]
    requantizing = [n for n in names if ("conv2d" in n or "matmul" in n) and "round" in n and "clip" in n]
    assert len(requantizing) >= 9, names
    assert not any(n.startswith("conv2d") or n.startswith("matmul") for n in names)  # none left unfused


def test_excluded_layers_keep_computing_in_float(tmp_path):
    from pipeline.compiler.int8 import Int8Report, compute_ops, lower_qdq_to_integer

    path = quantized(tmp_path, exclude=("*/stages.3/*", "*/head/*"))
    report = Int8Report()
    ops = compute_ops(lower_qdq_to_integer(relax_module(path), report))
    floats = [op for op in ops if op["inputs"] == ["float32", "float32"]]
    assert len(floats) == 4 and len(ops) - len(floats) == MICRO_LAYERS - 4
    assert report.float_kept == ["weight is float (layer not quantized)"] * 4
    # LayerNorm and GELU stay float operators.
    script = lower_qdq_to_integer(relax_module(path)).script(show_meta=False)
    assert "R.nn.layer_norm(" in script and "R.erf(" in script


def test_int8_compile_refuses_separate_params_and_float_models(tmp_path):
    from pipeline.compiler.backend import compile_onnx
    from targets import get_target

    with pytest.raises(PipelineError, match="--params embedded"):
        compile_onnx(tmp_path / "x.onnx", get_target("x86"), tmp_path / "m.so", params_mode="separate", precision="int8")
    float_model = make_float_onnx(tmp_path / "float.onnx")
    with pytest.raises(PipelineError, match="is a float model.*pipeline quantize"):
        compile_onnx(float_model, get_target("x86"), tmp_path / "m.so", precision="int8")


# --- the compiled artifact against ONNX Runtime --------------------------------------------


def _test_images(count: int = 64) -> np.ndarray:
    from calibration import load_dataset

    return load_dataset("fashion-mnist:test", SIZE, "fashion-mnist", in_chans=3, limit=count, seed=1).images


def _cross_check(onnx_path: Path, library: Path) -> dict:
    from pipeline.runtime.runners import TvmRunner

    images = _test_images()
    runtime = sensitivity.infer(onnx_path, images, 1)
    artifact = TvmRunner(library)
    compiled = np.concatenate([artifact.infer(images[i:i + 1]) for i in range(len(images))])
    metrics = logit_metrics(runtime, compiled)
    metrics["logit_range"] = float(np.ptp(runtime))
    return metrics


@pytest.mark.slow
def test_requantizing_artifact_matches_onnxruntime(qdq_requantized, tmp_path):
    from pipeline.compiler.backend import compile_onnx
    from targets import get_target

    info = compile_onnx(qdq_requantized, get_target("x86"), tmp_path / "model.so", precision="int8")
    assert info["int8"]["integer_ops"] == {"conv2d": 9, "matmul": 11}
    metrics = _cross_check(qdq_requantized, tmp_path / "model.so")
    # Both sides round the same int32 accumulators; they differ where ORT's fixed-point
    # requantization and ours land on different sides of a .5: a step of one layer's scale.
    assert metrics["top1_agreement"] >= 0.99, metrics
    assert metrics["cosine_min"] > 0.999 and metrics["sqnr_db"] > 35, metrics
    assert metrics["max_abs_error"] < 0.05 * metrics["logit_range"], metrics


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
    """`pipeline run --precision int8` on Fashion-MNIST with a model whose blocks matter."""
    from conftest import run_cli

    workdir = tmp_path_factory.mktemp("int8-run")
    checkpoint = save_model_checkpoint(workdir / "model.pth")
    result = run_cli(
        "run", *TINY, "--weights", str(checkpoint), "--precision", "int8", "--data", "fashion-mnist",
        "--preprocessing", "fashion-mnist", "--eval-limit", "64", cwd=workdir, check=True,
    )
    return workdir, result


def _stage_dir(workdir: Path, stage: str) -> Path:
    (path,) = [p for p in (workdir / "artifacts" / stage).iterdir() if (p / "manifest.json").is_file()]
    return path


@pytest.mark.slow
def test_run_int8_flows_through_quantize_compile_and_the_int8_report(int8_run):
    workdir, result = int8_run
    assert "[quantize] running" in result.stderr
    assert "calibration images from fashion-mnist:train" in result.stderr
    reports = workdir / "reports" / "x86-int8"
    accuracy = json.loads((reports / "accuracy.json").read_text())
    assert accuracy["precision"] == "int8" and accuracy["reference"] == "pytorch"
    metrics = accuracy["metrics"]
    # FP32 (PyTorch) and INT8 (the artifact) side by side, and how close they are.
    for key in ("reference_top1", "reference_top5", "top1", "top5", "top1_agreement", "cosine_min", "max_abs_error"):
        assert key in metrics
    assert metrics["top1_agreement"] >= 0.9 and metrics["cosine_mean"] > 0.99, metrics
    latency = json.loads((reports / "latency.json").read_text())
    assert latency["precision"] == "int8" and latency["backends"]["tvm"]["median_ms"] > 0
    # How the model was quantized travels with its numbers.
    assert "quantization.md" in (reports / "report.md").read_text()
    assert json.loads((reports / "quantization.json").read_text())["settings"]["method"] == "minmax"
    assert (reports / "quantization.md").read_text().strip()

    compiled = json.loads((_stage_dir(workdir, "compile") / "manifest.json").read_text())
    assert compiled["settings"]["precision"] == "int8"
    assert compiled["info"]["int8"]["integer_ops"] == {"conv2d": 9, "matmul": 11}
    assert "onnx_quantized" in compiled["input_files"]
    quantize = json.loads((_stage_dir(workdir, "quantize") / "manifest.json").read_text())
    assert quantize["info"]["quantized"] == f"{MICRO_LAYERS}/{MICRO_LAYERS} layers"
    assert "LayerNorm" in quantize["info"]["float_ops"] and quantize["info"]["calibration"]["count"] == 256


@pytest.mark.slow
def test_run_int8_artifact_matches_onnxruntime_on_the_same_qdq_model(int8_run):
    workdir, _ = int8_run
    metrics = _cross_check(
        _stage_dir(workdir, "quantize") / "model.int8.onnx", _stage_dir(workdir, "compile") / "model.so"
    )
    assert metrics["top1_agreement"] >= 0.99, metrics
    # Fewer roundings than the requantizing layout above (float ops read float): closer still.
    assert metrics["cosine_min"] > 0.999 and metrics["sqnr_db"] > 40, metrics
    assert metrics["max_abs_error"] < 0.03 * metrics["logit_range"], metrics


def test_fp32_compile_still_reads_the_simplified_model():
    from pipeline.config import PipelineConfig
    from pipeline.engine import inputs_of
    from pipeline.stages import STAGES, compile

    assert inputs_of(compile.STAGE, PipelineConfig(precision="fp32")) == ("onnx_simplified",)
    assert inputs_of(compile.STAGE, PipelineConfig(precision="int8")) == ("onnx_quantized",)
    assert [s.name for s in STAGES].index("quantize") < [s.name for s in STAGES].index("compile")
