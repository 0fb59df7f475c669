"""pipeline tune / tune-db and compile's use of tuning records, on the micro model at 32x32.

One tuning run through an RPC tracker and server started here on loopback (this machine
acting as the device) is shared by the tests; each tunes at most two tasks with one or two
trials, since every MetaSchedule round costs tens of seconds on a small machine.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rpc_loopback import loopback_tracker
from conftest import REPO, run_cli
from pipeline.compiler.schedules.cpu import DEFAULT_SCHEDULE_VERSION
from pipeline.errors import PipelineError

pytestmark = pytest.mark.slow

KEY = "tune-loopback"
MODEL = ["--variant", "micro", "--input-size", "32", "--num-classes", "10"]
DB = Path("artifacts/tune/x86/micro-32-b1-c10-in3-fp32")


def run_tune(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`pipeline tune ...` / `pipeline tune-db ...` in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    """host:port of a loopback tracker with one device registered under KEY."""
    with loopback_tracker(tmp_path_factory.mktemp("tune-rpc"), KEY) as address:
        yield address


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tracker) -> Path:
    """A working directory whose database has the top task tuned (2 trials, measured over RPC)."""
    workdir = tmp_path_factory.mktemp("tuned")
    result = run_tune("tune", *MODEL, "--max-tasks", "1", "--trials-per-task", "2",
                      "--rpc-tracker", tracker, "--rpc-key", KEY, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    (workdir / "tune.log").write_text(result.stderr)
    return workdir


def _records(db_dir: Path) -> list[str]:
    return [line for line in (db_dir / "database_tuning_record.json").read_text().splitlines() if line.strip()]


def test_tune_over_rpc_writes_records_with_their_target(tuned):
    from targets import get_target

    db_dir = tuned / DB
    assert len(_records(db_dir)) >= 1
    meta = json.loads((db_dir / "meta.json").read_text())
    assert meta["target_json"] == get_target("x86").tvm_target
    assert meta["tvm_version"]
    state = json.loads((db_dir / "tune_state.json").read_text())["tasks"]
    tuned_tasks = [name for name, task in state.items() if task["trials"] > 0]
    assert len(tuned_tasks) == 1 and state[tuned_tasks[0]]["status"] == "done"
    # Its default schedule was measured too, as a record of its own (2 trials + 1 default,
    # and the shipped micro model's record of the same kernel it was seeded with, if any).
    assert state[tuned_tasks[0]]["default_s"] > 0
    assert 3 <= len(_records(db_dir)) <= 4
    # The most FLOPs x occurrences first, with a progress line per round.
    assert max(state.values(), key=lambda t: (t["flops"] + 1) * t["weight"])["name"] == state[tuned_tasks[0]]["name"]
    # Keyed by name and workload hash: kernel names move when the graph changes.
    assert tuned_tasks[0].startswith(state[tuned_tasks[0]]["name"] + "#")
    progress = (tuned / "tune.log").read_text()
    assert "task 1 of 1" in progress and "2/2 trials" in progress
    # A tuning curve for the reports: trials so far against the estimated model latency.
    from pipeline.compiler.records import read_curve

    curve = read_curve(db_dir)
    assert curve and curve[-1]["trials"] == 2 and curve[-1]["best_ms"] > 0


def test_compile_applies_records_and_a_default_to_every_other_task(tuned):
    import onnxruntime as ort

    from pipeline.runtime.runners import load_artifact

    result = run_cli("compile", *MODEL, cwd=tuned)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kernels from tuning records" in result.stderr
    library = Path(next(line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("library:")))
    manifest = json.loads((library.parent / "manifest.json").read_text())
    tuning = manifest["info"]["tuning"]
    assert tuning["database"] == str((tuned / DB).resolve())
    assert tuning["tasks_from_records"] >= 1
    # No task is left without a decision: a record, or a default (pipeline/compiler/schedules/cpu.py).
    assert tuning["tasks_from_records"] + tuning["tasks_default"] == tuning["tasks_total"]
    default_kinds = ("default_tiled", "default_vnni", "default_depthwise", "default_gemv", "default_reduction",
                     "default_elementwise", "default_as_lowered")
    assert sum(tuning[kind] for kind in default_kinds) == tuning["tasks_default"]
    assert tuning["default_tiled"] >= 1
    # Each kernel's origin by name: a record, or the kind of default it got.
    origins = list(tuning["kernel_schedules"].values())
    assert len(origins) == tuning["tasks_total"]
    assert origins.count("record") == tuning["tasks_from_records"]
    assert all(origins.count(kind.removeprefix("default_")) == tuning[kind] for kind in default_kinds)
    assert manifest["settings"]["tuning_database_sha256"]

    onnx_path = Path(manifest["input_files"]["onnx_simplified"])
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(load_artifact(library).infer(x), expected, rtol=1e-4, atol=1e-4)


def test_no_tuning_records_compiles_with_the_defaults_only(tuned):
    result = run_cli("compile", *MODEL, "--no-tuning-records", cwd=tuned)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "0 of" in result.stderr and "tuning records off" in result.stderr
    library = Path(next(line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("library:")))
    manifest = json.loads((library.parent / "manifest.json").read_text())
    tuning = manifest["info"]["tuning"]
    assert tuning["database"] is None and tuning["tasks_from_records"] == 0
    assert "record" not in tuning["kernel_schedules"].values()
    assert manifest["settings"]["tuning_database_sha256"] is None


def test_a_second_run_needs_resume_and_resume_skips_finished_tasks(tuned):
    result = run_tune("tune", *MODEL, "--max-tasks", "1", "--trials-per-task", "2", cwd=tuned)
    assert result.returncode == 2 and "--resume" in result.stderr

    before = len(_records(tuned / DB))
    result = run_tune("tune", *MODEL, "--max-tasks", "2", "--trials-per-task", "2", "--trials", "1", "--resume",
                      cwd=tuned)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tuning 1 (1 already done)" in result.stderr
    state = json.loads((tuned / DB / "tune_state.json").read_text())["tasks"]
    assert sorted(task["trials"] for task in state.values() if task["trials"]) == [1, 2]
    # The new task's default and its one trial (and a seed record of the same kernel from the
    # shipped micro model's records, if it has one).
    assert before + 2 <= len(_records(tuned / DB)) <= before + 3

    # A task that used its trials continues when a later run allows more per task.
    result = run_tune("tune", *MODEL, "--max-tasks", "1", "--trials-per-task", "3", "--trials", "1", "--resume",
                      cwd=tuned)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tuning 1 (0 already done)" in result.stderr
    state = json.loads((tuned / DB / "tune_state.json").read_text())["tasks"]
    assert sorted(task["trials"] for task in state.values() if task["trials"]) == [1, 3]


def test_records_tvm_cannot_load_back_are_skipped_or_removed(tuned, tmp_path):
    """TVM 0.27 writes records its own reader rejects (a trace that does not replay), and one
    such record made the whole database unreadable."""
    from pipeline.compiler.records import open_database

    copy = tmp_path / "db"
    shutil.copytree(tuned / DB, copy)
    records = _records(copy)
    broken = records[0].replace('"GetSBlock",[],["', '"GetSBlock",[],["no_such_block_', 1)
    broken = broken.replace('"GetSBlock", [], ["', '"GetSBlock", [], ["no_such_block_', 1)
    assert broken != records[0]
    (copy / "database_tuning_record.json").write_text("\n".join([*records, broken]) + "\n")

    assert len(open_database(copy, None, strict=True)) == len(records)  # compile, merge: skipped
    assert len(_records(copy)) == len(records) + 1  # ... and the files left as they were
    assert len(open_database(copy, None, strict=True, repair=True)) == len(records)  # tune: removed
    assert _records(copy) == records


def test_compile_and_resume_keep_every_good_record_beside_a_garbage_line(tuned, tmp_path, capsys):
    """Issue 26: compile dropped all records for one bad line, and --resume refused the
    database and said to delete it."""
    from pipeline.compiler.backend import compile_onnx
    from pipeline.compiler.tuning import measuring, tuner
    from targets import get_target

    target = get_target("x86")
    copy = shutil.copytree(tuned / DB, tmp_path / "db")
    records = _records(copy)
    (copy / "database_tuning_record.json").write_text("\n".join([records[0], "}garbage{", *records[1:]]) + "\n")
    onnx_path = next((tuned / "artifacts" / "simplify").glob("*/model.sim.onnx"))
    info = compile_onnx(onnx_path, target, tmp_path / "lib" / "model.so", input_shape=(1, 3, 32, 32),
                        tuning_database=copy)
    assert info["tuning"]["database"] == str(copy) and info["tuning"]["tasks_from_records"] >= 1
    err = capsys.readouterr().err
    assert f"{copy / 'database_tuning_record.json'}: line 2 not a record" in err
    assert "ignoring tuning records" not in err

    # A resumed run (its tasks done already: nothing to time) keeps them all.
    state = json.loads((copy / "tune_state.json").read_text())["tasks"]
    done = max(task["trials"] for task in state.values())
    tuner.tune(onnx_path, target, copy, DB.name, measuring.TuneSettings(trials_per_task=done, max_tasks=1, resume=True),
               input_shape=(1, 3, 32, 32), say=lambda line: None)
    assert _records(copy) == records
    assert "line 2 not a record" in capsys.readouterr().err


def test_merge_dedupes_and_refuses_other_targets(tuned, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tuned / DB, copy)
    result = run_tune("tune-db", "merge", str(tuned / DB), str(copy), "-o", str(tmp_path / "merged"), cwd=tuned)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["records_out"] == len(_records(copy)) == summary["records_in"] // 2
    assert len(_records(tmp_path / "merged")) == len(_records(copy))
    assert json.loads((tmp_path / "merged" / "meta.json").read_text())["target"] == "x86"

    meta = json.loads((copy / "meta.json").read_text())
    meta["target_json"] = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}
    (copy / "meta.json").write_text(json.dumps(meta))
    result = run_tune("tune-db", "merge", str(tuned / DB), str(copy), "-o", str(tmp_path / "mixed"), cwd=tuned)
    assert result.returncode == 2 and "different targets" in result.stderr
    assert not (tmp_path / "mixed").exists()


def test_ship_copies_the_best_record_of_each_kernel_under_its_cpu(tuned, tmp_path):
    from pipeline.compiler.tuning import database

    meta = json.loads((tuned / DB / "meta.json").read_text())
    result = run_tune("tune-db", "ship", str(tuned / DB), "-o", str(tmp_path / "shipped"), cwd=tuned)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    shipped = tmp_path / "shipped"
    workloads = len(database.merged_workloads(tuned / DB))
    assert summary["records_in"] == len(_records(tuned / DB)) > summary["records_out"] == len(_records(shipped)) == workloads
    for name in ("meta.json", "tune_state.json", "tune_curve.jsonl"):
        assert (shipped / name).read_bytes() == (tuned / DB / name).read_bytes()
    # Without -o it goes to tuning/<target>/<model-key>/<cpu>/.
    assert database.shipped_database_dir("x86", meta["model_key"], meta["target_json"]).parts[-3:] == (
        "x86", meta["model_key"], database.cpu_tag(meta["target_json"]))

    result = run_tune("tune-db", "ship", str(tmp_path / "nothing"), cwd=tuned)
    assert result.returncode == 2 and "not a directory" in result.stderr


def test_ship_writes_into_the_checkout_the_user_stands_in_and_compile_looks_there(tuned, tmp_path, monkeypatch):
    """Not into the checkout the code was installed from (issue 26)."""
    from pipeline.compiler.tuning import database

    checkout = tmp_path / "checkout"
    (checkout / "sub").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text('[project]\nname = "convnext-edge"\n')
    meta = json.loads((tuned / DB / "meta.json").read_text())
    expected = checkout.resolve() / "tuning" / "x86" / DB.name / database.cpu_tag(meta["target_json"])
    installed = REPO / "tuning" / "x86" / DB.name
    assert not installed.exists()
    result = run_tune("tune-db", "ship", str(tuned / DB), cwd=checkout / "sub")
    assert result.returncode == 0, result.stderr[-3000:]
    assert Path(json.loads(result.stdout)["output"]) == expected and len(_records(expected)) >= 1
    assert not installed.exists()
    monkeypatch.chdir(checkout / "sub")
    assert database.shipped_databases("x86", DB.name) == [expected]

    # Outside any checkout there is no tuning/ to write to.
    result = run_tune("tune-db", "ship", str(tuned / DB), cwd=tmp_path)
    assert result.returncode == 2 and "not inside a convnext-edge checkout" in result.stderr
    assert "-o DIR" in result.stderr and "Traceback" not in result.stderr


def test_remeasure_times_each_record_against_todays_default_and_rewrites_the_database(tuned, tmp_path):
    from pipeline.compiler.tuning import database

    copy = tmp_path / DB  # where compile, run in tmp_path, looks for the model's records
    shutil.copytree(tuned / DB, copy)
    kernels = len(database.merged_workloads(copy))
    # Records timed against older defaults are not applied until re-measured (they can be
    # slower than today's defaults); compile says so in one line, with the command.
    meta = json.loads((copy / "meta.json").read_text())
    assert meta["default_schedule_version"] == DEFAULT_SCHEDULE_VERSION  # tune wrote today's
    (copy / "meta.json").write_text(json.dumps({**meta, "default_schedule_version": 1}))
    result = run_cli("compile", *MODEL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (said,) = [line for line in result.stderr.splitlines() if "older default schedules" in line]
    assert f"not applying the tuning records in {copy}" in said and "(version 1;" in said
    assert f"`pipeline tune-db remeasure {copy}`" in said
    assert f"kernels from tuning records ({copy})" not in result.stderr
    result = run_tune("tune-db", "remeasure", str(copy), cwd=tuned)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| kernel | record ms | default ms |" in result.stdout
    assert f"of {kernels} kernels keep their records" in result.stdout
    assert "[remeasure] 1/" in result.stderr  # progress, one line per kernel
    meta = json.loads((copy / "meta.json").read_text())
    remeasured = meta["remeasured"]
    assert remeasured["cpu"] == database.cpu_tag(meta["target_json"])
    assert remeasured["kernels_kept"] + len(remeasured["kernels_dropped"]) == kernels
    assert len(database.merged_workloads(copy)) == remeasured["kernels_kept"]
    assert (copy / "tune_state.json").read_bytes() == (tuned / DB / "tune_state.json").read_bytes()
    result = run_cli("compile", *MODEL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f" {remeasured['kernels_kept']} of " in result.stderr and "kernels from tuning records" in result.stderr
    assert "older default schedules" not in result.stderr and meta["default_schedule_version"] == DEFAULT_SCHEDULE_VERSION

    # Timings mean something only on the CPU the records name: another one's are refused.
    other = next(cpu for cpu in ("znver4", "znver5", "rocketlake") if cpu != meta["target_json"]["mcpu"])
    meta["target_json"] = {**meta["target_json"], "mcpu": other}
    (copy / "meta.json").write_text(json.dumps(meta))
    before = sorted((p.name, p.read_bytes()) for p in copy.iterdir())
    result = run_tune("tune-db", "remeasure", str(copy), cwd=tuned)
    assert result.returncode == 2 and f"re-measure them on a {other} machine" in result.stderr
    assert sorted((p.name, p.read_bytes()) for p in copy.iterdir()) == before
    result = run_tune("tune-db", "remeasure", str(tuned / DB), "--margin", "1.5", cwd=tuned)
    assert result.returncode == 2 and "--margin" in result.stderr


@pytest.mark.parametrize("record_ms,default_ms,kept", [
    (2.0, 1.0, False),   # the default is faster: the record goes
    (1.0, 0.99, True),   # within the margin: a tie, kept (ties alone were faster in the model)
    (1.0, 1.5, True),    # the record is faster
    (None, 1.0, False),  # the record no longer builds or runs
])
def test_remeasure_drops_a_record_only_where_the_default_beats_it(tuned, tmp_path, monkeypatch, record_ms, default_ms, kept):
    from pipeline.compiler.tuning import database, remeasure, tuner

    def fake_timings(builder, runner, tvm_target, name, schedules, say):
        seconds = {"record": record_ms}
        return [None if seconds.get(what, default_ms) is None else [seconds.get(what, default_ms) / 1e3]
                for _, what in schedules]

    monkeypatch.setattr(tuner, "time_schedules", fake_timings)
    copy = tmp_path / "db"
    shutil.copytree(tuned / DB, copy)
    kernels = len(database.merged_workloads(copy))
    result = remeasure.remeasure_database(copy, say=lambda line: None)
    assert result["kept"] == (kernels if kept else 0)
    assert len(_records(copy)) == (len(_records(tuned / DB)) if kept else 0)
    assert all(row["decision"].startswith("kept" if kept else "dropped") for row in result["rows"])


def test_corrupt_or_foreign_databases_warn_and_build_with_defaults(tuned, tmp_path, capsys, monkeypatch):
    from pipeline.compiler.tuning import database
    from pipeline.compiler.backend import compile_onnx
    from targets import get_target

    target = get_target("x86")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tuned / DB, corrupt)
    (corrupt / "database_tuning_record.json").write_text('[0, [["GetSBlock", not json\n')
    onnx_path = next((tuned / "artifacts" / "simplify").glob("*/model.sim.onnx"))
    info = compile_onnx(onnx_path, target, tmp_path / "lib" / "model.so", input_shape=(1, 3, 32, 32),
                        tuning_database=corrupt)
    assert "ignoring tuning records" in capsys.readouterr().err
    assert info["tuning"]["database"] is None
    assert info["tuning"]["tasks_default"] == info["tuning"]["tasks_total"]

    # Merging it is an error that names the database, not a crash.
    result = run_tune("tune-db", "merge", str(corrupt), str(tuned / DB), "-o", str(tmp_path / "m"), cwd=tuned)
    assert result.returncode == 2 and "corrupt" in result.stderr

    # Records from another TVM version (or target) are skipped by the lookup, with a warning
    # (and with no shipped records of other models to fall back to).
    monkeypatch.setattr(database, "SHIPPED_ROOT", tmp_path / "nothing-shipped")
    foreign = tmp_path / "artifacts" / "tune" / "x86" / "micro-32-b1-c10-in3-fp32"
    shutil.copytree(tuned / DB, foreign)
    meta = json.loads((foreign / "meta.json").read_text())
    meta["tvm_version"] = "0.19.0"
    (foreign / "meta.json").write_text(json.dumps(meta))
    assert database.find_database(tmp_path / "artifacts", target, "micro-32-b1-c10-in3-fp32") is None
    assert "tuned with TVM 0.19.0" in capsys.readouterr().err


def test_a_garbage_line_costs_that_line_only_and_is_named(tmp_path, capsys):
    """Issue 26: one line that was not a record made compile drop every record. The demo
    model's shipped records, opened as compile and merge do (target None: any CPU)."""
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler.records import open_database

    copy = shutil.copytree(REPO / "tuning" / "x86" / "micro-32-b1-c10-in1-fp32" / "znver4", tmp_path / "db")
    workloads_file, records_file = copy / "database_workload.json", copy / "database_tuning_record.json"
    workloads, records = workloads_file.read_text().splitlines(), _records(copy)
    # A garbage line, and a last line cut short (a run killed while writing).
    records_file.write_text("\n".join([records[0], "not a record", *records[1:], records[-1][:40]]))
    assert len(open_database(copy, None, strict=True)) == len(records)
    err = capsys.readouterr().err
    assert f"{records_file}: lines 2, {len(records) + 2} not a record" in err
    assert f"skipped, {len(records)} of {len(records) + 2} records kept" in err
    # A workload line overwritten costs its records; the records after it are renumbered.
    lost = sum(json.loads(line)[0] == 3 for line in records)
    workloads_file.write_text("\n".join([*workloads[:3], '["1234", "cut sho', *workloads[4:]]) + "\n")
    assert len(open_database(copy, None, strict=True)) == len(records) - lost
    assert f"{workloads_file}: line 4 not a workload TVM can read; skipped" in capsys.readouterr().err

    # The database being tuned (a resumed run) loses those lines from its files, nothing else.
    assert len(open_database(copy, None, strict=True, repair=True)) == len(records) - lost
    assert "removed" in capsys.readouterr().err
    reread = ms.database.JSONDatabase(str(workloads_file), str(records_file), allow_missing=False)
    assert len(reread) == len(records) - lost
    assert len(_records(copy)) == len(records) - lost


