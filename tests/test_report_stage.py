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
    # Other data than the fixture's run: replaced on purpose, else it would go beside it.
    run_cli("report", *TINY_ARGS, "--data", str(data), "--replace-report", cwd=tiny_run, check=True)
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


# --- a report replaces the committed one only when it measures the same thing -----------------

COMMITTED = Path(__file__).resolve().parents[1] / "reports"


def stage_inputs(tmp_path: Path, folder: str, images: int | None = None, repeats: int | None = None,
                 calib_method: str | None = None) -> dict[str, Path]:
    """The report stage's inputs, as the stages before it leave them, for the model and data the
    committed reports/<folder>/ measured; `images`, `repeats` or `calib_method` change what is measured."""
    committed = {name: json.loads((COMMITTED / folder / f"{name}.json").read_text()) for name in ("latency", "accuracy")}
    model = committed["latency"]["model"]
    stages = tmp_path / "artifacts"
    for stage, manifest in {
        "build": {"settings": {"variant": model["variant"], "num_classes": model["num_classes"]},
                  "info": {"weights": model["weights"], "sha256": model["weights_sha256"]}},
        "simplify": {}, "compile": {"info": {"tuning": "untuned"}},
    }.items():
        (stages / stage).mkdir(parents=True)
        (stages / stage / "manifest.json").write_text(json.dumps(manifest))
    latency, accuracy = ({k: v for k, v in record.items() if k not in ("model", "provenance")}
                         for record in committed.values())
    if images is not None:
        accuracy["data"]["count"] = images
    if repeats is not None:
        for stats in latency["backends"].values():
            stats["repeats"] = repeats
    inputs = {"latency": stages / "latency.json", "accuracy": stages / "accuracy.json",
              "checkpoint": stages / "build" / "model.pth", "onnx_simplified": stages / "simplify" / "model.onnx",
              "library": stages / "compile" / "model.so"}
    inputs["latency"].write_text(json.dumps(latency))
    inputs["accuracy"].write_text(json.dumps(accuracy))
    if folder.endswith("int8"):
        quantization = json.loads((COMMITTED / folder / "quantization.json").read_text())
        quantization["settings"]["method"] = calib_method or quantization["settings"]["method"]
        inputs["quantization_report"] = stages / "quantize" / "quantization.json"
        inputs["quantization_report"].parent.mkdir()
        inputs["quantization_report"].write_text(json.dumps(quantization))
        (stages / "quantize" / "quantization.md").write_text("# quantization\n")
    return inputs


def report_into(tmp_path: Path, folder: str, replace: bool = False, **changes) -> Path:
    """Run the report stage on a copy of the committed reports/<folder>/; the copy's folder."""
    import shutil

    from pipeline.config import PipelineConfig
    from pipeline.stages import report
    from report_samples import FakeTarget

    reports = tmp_path / "reports"
    if not (reports / folder).exists():
        shutil.copytree(COMMITTED / folder, reports / folder)
    work = tmp_path / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    precision = "int8" if folder.endswith("int8") else "fp32"
    config = PipelineConfig(precision=precision, reports_dir=reports, replace_report=replace)
    report.run(config, FakeTarget("x86"), stage_inputs(work, folder, **changes), work)
    return reports / folder


def test_a_report_of_fewer_images_goes_beside_the_committed_one(tmp_path, capsys):
    folder = report_into(tmp_path, "x86", images=256)
    # The committed 10,000-image report is untouched...
    for name in ("latency.json", "accuracy.json", "report.md"):
        assert (folder / name).read_bytes() == (COMMITTED / "x86" / name).read_bytes(), name
    # ... and the 256-image one is beside it, where `pipeline reports` does not read it as the row.
    beside = folder / "images-256"
    assert json.loads((beside / "accuracy.json").read_text())["data"]["count"] == 256
    assert "256" in (beside / "report.md").read_text()
    note = [line for line in capsys.readouterr().err.splitlines() if "holds a measurement" in line]
    assert note == [f"[report] {folder}/ holds a measurement of other settings (images 10000 there, 256 here): this "
                    f"run is written beside it, to {beside}/; pass --replace-report to replace it instead"]
    from reports.aggregate import gather

    (row,) = gather(tmp_path / "reports", [])
    assert row.accuracy["data"]["count"] == 10000


def test_a_report_of_the_same_settings_or_with_replace_report_replaces_it(tmp_path):
    folder = report_into(tmp_path, "x86")
    assert json.loads((folder / "accuracy.json").read_text())["provenance"] != \
        json.loads((COMMITTED / "x86" / "accuracy.json").read_text())["provenance"]
    assert [p for p in folder.iterdir() if p.is_dir()] == []
    report_into(tmp_path, "x86", replace=True, images=256, repeats=20)
    assert json.loads((folder / "accuracy.json").read_text())["data"]["count"] == 256
    assert json.loads((folder / "latency.json").read_text())["backends"]["tvm"]["repeats"] == 20
    assert [p for p in folder.iterdir() if p.is_dir()] == []


def test_an_int8_report_of_another_calibration_goes_beside_the_committed_one(tmp_path):
    folder = report_into(tmp_path, "x86-int8", calib_method="minmax", repeats=20)
    for name in ("latency.json", "accuracy.json", "quantization.json", "report.md"):
        assert (folder / name).read_bytes() == (COMMITTED / "x86-int8" / name).read_bytes(), name
    beside = folder / "repeats-20_calib-method-minmax"
    assert json.loads((beside / "quantization.json").read_text())["settings"]["method"] == "minmax"
