"""pipeline compile-matrix: every target x precision compiled (or why not), written to
matrix.json and README.md; the micro model at 64x64 stands in for ConvNeXt-Tiny."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from calibration.sample_photos import SAMPLE_PHOTOS
from conftest import REPO
from edge_models import elf_machine
from pipeline.compiler import backend
from pipeline.cli.compile_matrix import register
from targets import GPU_INT8_REASON, get_target

# The model of the other tiny tests, without the bench options compile-matrix does not take.
MODEL_ARGS = ["--variant", "micro", "--input-size", "64", "--num-classes", "10"]
HAS_NVCC = shutil.which("nvcc") is not None
# A CUDA target builds its kernels with nvcc; without it the cell would fail, not test anything.
CUDA_TARGET = "cuda-sm80"
TARGETS = ["x86", "arm-a53", *([CUDA_TARGET] if HAS_NVCC else []), "cuda"]
AARCH64_ELF = 183

# The real entry point (its exit codes and one-line errors), with the command registered when
# pipeline/cli.py does not register it itself.
_MAIN = (
    "from pipeline import cli\n"
    "from pipeline.cli.compile_matrix import register\n"
    "if 'compile-matrix' not in {c.name for c in cli.app.registered_commands}:\n"
    "    register(cli.app)\n"
    "cli.main()\n"
)


def run_matrix_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`pipeline compile-matrix ARGS` in a fresh process, as a user would run it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", _MAIN, "compile-matrix", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def matrix_run(tmp_path_factory):
    """One matrix run: (the finished process, its working directory, matrix.json, README.md)."""
    workdir = tmp_path_factory.mktemp("compile-matrix")
    result = run_matrix_cli(*MODEL_ARGS, "--targets", ",".join(TARGETS), "--precisions", "fp32,int8,fp16",
                            "--output", "matrix", cwd=workdir)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    matrix = json.loads((workdir / "matrix" / "matrix.json").read_text())
    readme = (workdir / "matrix" / "README.md").read_text()
    return result, workdir, matrix, readme


def cell(matrix: dict, target: str, precision: str) -> dict:
    (found,) = [c for c in matrix["cells"] if (c["target"], c["precision"]) == (target, precision)]
    return found


def table_row(readme: str, target: str) -> list[str]:
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if cells[0] == target:
            return cells
    raise AssertionError(f"no row for {target} in:\n{readme}")


@pytest.mark.slow
def test_one_cell_per_target_and_precision_in_order(matrix_run):
    result, workdir, matrix, _ = matrix_run
    assert [(c["target"], c["precision"]) for c in matrix["cells"]] == [
        (target, precision) for target in TARGETS for precision in ("fp32", "fp16", "int8")
    ]
    assert result.stdout.splitlines() == ["matrix: matrix/matrix.json", "readme: matrix/README.md"]
    # Written whole: no temporary file is left beside them.
    assert sorted(p.name for p in (workdir / "matrix").iterdir()) == ["README.md", "matrix.json"]
    total = len(matrix["cells"])
    for index, (target, precision) in enumerate(((c["target"], c["precision"]) for c in matrix["cells"]), 1):
        assert f"[matrix] cell {index} of {total}: {target} {precision}" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("target", ["x86", "arm-a53"])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_cpu_cells_compile_with_sizes_kernels_and_target(matrix_run, target, precision):
    _, workdir, matrix, readme = matrix_run
    entry = cell(matrix, target, precision)
    assert entry["status"] == "compiled" and entry["reason"] == ""
    assert entry["library_bytes"] > 0 and entry["params_bytes"] == 0
    assert entry["artifact_bytes"] == entry["library_bytes"]
    assert entry["compile_s"] > 0 and entry["cell_s"] >= 0
    assert entry["kernels"] > 0
    assert entry["tuning"]["tasks_total"] > 0 and entry["tuning_summary"]
    assert entry["target_json"] == get_target(target).target_json()
    # Committed files name no folder of the machine that wrote them: paths are relative to where it ran.
    assert entry["artifact"].startswith("artifacts/compile/") and str(workdir) not in readme
    library = workdir / entry["artifact"]
    assert library.stat().st_size == entry["library_bytes"]
    if target == "arm-a53":
        assert elf_machine(library) == AARCH64_ELF
    if precision == "int8":
        assert sum(entry["int8"]["integer_ops"].values()) > 0
    else:
        assert entry["int8"] is None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_NVCC, reason="nvcc (CUDA toolkit) is not installed")
def test_cuda_target_compiles_fp32_and_fp16_and_offers_no_int8(matrix_run):
    from pipeline.compiler import cuda_code

    _, workdir, matrix, readme = matrix_run
    for precision in ("fp32", "fp16"):
        entry = cell(matrix, CUDA_TARGET, precision)
        assert entry["status"] == "compiled" and entry["library_bytes"] > 0 and entry["kernels"] > 0
        assert json.loads(entry["target_json"])["arch"] == "sm_80"
        assert "sass:sm_80" in [str(code) for code in cuda_code.cuda_device_code(workdir / entry["artifact"])]
        assert table_row(readme, CUDA_TARGET)[1 + ("fp32", "fp16", "int8").index(precision)].startswith("ok ")
    # Issue #16: without integer tensor cores int8 ran 5.6x slower than fp16 on an H200.
    int8 = cell(matrix, CUDA_TARGET, "int8")
    assert int8["status"] == "not offered" and int8["library_bytes"] is None and int8["int8"] is None
    assert int8["reason"] == f"{CUDA_TARGET} offers precisions fp32, fp16: {GPU_INT8_REASON}"
    assert table_row(readme, CUDA_TARGET)[3] == "not offered"


@pytest.mark.slow
def test_a_precision_a_target_lacks_is_not_offered(matrix_run):
    _, _, matrix, readme = matrix_run
    fp16 = cell(matrix, "x86", "fp16")
    assert fp16["status"] == "not offered" and fp16["library_bytes"] is None
    assert fp16["reason"] == "x86 offers precisions fp32, int8"
    assert table_row(readme, "x86")[2] == "not offered"
    # int8 on a GPU target (the detected cuda is a row with or without a GPU): not offered, and why.
    int8 = cell(matrix, "cuda", "int8")
    assert int8["status"] == "not offered" and int8["library_bytes"] is None
    assert int8["reason"] == f"cuda offers precisions fp32, fp16: {GPU_INT8_REASON}"
    assert table_row(readme, "cuda")[3] == "not offered"


@pytest.mark.slow
def test_detected_cuda_without_a_gpu_is_unavailable_not_failed(matrix_run):
    detected = get_target("cuda")
    if detected.unavailable is None:
        pytest.skip("this machine has a GPU: the detected cuda target is available")
    result, _, matrix, readme = matrix_run
    fp32 = cell(matrix, "cuda", "fp32")
    assert fp32["status"] == "unavailable" and fp32["reason"] == detected.unavailable
    assert cell(matrix, "cuda", "fp16")["status"] == "unavailable"
    # GPU targets do not offer int8: that cell says so rather than that the GPU is missing.
    assert cell(matrix, "cuda", "int8")["status"] == "not offered"
    # Unavailable is not a failure: the run exited 0 (the fixture checks it).
    assert matrix["counts"]["failed"] == 0 and matrix["counts"]["unavailable"] == 2
    row = table_row(readme, "cuda")
    assert row[1].startswith("unavailable: target 'cuda' means this machine's GPU") and row[2].startswith("unavailable")
    assert row[3] == "not offered"


@pytest.mark.slow
def test_readme_table_and_provenance(matrix_run):
    _, _, matrix, readme = matrix_run
    assert "| target | fp32 | fp16 | int8 |" in readme
    for target in ("x86", "arm-a53"):
        row = table_row(readme, target)
        for column, precision in ((1, "fp32"), (3, "int8")):
            entry = cell(matrix, target, precision)
            assert row[column].startswith(f"ok {entry['artifact_bytes'] / 1e6:.1f} MB, "), row
    origin = matrix["provenance"]
    assert origin["date"] and origin["commit"] and origin["host"]["machine"]
    assert origin["tools"]["apache-tvm"] in readme
    assert matrix["model"]["variant"] == "micro" and matrix["model"]["input_size"] == 64
    assert matrix["offered"] == matrix["counts"]["compiled"] + matrix["counts"]["failed"]


@pytest.mark.slow
def test_a_failing_cell_is_recorded_the_rest_go_on_and_the_exit_code_is_1(matrix_run, monkeypatch, tmp_path):
    _, workdir, _, _ = matrix_run
    real_compile = backend.compile_onnx

    def compile_failing_on_a72(onnx_path, target, *args, **kwargs):
        if target.name == "arm-a72":
            raise RuntimeError("LLVM ERROR: cannot select\nsecond line of the error")
        return real_compile(onnx_path, target, *args, **kwargs)

    monkeypatch.setattr(backend, "compile_onnx", compile_failing_on_a72)
    app = typer.Typer()
    register(app)
    app.command(name="unused")(lambda: None)  # typer runs a lone command without its name
    # arm-a72 first, so the cell after the failure still runs; x86 fp32 is the fixture's, cached.
    result = CliRunner().invoke(app, [
        "compile-matrix", *MODEL_ARGS, "--targets", "arm-a72,x86", "--precisions", "fp32",
        "--artifacts", str(workdir / "artifacts"), "--output", str(tmp_path / "out"),
    ])
    assert result.exit_code == 1, result.output
    matrix = json.loads((tmp_path / "out" / "matrix.json").read_text())
    failed = cell(matrix, "arm-a72", "fp32")
    assert failed["status"] == "failed"
    assert failed["reason"] == "RuntimeError: LLVM ERROR: cannot select"
    assert cell(matrix, "x86", "fp32")["status"] == "compiled"
    assert matrix["counts"]["failed"] == 1
    readme = (tmp_path / "out" / "README.md").read_text()
    assert table_row(readme, "arm-a72")[1] == "failed: RuntimeError: LLVM ERROR: cannot select"


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, one line on stderr, no traceback, nothing written."""
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("args, fragments", [
    (["--targets", "x86,arm-a99"], ["unknown target 'arm-a99'", "known targets: x86"]),
    (["--precisions", "fp32,fp64"], ["fp64", "fp32, fp16, int8"]),
    (["--targets", "x86", "--data", "sample-photos"],
     [f"sample-photos has {len(SAMPLE_PHOTOS)} photos", "--data fashion-mnist"]),
    (["--targets", "x86", "--data", "no/such/folder"], ["'no/such/folder' does not exist"]),
])
def test_bad_arguments_are_one_line_errors_before_any_work(tmp_path, args, fragments):
    result = run_matrix_cli(*MODEL_ARGS, *args, "--output", "out", cwd=tmp_path)
    assert_user_error(result, *fragments)
    assert not (tmp_path / "out").exists() and not (tmp_path / "artifacts").exists()