def test_a_database_with_a_broken_meta_json_is_skipped_with_a_warning_that_says_what_to_do(
        tmp_path, monkeypatch, capsys):
    """Issue 26: compile skipped another model's database with a corrupt meta.json silently,
    and one whose target_json was not an object raised a traceback."""
    from pipeline.compiler.tuning import database
    from targets import get_target

    monkeypatch.setattr(database, "SHIPPED_ROOT", tmp_path / "nothing-shipped")
    target = get_target("x86")
    shipped = REPO / "tuning" / "x86" / "micro-32-b1-c10-in1-fp32" / "znver4"
    tune_root = tmp_path / "artifacts" / "tune" / "x86"
    other = shutil.copytree(shipped, tune_root / "micro-32-b1-c11-in1-fp32")
    (other / "meta.json").write_text('{"format": 1, "targ')
    assert database.find_database(tmp_path / "artifacts", target, "micro-32-b1-c10-in1-fp32") is None
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "meta.json" in line]
    assert line.startswith(f"warning: ignoring tuning records: {other / 'meta.json'} is unreadable")
    assert f"restore it (`git checkout {other / 'meta.json'}` for shipped records) or delete {other}" in line

    own = shutil.copytree(shipped, tune_root / "micro-32-b1-c10-in1-fp32")
    (own / "meta.json").write_text(json.dumps({"target_json": "x86", "tvm_version": "0.27.0.post1"}))
    assert database.find_database(tmp_path / "artifacts", target, "micro-32-b1-c10-in1-fp32") is None
    assert f"{own / 'meta.json'} is unreadable" in capsys.readouterr().err


