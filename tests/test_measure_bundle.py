"""Tuning with no network path to the board (pipeline/compiler/tuning/measure_bundle.py), for
real on this CPU: `pipeline tune --target x86 --measure-bundle` writes a round, its measure.py
(pipeline/runtime/measure_runner.py) times it here with the project not importable, the
results go in as records and compile applies them; bad results files are refused."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_cli

pytestmark = pytest.mark.slow

MODEL = ["--variant", "micro", "--input-size", "32", "--num-classes", "10"]
# One task, one round: its default schedule and two searched candidates.
ROUND = ["--max-tasks", "1", "--trials-per-task", "2", "--round-trials", "2"]
DB = Path("artifacts/tune/x86/micro-32-b1-c10-in3-fp32")


def board_python() -> tuple[list[str], dict[str, str]]:
    """Python as on a board, where the project is not installed: without site processing (the
    venv's editable install of the project is a .pth file), only site-packages on the path
    (NumPy and TVM, run in runtime-only mode by measure.py), in another folder."""
    import numpy

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(Path(numpy.__file__).parents[1])
    return [sys.executable, "-S"], env


def run_measure(bundle: Path, out: Path, cwd: Path) -> subprocess.CompletedProcess:
    python, env = board_python()
    return subprocess.run([*python, str(bundle / "measure.py"), "--out", str(out)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def snapshot(db_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(db_dir.iterdir()) if p.is_file()}


def rewrite(results: dict, **changes) -> dict:
    """A results file as measure.py would have written it with these changes (digest redone)."""
    from pipeline.runtime.measure_runner import results_digest

    body = {k: v for k, v in results.items() if k != "digest"} | changes
    return {**body, "digest": results_digest(body)}


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> Path:
    """A working directory with round 1's bundle (workdir/bundle) measured into results.json."""
    workdir = tmp_path_factory.mktemp("measure-bundle")
    result = run_cli("tune", *MODEL, *ROUND, "--measure-bundle", str(workdir / "bundle"), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "building on" in result.stderr.splitlines()[0] and "measure.py (no network path)" in result.stderr.splitlines()[0]
    board = tmp_path_factory.mktemp("board")
    ran = run_measure(workdir / "bundle", board / "results.json", cwd=board)
    assert ran.returncode == 0, ran.stderr[-3000:]
    shutil.copyfile(board / "results.json", workdir / "results.json")
    return workdir


def test_the_bundle_holds_each_tasks_default_and_search_candidates_with_their_hashes(measured):
    bundle = measured / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["target"] == "x86" and manifest["device"] == "cpu" and manifest["round"] == 1
    assert manifest["database"]["model_key"] == DB.name
    kinds = [c["kind"] for c in manifest["candidates"]]
    assert kinds.count("default") == 1 and kinds.count("search") == 2
    for candidate in manifest["candidates"]:
        assert hashlib.sha256((bundle / candidate["file"]).read_bytes()).hexdigest() == candidate["sha256"]
        assert candidate["args_info"] and candidate["args_info"][0][0] == "TENSOR"
    round_file = json.loads((measured / DB / "measure_round.json").read_text())
    assert round_file["pending"]["bundle_id"] == manifest["bundle_id"]


def test_measure_py_times_every_candidate_without_the_project(measured, tmp_path):
    python, env = board_python()
    assert subprocess.run([*python, "-c", "import pipeline"], cwd=tmp_path, env=env,
                          capture_output=True).returncode != 0  # as on the board
    results = json.loads((measured / "results.json").read_text())
    manifest = json.loads((measured / "bundle" / "manifest.json").read_text())
    assert results["complete"] and results["bundle_id"] == manifest["bundle_id"]
    assert [r["id"] for r in results["results"]] == [c["id"] for c in manifest["candidates"]]
    assert all(len(r["run_secs"]) == manifest["evaluator"]["repeat"] and min(r["run_secs"]) > 0
               for r in results["results"])


@pytest.mark.parametrize("case, message", [
    ("another target", "holds timings for target 'arm-a72', not 'x86'"),
    ("another cpu", "holds timings made on znver4-or-other"),
    ("another bundle", "holds timings of bundle x86-r1-000000000000, but the round in flight"),
    ("corrupted", "is corrupted (its digest does not match"),
    ("not json", "is corrupted (not JSON"),
])
def test_a_results_file_that_does_not_belong_is_refused_in_one_line_and_the_database_is_untouched(
        measured, tmp_path, case, message):
    results = json.loads((measured / "results.json").read_text())
    path = tmp_path / "results.json"
    if case == "another target":
        from targets import get_target

        arm = get_target("arm-a72")
        path.write_text(json.dumps(rewrite(results, target=arm.name, target_json=arm.tvm_target)))
    elif case == "another cpu":
        path.write_text(json.dumps(rewrite(results, cpu_tag="znver4-or-other")))
    elif case == "another bundle":
        path.write_text(json.dumps(rewrite(results, bundle_id="x86-r1-000000000000")))
    elif case == "corrupted":
        results["results"][0]["run_secs"][0] /= 10  # a timing edited by hand
        path.write_text(json.dumps(results))
    else:
        path.write_text((measured / "results.json").read_text()[:200])  # cut short
    before = snapshot(measured / DB)
    result = run_cli("tune", *MODEL, *ROUND, "--measure-results", str(path), cwd=measured)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert snapshot(measured / DB) == before


@pytest.fixture(scope="module")
def ingested(measured) -> tuple[Path, subprocess.CompletedProcess]:
    result = run_cli("tune", *MODEL, *ROUND, "--measure-results", "results.json", cwd=measured)
    assert result.returncode == 0, result.stderr[-3000:]
    return measured, result


def test_the_timings_become_records_that_compile_applies(ingested):
    workdir, result = ingested
    records = [line for line in (workdir / DB / "database_tuning_record.json").read_text().splitlines() if line.strip()]
    assert len(records) == 3  # the default and the two searched candidates
    state = json.loads((workdir / DB / "tune_state.json").read_text())["tasks"]
    task = next(t for t in state.values() if t["trials"] > 0)
    assert task["trials"] == 2 and task["default_s"] > 0 and task["status"] == "done"
    assert "finished:" in result.stdout  # its trials are spent: no next round
    assert json.loads((workdir / DB / "measure_round.json").read_text())["pending"] is None

    compiled = run_cli("compile", *MODEL, cwd=workdir)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert "kernels from tuning records" in compiled.stderr
    library = Path(next(line.split(": ", 1)[1] for line in compiled.stdout.splitlines() if line.startswith("library:")))
    tuning = json.loads((library.parent / "manifest.json").read_text())["info"]["tuning"]
    assert tuning["database"] == str((workdir / DB).resolve()) and tuning["tasks_from_records"] >= 1


def test_the_same_results_twice_are_refused(ingested):
    workdir, _ = ingested
    before = snapshot(workdir / DB)
    result = run_cli("tune", *MODEL, *ROUND, "--measure-results", "results.json", cwd=workdir)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "its timings are in the database already" in result.stderr
    assert snapshot(workdir / DB) == before


def _fake_bundle(directory: Path, **manifest) -> Path:
    """A bundle folder with measure.py and no candidates: what its checks see before timing."""
    directory.mkdir()
    shutil.copyfile(REPO / "pipeline/runtime/measure_runner.py", directory / "measure.py")
    shutil.copyfile(REPO / "pipeline/runtime/runtime_only.py", directory / "runtime_only.py")
    (directory / "manifest.json").write_text(json.dumps({
        "format": 1, "bundle_id": "fake", "round": 1, "target": "jetson-orin", "target_json": {}, "cpu_tag": "sm_87",
        "device": "cuda", "gpu_arch": "sm_87", "machine": os.uname().machine, "database": {},
        "evaluator": {"number": 1, "repeat": 1, "min_repeat_ms": 0}, "candidates": [], **manifest,
    }))
    return directory


@pytest.mark.parametrize("manifest, message", [
    # No GPU here, or one of another architecture: either way not this bundle's sm_10.
    ({"device": "cuda", "gpu_arch": "sm_10"}, "sm_10"),
    ({"device": "cpu", "machine": "riscv64"}, "built for riscv64"),
])
def test_measure_py_refuses_a_machine_without_the_bundles_device_in_one_line(tmp_path, manifest, message):
    bundle = _fake_bundle(tmp_path / "bundle", **manifest)
    ran = run_measure(bundle, tmp_path / "results.json", cwd=tmp_path)
    assert ran.returncode == 2
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], ran.stderr
    assert not (tmp_path / "results.json").exists()


def test_measure_py_refuses_a_damaged_candidate(measured, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(measured / "bundle", bundle)
    candidate = next((bundle / "candidates").iterdir())
    candidate.write_bytes(candidate.read_bytes()[:-10])
    ran = run_measure(bundle, tmp_path / "results.json", cwd=tmp_path)
    assert ran.returncode == 2
    assert len(ran.stderr.strip().splitlines()) == 1 and "does not match" in ran.stderr