# --- a matrix replaces the committed one only when it compiles the same thing -----------------

COMMITTED = REPO / "reports" / "compile-matrix"


def invoke_without_compiling(monkeypatch, *args: str):
    """`pipeline compile-matrix ARGS` with every planned cell 'compiled' at once: what is
    written where, not the builds, is under test."""
    from pipeline.cli import compile_matrix

    def run_matrix(config, plan):
        return [compile_matrix.Cell(target.name, precision, compile_matrix.COMPILED, target_json=target.target_json(),
                                    compile_s=1.0, library_bytes=1000, kernels=3) for target, precision in plan]

    monkeypatch.setattr(compile_matrix, "run_matrix", run_matrix)
    app = typer.Typer()
    register(app)
    app.command(name="unused")(lambda: None)  # typer runs a lone command without its name
    return CliRunner().invoke(app, ["compile-matrix", *args])


def test_a_narrowed_matrix_goes_beside_the_nightly_one(monkeypatch, tmp_path):
    output = tmp_path / "compile-matrix"
    shutil.copytree(COMMITTED, output)
    result = invoke_without_compiling(monkeypatch, "--variant", "tiny", "--input-size", "224",
                                      "--targets", "x86,arm-a53,arm-a72", "--precisions", "fp32", "--output", str(output))
    assert result.exit_code == 0, result.output
    for name in ("matrix.json", "README.md"):
        assert (output / name).read_bytes() == (COMMITTED / name).read_bytes(), name
    beside = output / "targets-x86,arm-a53,arm-a72_precisions-fp32"
    matrix = json.loads((beside / "matrix.json").read_text())
    assert [cell["target"] for cell in matrix["cells"]] == ["x86", "arm-a53", "arm-a72"]
    assert (f"{output}/ holds a measurement of other settings (targets all there, x86,arm-a53,arm-a72 here; "
            f"precisions all there, fp32 here)") in result.stderr
    assert "pass --replace-report to replace it instead" in result.stderr