def test_records_of_another_cpu_model_fit_but_not_another_kind_or_triple():
    import dataclasses

    from pipeline.compiler.records import target_fit
    from targets import get_target

    x86 = dataclasses.replace(get_target("x86"), tvm_target={"kind": "llvm", "mcpu": "znver5", "num-cores": 2})
    assert target_fit({"kind": "llvm", "mcpu": "znver5", "num-cores": 2}, x86) == "same"
    assert target_fit({"kind": "llvm", "mcpu": "znver4", "num-cores": 2}, x86) == "similar"
    assert target_fit({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 16}, x86) == "similar"
    assert target_fit({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}, x86) == "foreign"
    gpu = get_target("cuda-sm80")
    other_host = {**gpu.tvm_target, "host": {**gpu.tvm_target["host"], "mcpu": "znver3"}}
    # GPU records time GPU kernels: another host CPU of the same architecture is the same.
    assert target_fit(other_host, gpu) == "same"
    assert target_fit({**gpu.tvm_target, "arch": "sm_75"}, gpu) == "foreign"


def _as_tuned_on(db_dir: Path, copy: Path, mcpu: str) -> Path:
    shutil.copytree(db_dir, copy)
    meta = json.loads((copy / "meta.json").read_text())
    meta["target_json"] = {**meta["target_json"], "mcpu": mcpu}
    (copy / "meta.json").write_text(json.dumps(meta))
    return copy


