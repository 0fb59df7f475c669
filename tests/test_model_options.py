"""pipeline/cli/options.py and the command line around it: the options every model command
shares, the checks that run before any work, and a CLI that starts without torch or TVM."""

import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import MEASURE_ARGS, REPO, TINY_ARGS, output_path, run_cli
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.cli.options import MEASUREMENT_OPTIONS, config_from_options, model_parameters, validate_config


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120)


def test_importing_the_cli_loads_no_framework():
    result = _python("import pipeline.cli, sys; print([m in sys.modules for m in ('torch', 'tvm', 'onnx')])")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[False, False, False]"


@pytest.mark.parametrize("argv", [["--help"], ["compile", "--help"], ["package", "--help"], ["--version"]])
def test_help_and_version_load_no_framework(argv):
    # What `pipeline ARGV` does, then which heavy modules it loaded: help and version must
    # not pay for torch or TVM (seconds each).
    code = ("import sys, pipeline.cli as cli; sys.argv = ['pipeline', *sys.argv[1:]]; cli.main(); "
            "print('loaded:', [m for m in ('torch', 'tvm', 'onnx') if m in sys.modules])")
    result = _python(code, *argv)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "loaded: []"


def test_version():
    from importlib import metadata

    result = run_cli("--version", cwd=REPO)
    assert result.returncode == 0
    assert result.stdout.strip() == f"pipeline (convnext-edge) {metadata.version('convnext-edge')}"


def test_every_model_command_takes_the_same_model_options():
    from pipeline import cli

    from pipeline.cli.quantize import MODEL_OPTIONS

    everything = [p.name for p in model_parameters()]
    building = [p.name for p in model_parameters(exclude=MEASUREMENT_OPTIONS)]
    # The commands that measure take every option; the others all but the measuring ones;
    # quantize leaves out the options of the stages after it.
    for command, names in (("compile", building), ("build", building), ("run", everything),
                           ("bench", everything), ("package", building), ("quantize", MODEL_OPTIONS)):
        callback = next(c.callback for c in cli.app.registered_commands if c.name == command)
        params = inspect.signature(callback).parameters
        assert [name for name in names if name not in params] == [], command
        if command in ("compile", "build", "package"):
            assert not set(MEASUREMENT_OPTIONS) & set(params), command


def test_compile_refuses_an_option_that_would_do_nothing(tmp_path):
    result = run_cli("compile", "--variant", "micro", "--repeats", "5", cwd=tmp_path)
    assert result.returncode == 2
    assert "No such option: --repeats" in result.stderr and "Traceback" not in result.stderr


def test_config_from_options_maps_the_cli_names():
    config = config_from_options({"variant": "atto", "weights": "none", "params": "separate", "eval_limit": 0,
                                  "input_size": 64, "target": "x86", "onnx": None})
    assert config == PipelineConfig(variant="atto", weights=None, params_mode="separate", eval_limit=None,
                                    input_size=64)


@pytest.mark.parametrize("size", [0, -32, 16, 65])
def test_input_size_message_states_the_rule(size):
    with pytest.raises(PipelineError, match=f"--input-size {size} is not valid: it must be a multiple of 32, "
                                            "at least 32"):
        validate_config(PipelineConfig(input_size=size), None)


def test_an_input_size_that_cannot_fit_in_memory_is_refused_with_the_size_that_fits(monkeypatch):
    import pipeline.memory as memory
    from pipeline.model import VARIANTS, create_model

    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 24 * 2**30)
    config = PipelineConfig(variant="micro", in_chans=1, input_size=100000)
    with pytest.raises(PipelineError, match=r"^--input-size 100000 at --batch-size 1 needs about \d+\.\d GB of memory "
                                            r"to build micro, more than the 24\.0 GB available here; "
                                            r"use --input-size (\d+) or less$") as raised:
        validate_config(config, None)
    largest = int(raised.value.args[0].split("use --input-size ")[1].split()[0])
    assert largest % 32 == 0
    validate_config(config.replace(input_size=largest), None)
    with pytest.raises(PipelineError):
        validate_config(config.replace(input_size=largest + 32), None)
    # Weights alone past the limit: no input size fits.
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 2**20)
    with pytest.raises(PipelineError, match="no input size fits: use a smaller --variant, --num-classes or --batch-size$"):
        validate_config(config.replace(input_size=32), None)
    model = create_model("micro", in_chans=1)
    assert memory.parameter_count(VARIANTS["micro"], 1, 1000) == sum(p.numel() for p in model.parameters())