def test_the_same_matrix_or_replace_report_replaces_it(monkeypatch, tmp_path):
    output = tmp_path / "matrix"
    narrow = ("--variant", "micro", "--input-size", "32", "--targets", "x86", "--precisions", "fp32", "--output", str(output))
    assert invoke_without_compiling(monkeypatch, *narrow).exit_code == 0
    (output / "matrix.json").write_text((output / "matrix.json").read_text().replace('"seconds"', '"old_seconds"'))
    assert invoke_without_compiling(monkeypatch, *narrow).exit_code == 0
    assert "seconds" in json.loads((output / "matrix.json").read_text())
    assert [p for p in output.iterdir() if p.is_dir()] == []
    wider = [arg if arg != "x86" else "x86,arm-a53" for arg in narrow]
    assert invoke_without_compiling(monkeypatch, *wider, "--replace-report").exit_code == 0
    assert [c["target"] for c in json.loads((output / "matrix.json").read_text())["cells"]] == ["x86", "arm-a53"]
    assert [p for p in output.iterdir() if p.is_dir()] == []


def test_the_nightly_settings_match_the_committed_matrix():
    """The committed matrix.json predates its "settings": read from its model and command line,
    it is what `make compile-matrix` compiles, so the nightly still replaces it."""
    from pipeline.cli.compile_matrix import MODEL_DEFAULTS, matrix_settings, recorded_settings
    from pipeline.config import PipelineConfig
    from reports.committed import differences

    committed = recorded_settings(json.loads((COMMITTED / "matrix.json").read_text()))
    nightly = PipelineConfig(**MODEL_DEFAULTS, input_size=224)
    assert differences(committed, matrix_settings(nightly, "", "all")) == {}
    assert differences(committed, matrix_settings(nightly, "x86", "all")) == {"targets": ("all", "x86")}