def test_records_shipped_for_another_cpu_are_not_applied_but_seed_tuning_timed_here(
        tuned, tmp_path, monkeypatch, capsys):
    from pipeline.compiler.tuning import database
    from pipeline.compiler.tuning import measuring, tuner
    from targets import get_target

    target = get_target("x86")
    key = DB.name
    this_cpu = database.cpu_tag(target.tvm_target)
    other_cpu = "znver3" if this_cpu != "znver3" else "skylake-avx512"
    shipped = tmp_path / "tuning"
    monkeypatch.setattr(database, "SHIPPED_ROOT", shipped)
    other = _as_tuned_on(tuned / DB, shipped / "x86" / key / other_cpu, other_cpu)

    # Compile does not apply the other CPU's records (the defaults are chosen for this one),
    # saying so, and uses this CPU's once there are some.
    artifacts_root = tmp_path / "artifacts"
    assert database.find_database(artifacts_root, target, key) is None
    assert f"not applying tuning records made on another CPU ({other_cpu}, this is {this_cpu})" in capsys.readouterr().err
    mine = shutil.copytree(tuned / DB, database.shipped_database_dir("x86", key, target.tvm_target))
    assert database.find_database(artifacts_root, target, key) == mine
    # Tuning too starts from this CPU's records when there are some.
    assert database.seed_database(artifacts_root, target, key, exclude=artifacts_root / "none") == mine
    shutil.rmtree(mine)

    # Tuning starts from them: each task's best record is replayed, timed here and kept.
    fresh = database.local_database_dir(artifacts_root, "x86", key)
    seed = database.seed_database(artifacts_root, target, key, exclude=fresh)
    assert seed == other
    onnx_path = next((tuned / "artifacts" / "simplify").glob("*/model.sim.onnx"))
    summary = tuner.tune(onnx_path, target, fresh, key,
                              measuring.TuneSettings(trials_per_task=0, max_tasks=1),
                              input_shape=(1, 3, 32, 32), seed_dir=seed, say=lambda line: None)
    top = summary["tasks"][0]
    assert top["seed_s"] is not None and top["default_s"] is not None
    assert top["best_s"] == min(top["seed_s"], top["default_s"])
    assert len(_records(fresh)) == 2  # the default schedule and the seed, both timed here
    assert json.loads((fresh / "meta.json").read_text())["target_json"] == target.tvm_target


