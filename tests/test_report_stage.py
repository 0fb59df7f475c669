import json

from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_ARGS, run_cli
from pipeline.stages.report import training_record, tuning_curve


def test_tuning_curve_comes_from_the_database_the_artifact_used(tmp_path):
    points = [{"trials": 8, "best_ms": 40.0, "seconds": 30}, {"trials": 16, "best_ms": 31.5, "seconds": 61}]
    (tmp_path / "tune_curve.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    assert tuning_curve({"database": str(tmp_path), "tasks_total": 4}) == points
    assert tuning_curve({"database": None}) == [] and tuning_curve("untuned") == []


def test_the_cost_notes_how_many_runs_the_curve_joins(tmp_path):
    from pipeline.stages.report import curve_with_runs

    points = [{"trials": 8, "best_ms": 40.0, "seconds": 30}, {"trials": 16, "best_ms": 31.5, "seconds": 61},
              {"trials": 24, "best_ms": 30.0, "seconds": 12}]  # resumed: the clock started again
    (tmp_path / "tune_curve.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    tuning = {"database": str(tmp_path), "cost": {"trials": 24}}
    assert curve_with_runs(tuning) == points and tuning["cost"]["runs"] == 2
    assert curve_with_runs({"database": None}) == []


def test_training_record_beside_the_weights(tmp_path):
    (tmp_path / "w.json").write_text(json.dumps({"command": "pipeline train --epochs 1", "test_top1": 90.0}))
    record = training_record(str(tmp_path / "w.pth"))
    assert record["command"] == "pipeline train --epochs 1" and record["test_top1"] == 90.0
    assert training_record(str(tmp_path / "other.pth")) is None and training_record(None) is None


@pytest.mark.slow
def test_committed_report_names_no_local_path_and_drops_a_stale_curve(tiny_run):
    from pipeline.provenance import cpu_description

    folder = tiny_run / "reports" / "x86"
    stale = folder / "tuning.json"
    stale.write_text('{"database": "/elsewhere/tuning/x86/micro", "curve": [{"trials": 1, "best_ms": 9.0}]}')
    data = tiny_run / "eval-images.npy"
    np.save(data, np.random.default_rng(0).integers(0, 255, (4, 40, 40, 3), dtype=np.uint8))
    run_cli("report", *TINY_ARGS, "--data", str(data), cwd=tiny_run, check=True)
    # No records of its own (the other models' shared kernels only): a curve left from an
    # earlier report would be drawn beside it.
    assert not stale.exists()
    for name in ("latency.json", "accuracy.json", "report.md"):
        assert str(tiny_run) not in (folder / name).read_text(), name
    accuracy = json.loads((folder / "accuracy.json").read_text())
    assert accuracy["data"]["source"] == "eval-images.npy"
    assert accuracy["provenance"]["device"] == cpu_description()
    # The records it compiled with where this CPU has shipped ones (other models', found by
    # kernel: one database, or several merged under the working directory), named by a
    # relative path and by whose they are; none on other CPUs.
    database = accuracy["model"]["tuning_records"]["database"]
    assert database is None or not Path(database).is_absolute()
    if database is not None:
        assert accuracy["model"]["tuning"]["records_of_models"]
