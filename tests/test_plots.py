"""reports/plots.py, and the plots reports/README.md embeds."""

import json
import re

from reports import plots
from reports.aggregate import regenerate
from report_samples import KNOWN, accuracy, latency, lookup, write_pair, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, path


def test_latency_distribution_from_summaries_and_samples(tmp_path):
    summaries = [
        plots.LatencySummary("x86\nfp32", 9.0, 10.0, 12.0, 15.0, 16.0),
        plots.LatencySummary("cuda\nfp16", None, 0.5, None, None, None),  # only a median
        plots.LatencySummary("arm\nfp32", 40.0, 41.0, 44.0, 50.0, 52.0, samples_ms=(40.0, 41.0, 41.5, 44.0, 52.0)),
    ]
    path = plots.latency_distribution(summaries, tmp_path / "latency.png", "micro")
    assert path == tmp_path / "latency.png"
    assert_png(path)
    assert plots.latency_distribution([plots.LatencySummary("x", None, None, None, None, None)],
                                      tmp_path / "none.png", "t") is None
    assert not (tmp_path / "none.png").exists()


def test_latency_vs_accuracy(tmp_path):
    points = [plots.AccuracyPoint("x86", "fp32", 10.0, 1.0), plots.AccuracyPoint("x86", "int8", 5.0, 0.95),
              plots.AccuracyPoint("cuda", "fp16", 0.1, 1.0), plots.AccuracyPoint("npu", "bf16", 1.0, 0.9)]
    assert_png(plots.latency_vs_accuracy(points, tmp_path / "acc.png", "micro", "top-1 agreement"))
    assert plots.latency_vs_accuracy([], tmp_path / "none.png", "micro", "top-1") is None


def test_tuning_curves(tmp_path):
    curves = {"x86 fp32": [plots.TuningPoint(64, 8.0), plots.TuningPoint(0, 12.0), plots.TuningPoint(128, 7.5)],
              "arm fp32": []}
    assert_png(plots.tuning_curves(curves, tmp_path / "tuning.png", "micro"))
    assert plots.tuning_curves({"x86 fp32": []}, tmp_path / "none.png", "micro") is None


def test_a_resumed_curve_is_drawn_one_run_at_a_time(tmp_path):
    # Run 1: 2 of 3 kernels measured at first, then all; run 2 (clock reset) re-measures higher.
    joined = [plots.TuningPoint(8, 5.0, 10.0, 2), plots.TuningPoint(16, 9.0, 20.0, 3),
              plots.TuningPoint(24, 9.5, 30.0, 3), plots.TuningPoint(32, 8.0, 40.0, 3),
              plots.TuningPoint(40, 8.4, 5.0, 3), plots.TuningPoint(48, 7.0, 15.0, 3)]
    assert plots.tuning_curves({"x86 fp32": joined}, tmp_path / "t.png", "micro", {"x86 fp32": 7.5}) is not None
    assert_png(tmp_path / "t.png")


def test_runs_are_split_where_the_clock_went_back_and_made_monotone():
    from reports.tuning_curve import TuningPoint, best_so_far, count_runs, split_runs

    joined = [TuningPoint(8, 5.0, 10.0, 2), TuningPoint(16, 9.0, 20.0, 3), TuningPoint(24, 9.5, 30.0, 3),
              TuningPoint(32, 8.0, 40.0, 3), TuningPoint(40, 8.4, 5.0, 3), TuningPoint(48, 7.0, 15.0, 3)]
    first, second = split_runs(joined)
    assert [p.trials for p in first] == [8, 16, 24, 32] and [p.trials for p in second] == [40, 48]
    # The partial estimate (2 of 3 kernels) is left out; later worse estimates keep the best so far.
    assert [(p.trials, p.best_ms) for p in best_so_far(first)] == [(16, 9.0), (24, 9.0), (32, 8.0)]
    assert [(p.trials, p.best_ms) for p in best_so_far(second)] == [(40, 8.4), (48, 7.0)]
    # Points without times are one run; count_runs reads tune_curve.jsonl's dicts.
    assert len(split_runs([TuningPoint(64, 8.0), TuningPoint(0, 12.0)])) == 1
    assert count_runs([{"trials": 16, "best_ms": 1.0, "seconds": 320.0},
                       {"trials": 32, "best_ms": 0.9, "seconds": 335.6}]) == 1
    assert count_runs([{"trials": 16, "best_ms": 1.0, "seconds": 50.0},
                       {"trials": 32, "best_ms": 0.9, "seconds": 12.0}]) == 2


def test_same_inputs_give_the_same_png(tmp_path):
    summary = [plots.LatencySummary("x86\nfp32", 9.0, 10.0, 12.0, 15.0, 16.0)]
    first = plots.latency_distribution(summary, tmp_path / "a.png", "micro").read_bytes()
    assert plots.latency_distribution(summary, tmp_path / "b.png", "micro").read_bytes() == first