def test_a_device_target_without_a_tracker_says_how_to_connect_one():
    from pipeline.compiler.tuning import measuring
    from targets import get_target

    with pytest.raises(PipelineError, match="--rpc-tracker HOST:9190 --rpc-key arm-a72"):
        measuring.check_rpc(get_target("arm-a72"), measuring.TuneSettings())


def test_a_tracker_that_does_not_answer_times_out_clearly(tmp_path):
    # Accepts connections and never says a word.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.5)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        result = run_tune("tune", *MODEL, "--rpc-tracker", f"127.0.0.1:{listener.getsockname()[1]}",
                          "--rpc-timeout", "2", cwd=tmp_path, timeout=120)
        assert result.returncode == 2
        assert "did not answer in 2 s" in result.stderr
        assert time.monotonic() - started < 90
        assert not (tmp_path / "artifacts").exists()  # it failed before building anything
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()


def test_default_schedules_cover_every_task_and_keep_results(tmp_path_factory, tmp_path):
    """Without any database every PrimFunc gets a default, and the outputs stay exact."""
    import onnxruntime as ort

    from edge_models import SHAPE, micro_onnx, sample
    from pipeline.compiler.backend import compile_onnx
    from pipeline.runtime.runners import load_artifact
    from targets import get_target

    onnx_path = micro_onnx(tmp_path_factory)
    info = compile_onnx(onnx_path, get_target("x86"), tmp_path / "model.so", input_shape=SHAPE)
    tuning = info["tuning"]
    assert tuning["database"] is None and tuning["tasks_from_records"] == 0
    assert tuning["tasks_default"] == tuning["tasks_total"] == info["num_primfuncs"]
    # The dense contractions (pointwise-conv matmuls, the stem's and downsampling layers'
    # patch GEMMs) are tiled; the channels-last depthwise convolutions get their own.
    assert tuning["default_tiled"] >= 8
    assert tuning["default_depthwise"] >= 1

    x = sample()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(load_artifact(tmp_path / "model.so").infer(x), expected, rtol=1e-4, atol=1e-4)