def test_a_huge_input_size_fails_before_any_work(tmp_path):
    result = run_cli("compile", "--variant", "micro", "--in-chans", "1", "--input-size", "1000000", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: --input-size 1000000 at --batch-size 1 needs about "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert not (tmp_path / "artifacts").exists()


def test_data_and_onnx_problems_fail_before_the_settings_are_printed(tmp_path):
    missing = run_cli("compile", *TINY_ARGS, "--data", "nowhere", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: --data: image folder 'nowhere' does not exist")
    (tmp_path / "notes.csv").write_text("a,b\n")
    wrong_kind = run_cli("compile", *TINY_ARGS, "--calib-data", "notes.csv", cwd=tmp_path)
    assert wrong_kind.stderr.startswith("error: --calib-data: 'notes.csv' is not a folder, .npy, .npz or .txt")
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage")
    bad_onnx = run_cli("compile", *TINY_ARGS, "--onnx", "bad.onnx", cwd=tmp_path)
    assert bad_onnx.stderr.startswith("error: 'bad.onnx' is not a valid ONNX model")
    for result in (missing, wrong_kind, bad_onnx):
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "artifacts").exists()


def test_onnx_of_another_shape_is_refused_before_any_stage(tmp_path):
    from pipeline.model import create_model
    from pipeline.stages.export import export_onnx

    export_onnx(create_model("micro", num_classes=10).eval(), tmp_path / "m.onnx", (1, 3, 64, 64), opset=17,
                dynamic_batch=True)
    config = PipelineConfig(input_size=96, batch_size=4)
    with pytest.raises(PipelineError, match=r"takes input 'input' of shape \?x3x64x64, not 4x3x96x96; pass the "
                                            r"--batch-size, --in-chans and --input-size it was exported with"):
        validate_config(config, tmp_path / "m.onnx")
    validate_config(config.replace(input_size=64), tmp_path / "m.onnx")  # a dynamic batch fits any


@pytest.mark.slow
def test_evaluate_prints_accuracy_and_warns_about_the_data(tiny_run, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (70, 80, 3), dtype=np.uint8)).save(tmp_path / "data" / label / f"{i}.png")
    for name in ("broken.jpg", "empty.png"):
        (tmp_path / "data" / "dog" / name).write_bytes(b"not an image")
    result = run_cli("evaluate", *TINY_ARGS, *MEASURE_ARGS, "--data", str(tmp_path / "data"), cwd=tiny_run, check=True)
    accuracy = json.loads(output_path(result, "accuracy").read_text())
    metrics = accuracy["metrics"]
    lines = result.stdout.splitlines()
    assert f"evaluated: 6 images from {tmp_path / 'data'}" in lines
    assert f"top-1: {100 * metrics['top1']:.2f}% (pytorch reference {100 * metrics['reference_top1']:.2f}%)" in lines
    assert f"top-5: {100 * metrics['top5']:.2f}% (pytorch reference {100 * metrics['reference_top5']:.2f}%)" in lines
    assert any(line.startswith("top-1 agreement with pytorch: 100.00%") for line in lines)
    def data_warnings(stderr: str) -> list[str]:  # (the tuning records' warnings come first)
        return [line for line in stderr.splitlines() if line.startswith("warning: ") and "tuning records" not in line]

    warnings = data_warnings(result.stderr)
    # The tiny model has 10 outputs, the folder 2 classes; 2 files could not be read.
    assert warnings[0].startswith("warning: the data has 2 classes (cat, dog) but the model has 10 outputs")
    assert warnings[1] == (f"warning: 2 unreadable image file(s) skipped: {tmp_path / 'data' / 'dog' / 'broken.jpg'}, "
                           f"{tmp_path / 'data' / 'dog' / 'empty.png'}")
    # A cached evaluation says the same.
    again = run_cli("evaluate", *TINY_ARGS, *MEASURE_ARGS, "--data", str(tmp_path / "data"), cwd=tiny_run, check=True)
    assert "[evaluate] cached" in again.stderr
    assert again.stdout == result.stdout and data_warnings(again.stderr) == warnings


@pytest.mark.slow
def test_evaluate_without_labels_prints_agreement(tiny_run):
    result = run_cli("evaluate", *TINY_ARGS, *MEASURE_ARGS, cwd=tiny_run, check=True)
    assert "evaluated: 16 images from random normal inputs (no labels: agreement and error only)" in result.stdout
    assert "top-1:" not in result.stdout and "top-1 agreement with pytorch: 100.00%" in result.stdout