def test_read_tuning_curve(tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"curve": [{"trials": 0, "best_ms": 12.0, "seconds": 0},
                                          {"trials": 64, "best_ms": 8.0, "seconds": 30.5}]}))
    assert plots.read_tuning_curve(good) == [plots.TuningPoint(0, 12.0, 0.0), plots.TuningPoint(64, 8.0, 30.5)]
    assert plots.read_tuning_curve(tmp_path / "absent.json") is None
    for name, text in (("broken.json", "{"), ("shape.json", '{"curve": [{"trials": 1}]}'), ("list.json", "[]")):
        (tmp_path / name).write_text(text)
        assert plots.read_tuning_curve(tmp_path / name) is None
        assert f"warning: {tmp_path / name}:" in capsys.readouterr().err


def embedded_images(markdown):
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def test_readme_embeds_plots_that_exist(tmp_path):
    write_pair(tmp_path, "x86", median=10.0, top1=0.8)
    write_pair(tmp_path, "x86-int8", precision="int8", median=5.0, top1=0.78)
    write_pair(tmp_path, "x86-tiny", variant="tiny", num_classes=1000, input_size=224, median=80.0)
    (tmp_path / "x86" / "tuning.json").write_text(json.dumps(
        {"curve": [{"trials": n, "best_ms": 20.0 - n / 10, "seconds": n} for n in (0, 32, 64)]}))

    markdown = regenerate(tmp_path, known=KNOWN, lookup=lookup).readme.read_text()

    images = embedded_images(markdown)
    assert sorted(images) == sorted([
        "plots/micro-10-1x3x64x64-latency.png", "plots/micro-10-1x3x64x64-accuracy.png",
        "plots/micro-10-1x3x64x64-tuning.png",
        "plots/tiny-1000-1x3x224x224-latency.png", "plots/tiny-1000-1x3x224x224-accuracy.png",
    ])
    for image in images:
        assert_png(tmp_path / image)
    # Labeled data on every row: the scatter plots top-1; the tiny model has no tuning curve.
    assert "against top-1," in markdown
    assert "No tuning curves: no row has a `tuning.json`" in markdown


def test_raw_samples_are_used_when_bench_recorded_them(tmp_path):
    write_report(tmp_path, "x86", latency(samples=[9.5, 10.0, 10.2, 14.0, 16.0]), accuracy())
    markdown = regenerate(tmp_path, known=KNOWN, lookup=lookup).readme.read_text()
    assert "plots/micro-10-1x3x64x64-latency.png" in embedded_images(markdown)
    assert "where bench recorded no raw samples" not in markdown


def test_stale_plots_are_removed(tmp_path):
    write_pair(tmp_path, "x86-tiny", variant="tiny", num_classes=1000, input_size=224)
    regenerate(tmp_path, known=KNOWN, lookup=lookup)
    assert (tmp_path / "plots" / "tiny-1000-1x3x224x224-latency.png").is_file()
    (tmp_path / "plots" / "notes.txt").write_text("kept: not a plot")

    for name in ("latency.json", "accuracy.json"):
        (tmp_path / "x86-tiny" / name).unlink()
    write_pair(tmp_path, "x86")
    regenerate(tmp_path, known=KNOWN, lookup=lookup)

    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "micro-10-1x3x64x64-accuracy.png", "micro-10-1x3x64x64-latency.png", "notes.txt"]


def test_a_curve_of_other_records_than_the_artifact_used_is_not_drawn(tmp_path):
    tuning = {"tasks_total": 4, "tasks_from_records": 4, "database": "tuning/x86/micro/znver5"}
    write_report(tmp_path, "x86", latency(tuning=tuning), accuracy())
    curve = [{"trials": n, "best_ms": 2.0 - n / 100, "seconds": n} for n in (16, 32)]
    (tmp_path / "x86" / "tuning.json").write_text(json.dumps({"database": "tuning/x86/micro", "curve": curve}))
    summary = regenerate(tmp_path, known=KNOWN, lookup=lookup)
    assert "plots/micro-10-1x3x64x64-tuning.png" not in embedded_images(summary.readme.read_text())
    assert any("a curve of tuning/x86/micro, but x86 fp32 was compiled with tuning/x86/micro/znver5" in w
               for w in summary.warnings)

    (tmp_path / "x86" / "tuning.json").write_text(json.dumps({"database": "tuning/x86/micro/znver5", "curve": curve}))
    summary = regenerate(tmp_path, known=KNOWN, lookup=lookup)
    assert "plots/micro-10-1x3x64x64-tuning.png" in embedded_images(summary.readme.read_text())
