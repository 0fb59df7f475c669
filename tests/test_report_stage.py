import json

from pipeline.stages.report import training_record, tuning_curve


def test_tuning_curve_comes_from_the_database_the_artifact_used(tmp_path):
    points = [{"trials": 8, "best_ms": 40.0, "seconds": 30}, {"trials": 16, "best_ms": 31.5, "seconds": 61}]
    (tmp_path / "tune_curve.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    assert tuning_curve({"database": str(tmp_path), "tasks_total": 4}) == points
    assert tuning_curve({"database": None}) == [] and tuning_curve("untuned") == []


def test_training_record_beside_the_weights(tmp_path):
    (tmp_path / "w.json").write_text(json.dumps({"command": "pipeline train --epochs 1", "test_top1": 90.0}))
    record = training_record(str(tmp_path / "w.pth"))
    assert record["command"] == "pipeline train --epochs 1" and record["test_top1"] == 90.0
    assert training_record(str(tmp_path / "other.pth")) is None and training_record(None) is None