def test_int8_tuning_makes_records_that_compile_applies_to_the_integer_kernels(tmp_path):
    gray = [*MODEL, "--in-chans", "1"]
    int8 = ["--precision", "int8", "--data", "fashion-mnist", "--preprocessing", "fashion-mnist", "--calib-size", "16"]
    result = run_tune("tune", *gray, "--precision", "int8", cwd=tmp_path)
    assert result.returncode == 2 and "--data" in result.stderr and "Traceback" not in result.stderr

    result = run_tune("tune", *gray, *int8, "--max-tasks", "1", "--trials-per-task", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    db_dir = tmp_path / "artifacts/tune/x86/micro-32-b1-c10-in1-int8"
    state = json.loads((db_dir / "tune_state.json").read_text())["tasks"]
    (top,) = [task for task in state.values() if task["default_s"]]  # --max-tasks 1: measured alone
    # The top task of the integer model: an int8 x int8 -> int32 contraction, tuned; or, on a
    # CPU with AVX-512 VNNI, a VNNI matmul, which keeps its own schedule without a search.
    assert "matmul" in top["name"] or "conv2d" in top["name"]
    assert top["trials"] > 0 or (top["status"] == "kept" and "vnni" in top["name"])

    result = run_cli("compile", *gray, *int8, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    library = Path(next(line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("library:")))
    info = json.loads((library.parent / "manifest.json").read_text())["info"]
    assert info["tuning"]["database"] == str(db_dir.resolve())
    assert info["tuning"]["tasks_from_records"] >= 1
    assert info["int8"]["integer_ops"]["matmul"] > 0


def test_tuning_cost_counts_trials_and_time_to_within_ten_percent_across_resumed_runs():
    from pipeline.compiler.records import tuning_cost

    curve = [
        {"trials": 0, "best_ms": 100.0, "kernels_measured": 3, "seconds": 10.0},
        {"trials": 16, "best_ms": 60.0, "kernels_measured": 3, "seconds": 40.0},
        # Resumed: the clock starts again.
        {"trials": 32, "best_ms": 52.0, "kernels_measured": 3, "seconds": 20.0},
        {"trials": 48, "best_ms": 50.0, "kernels_measured": 3, "seconds": 50.0},
    ]
    cost = tuning_cost(curve)
    assert cost == {
        "final_estimate_ms": 50.0, "trials": 48, "seconds": 90.0, "within": 0.10,
        "trials_to_within": 32, "seconds_to_within": 60.0,
    }
    # Points that leave kernels out of the estimate do not count as reaching it.
    partial = [{"trials": 0, "best_ms": 1.0, "kernels_measured": 1, "seconds": 1.0}] + curve
    assert tuning_cost(partial)["trials_to_within"] == 32
    assert tuning_cost([]) is None


def test_a_model_without_records_uses_other_models_records_for_the_kernels_they_share(
        tuned, tmp_path, monkeypatch, capsys):
    """Issue #17: records are found by kernel. An 11-class micro model has no database of its
    own; the 10-class model's records serve every kernel but the head, and two such
    databases are merged once into a cache that the next compile reuses."""
    from pipeline.compiler.backend import compile_onnx
    from pipeline.compiler.tuning import database
    from pipeline.model import create_model
    from pipeline.stages.export import export_onnx
    from targets import get_target

    monkeypatch.setattr(database, "SHIPPED_ROOT", tmp_path / "nothing-shipped")
    target = get_target("x86")
    tune_root = tmp_path / "artifacts" / "tune" / "x86"
    first = shutil.copytree(tuned / DB, tune_root / DB.name)
    key = DB.name.replace("-c10-", "-c11-")

    found = database.find_database(tmp_path / "artifacts", target, key)
    assert found == first
    assert "looking its kernels up in the records of target 'x86''s other models" in capsys.readouterr().err
    # Of this CPU only: the same records as if made on another CPU are not applied.
    meta = json.loads((first / "meta.json").read_text())
    other_cpu = "znver3" if database.cpu_tag(target.tvm_target) != "znver3" else "skylake-avx512"
    (first / "meta.json").write_text(json.dumps({**meta, "target_json": {**meta["target_json"], "mcpu": other_cpu}}))
    assert database.find_database(tmp_path / "artifacts", target, key) is None
    (first / "meta.json").write_text(json.dumps(meta))
    import onnx
    import onnxsim

    onnx_path = tmp_path / "micro-11.onnx"
    export_onnx(create_model("micro", num_classes=11).eval(), onnx_path, (1, 3, 32, 32), opset=17,
                dynamic_batch=False)
    onnx.save(onnxsim.simplify(onnx.load(str(onnx_path)), check_n=0)[0], str(onnx_path))  # as simplify does
    info = compile_onnx(onnx_path, target, tmp_path / "lib" / "model.so", input_shape=(1, 3, 32, 32),
                        tuning_database=found)
    assert info["tuning"]["tasks_from_records"] >= 1

    second = shutil.copytree(tuned / DB, tune_root / DB.name.replace("-b1-", "-b2-"))
    merged = database.find_database(tmp_path / "artifacts", target, key)
    assert merged.parent == tune_root and merged.name.startswith("_kernels-")
    assert set(json.loads((merged / "meta.json").read_text())["merged_from"]) == {str(first), str(second)}
    assert database.find_database(tmp_path / "artifacts", target, key) == merged  # reused, not merged again
    # The model's own records, once it has them, come first.
    own = shutil.copytree(tuned / DB, tune_root / key)
    assert database.find_database(tmp_path / "artifacts", target, key) == own
