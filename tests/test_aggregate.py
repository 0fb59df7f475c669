"""reports/aggregate.py: gathering committed reports into reports/README.md."""

import json

import pytest

from pipeline.errors import PipelineError
from reports import aggregate
from reports.aggregate import regenerate, regression_flags
from report_samples import KNOWN, accuracy, latency, lookup, write_pair, write_report


def run(reports_dir, **kwargs):
    return regenerate(reports_dir, known=KNOWN, lookup=lookup, **kwargs)


def section(markdown: str, heading: str) -> str:
    """The text of one `## heading` section."""
    start = markdown.index(f"## {heading}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start:] if end < 0 else markdown[start:end]


def table_row(text: str, target: str, precision: str) -> list[str]:
    """The cells of the first table row for target x precision in `text`."""
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if len(cells) > 2 and (cells[0] == target or cells[0].startswith(f"[{target}]")) and cells[1] == precision:
            return cells
    raise AssertionError(f"no row for {target} {precision} in:\n{text}")


def test_targets_and_precisions_in_one_table_per_model(tmp_path):
    write_pair(tmp_path, "x86", median=10.0, top1=0.8)
    write_pair(tmp_path, "x86-int8", precision="int8", median=5.0, agreement=0.9375, top1=0.75)
    write_pair(tmp_path, "cuda-fp16", target="cuda", precision="fp16", median=0.5, top1=0.8)
    write_pair(tmp_path, "x86-tiny", variant="tiny", num_classes=1000, input_size=224, median=83.25)

    summary = run(tmp_path)
    markdown = summary.readme.read_text()

    micro = section(markdown, "micro, 10 classes, input 1x3x64x64")
    tiny = section(markdown, "tiny, 1000 classes, input 1x3x224x224")
    assert [key.variant for key in summary.tables] == ["micro", "tiny"]
    cells = dict(zip(aggregate.COLUMNS, table_row(micro, "x86", "fp32")))
    assert cells["median ms"] == "10.00"
    assert cells["p99 ms"] == "15.00"
    assert cells["throughput img/s"] == "100.0"
    assert cells["speed-up vs fastest PyTorch"] == "4.00x vs PyTorch eager"
    assert cells["speed-up vs ONNX Runtime"] == "2.00x"
    assert cells["top-1"] == "80.00%" and cells["top-5"] == "98.00%"
    assert cells["top-1 agreement with FP32 ref"] == "100.00%"
    assert cells["artifact MB"] == "1.73"
    assert cells["tuning"] == "untuned"
    assert cells["measured on"] == "AMD EPYC" and cells["date"] == "2026-01-01" and cells["commit"] == "aaaaaaaaaaaa"
    assert cells["evaluated on"] == "16 random inputs (no labels)"
    assert table_row(micro, "x86", "int8")[COL["top-1 agreement with FP32 ref"]] == "93.75%"
    assert table_row(micro, "cuda", "fp16")[COL["median ms"]] == "0.500"
    # The tiny model's x86 row is in its own table, not in micro's.
    assert table_row(tiny, "x86", "fp32")[COL["median ms"]] == "83.25"
    assert "83.25" not in micro
    # Top-1 without labels is n/a, not a number.
    assert table_row(tiny, "x86", "fp32")[COL["top-1"]] == "n/a"
    # Measured rows in known-target order, fp32 before fp16 before int8; the rest below, by target.
    order = [line.split(" | ")[:2] for line in micro.splitlines() if line.startswith("| ") and "---" not in line]
    assert [(t.strip("| ").split("]")[0].strip("["), p) for t, p in order][1:4] == [
        ("x86", "fp32"), ("x86", "int8"), ("cuda", "fp16")]
    assert not_measured(micro, "cuda") == {"fp32": "no device: needs an NVIDIA GPU"}
    assert not_measured(tiny, "x86") == {"int8": "no measurement committed"}


COL = {name: index for index, name in enumerate(aggregate.COLUMNS)}


def not_measured(text: str, target: str) -> dict[str, str]:
    """precision -> why, from the "Not measured" lines of `text` for `target`."""
    found = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if len(cells) == 3 and cells[0] == target:
            found.update(dict.fromkeys(cells[1].split(", "), cells[2]))
    return found


def test_known_targets_without_measurements_say_why(tmp_path):
    write_pair(tmp_path, "x86")
    markdown = run(tmp_path, expected=[("x86", "fp16")]).readme.read_text()

    # One line per target and reason, its precisions together, never a number.
    assert "| cuda | fp32, fp16 | no device: needs an NVIDIA GPU |" in markdown
    assert not_measured(markdown, "jetson-orin") == {"fp16": "no device: needs an NVIDIA GPU (RPC key 'orin')"}
    assert not_measured(markdown, "arm-a76") == {"fp32": "no device: needs aarch64 hardware; its accuracy under "
                                                         "qemu: pipeline report --emulate --target arm-a76"}
    # An expected row the target does not declare still appears, with that reason.
    assert not_measured(markdown, "x86") == {
        "int8": "no measurement committed", "fp16": "x86 does not support fp16 (precisions: fp32, int8)"}
    # The measured table holds measured rows only.
    assert [line for line in markdown.splitlines() if line.startswith("| cuda | fp32 |")] == []


def test_no_reports_at_all_still_lists_the_known_targets(tmp_path):
    summary = run(tmp_path)
    markdown = summary.readme.read_text()
    assert "## no measurements yet" in markdown
    assert not_measured(markdown, "x86") == dict.fromkeys(("fp32", "int8"), "no measurement committed")
    assert "| target | precision | median ms" not in markdown  # no empty table of measurements
    assert "## Provenance" not in markdown
    assert not (tmp_path / "history.jsonl").exists()


def test_unloadable_target_gets_a_generic_reason(tmp_path):
    def broken(name):
        raise RuntimeError("TVM is not installed")

    summary = regenerate(tmp_path, known=["x86"], lookup=broken)
    assert not_measured(summary.readme.read_text(), "x86") == {"fp32": "no measurement committed"}


def test_detected_target_that_is_absent_says_why(tmp_path):
    def detect(name):
        raise PipelineError("target 'cuda' means this machine's GPU, and none was found; pick cuda-sm90")

    summary = regenerate(tmp_path, known=["cuda"], lookup=detect)
    assert not_measured(summary.readme.read_text(), "cuda") == \
        {"fp32": "no device: target 'cuda' means this machine's GPU, and none was found"}


@pytest.mark.parametrize(
    ("before", "after", "flagged"),
    [
        ({"median_ms": 10.0}, {"median_ms": 11.1}, True),  # +11%
        ({"median_ms": 10.0}, {"median_ms": 10.9}, False),  # +9%
        ({"median_ms": 10.0}, {"median_ms": 11.0}, False),  # exactly +10% is within tolerance
        ({"median_ms": 10.0}, {"median_ms": 5.0}, False),  # faster
        ({"top1_agreement": 1.0}, {"top1_agreement": 0.9375}, True),
        ({"top1_agreement": 0.9375}, {"top1_agreement": 1.0}, False),
        ({"median_ms": None, "top1_agreement": None}, {"median_ms": 20.0, "top1_agreement": 0.5}, False),
    ],
)
def test_regression_flags(before, after, flagged):
    assert bool(regression_flags(after, before)) is flagged


def test_no_previous_entry_no_flag():
    assert regression_flags({"median_ms": 100.0}, None) == []


def regenerate_after(tmp_path, median, agreement, device="AMD EPYC"):
    """A first report at 10 ms and 100% agreement, then a later one with these numbers."""
    write_pair(tmp_path, "x86", median=10.0, agreement=1.0, date="2026-01-01T00:00:00+00:00", commit="aaa", device=device)
    run(tmp_path)
    write_pair(tmp_path, "x86", median=median, agreement=agreement,
               date="2026-01-02T00:00:00+00:00", commit="bbb", device="AMD EPYC")
    return run(tmp_path)


def test_latency_up_11_percent_is_flagged(tmp_path):
    summary = regenerate_after(tmp_path, median=11.1, agreement=1.0)
    markdown = summary.readme.read_text()
    assert [row.target for row in summary.regressions] == ["x86"]
    flag = table_row(markdown, "x86", "fp32")[COL["flag"]]
    assert flag.startswith("⚠") and "10.00 -> 11.10 ms (+11.0%)" in flag
    regressions = section(markdown, "Regressions")
    assert "**x86 fp32**" in regressions and "previous: commit aaa" in regressions


def test_latency_up_9_percent_is_not_flagged(tmp_path):
    summary = regenerate_after(tmp_path, median=10.9, agreement=1.0)
    assert summary.regressions == []
    assert table_row(summary.readme.read_text(), "x86", "fp32")[COL["flag"]] == ""
    assert "None." in section(summary.readme.read_text(), "Regressions")


def test_agreement_drop_is_flagged(tmp_path):
    summary = regenerate_after(tmp_path, median=10.0, agreement=0.9375)
    flag = table_row(summary.readme.read_text(), "x86", "fp32")[COL["flag"]]
    assert "top-1 agreement 100.00% -> 93.75%" in flag


def test_other_device_is_not_compared(tmp_path):
    summary = regenerate_after(tmp_path, median=20.0, agreement=0.5, device="Ampere Altra")
    assert summary.regressions == []


@pytest.mark.parametrize("change", ["mcpu", "cores", "records"])
def test_other_cpu_or_tuning_records_are_not_compared(tmp_path, change):
    first = latency(median=10.0, date="2026-01-01T00:00:00+00:00", commit="aaa")
    second = latency(median=20.0, date="2026-01-02T00:00:00+00:00", commit="bbb")
    for record, mcpu, cores, database in ((first, "znver4", 2, "tuning/x86/m/znver4"),
                                          (second, "znver4", 2, "tuning/x86/m/znver4")):
        record["provenance"]["host"].update(mcpu=mcpu, cores=cores)
        record["model"]["tuning_records"] = {"database": database, "sha256": "ab" * 32}
    if change == "mcpu":
        second["provenance"]["host"]["mcpu"] = "znver5"
    elif change == "cores":
        second["provenance"]["host"]["cores"] = 16
    else:
        second["model"]["tuning_records"] = {"database": "tuning/x86/m/znver4", "sha256": "cd" * 32}
    write_report(tmp_path, "x86", first, accuracy())
    run(tmp_path)
    write_report(tmp_path, "x86", second, accuracy())
    summary = run(tmp_path)
    assert summary.regressions == []
    entries = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [e["records"] for e in entries][0] == f"tuning/x86/m/znver4@{'ab' * 6}"
    assert entries[0]["mcpu"] == "znver4" and entries[0]["cores"] == 2 and entries[0]["cpu"] == "AMD EPYC 9654"


def test_same_cpu_and_records_are_compared(tmp_path):
    first = latency(median=10.0, date="2026-01-01T00:00:00+00:00", commit="aaa")
    second = latency(median=20.0, date="2026-01-02T00:00:00+00:00", commit="bbb")
    for record in (first, second):
        record["provenance"]["host"]["mcpu"] = "znver4"
        record["model"]["tuning_records"] = {"database": "tuning/x86/m/znver4", "sha256": "ab" * 32}
    write_report(tmp_path, "x86", first, accuracy())
    run(tmp_path)
    write_report(tmp_path, "x86", second, accuracy())
    assert [row.target for row in run(tmp_path).regressions] == ["x86"]


def test_regenerating_unchanged_reports_changes_nothing(tmp_path):
    regenerate_after(tmp_path, median=11.1, agreement=1.0)
    readme = (tmp_path / "README.md").read_text()
    history = (tmp_path / "history.jsonl").read_text()
    summary = run(tmp_path)
    assert summary.appended == []
    assert (tmp_path / "README.md").read_text() == readme  # the flag against the older entry stays
    assert (tmp_path / "history.jsonl").read_text() == history
    assert len(history.splitlines()) == 2


def test_malformed_and_foreign_json_is_skipped_with_a_warning(tmp_path, capsys):
    write_pair(tmp_path, "x86")
    write_report(tmp_path, "cuda", '{"target": "cuda", "precision": ', '{"target": "cuda"')
    write_report(tmp_path, "notes", "[1, 2, 3]")
    write_report(tmp_path, "x86-int8", json.dumps({"precision": "int8"}))

    summary = run(tmp_path)

    err = capsys.readouterr().err
    for name in ("cuda/latency.json", "cuda/accuracy.json", "notes/latency.json", "x86-int8/latency.json"):
        assert any(line.startswith("warning: ") and name in line for line in err.splitlines()), (name, err)
    markdown = summary.readme.read_text()
    skipped = section(markdown, "Skipped files")
    assert "cuda/latency.json: not valid JSON" in skipped
    assert "notes/latency.json: not a report" in skipped
    assert not_measured(markdown, "cuda")["fp32"].startswith("no device")
    assert table_row(markdown, "x86", "fp32")[COL["median ms"]] == "10.00"


def test_half_pairs_show_what_they_have(tmp_path, capsys):
    write_report(tmp_path, "x86", latency_record=latency(median=10.0))
    write_report(tmp_path, "x86-int8", accuracy_record=accuracy(precision="int8", agreement=0.5))

    summary = run(tmp_path)

    err = capsys.readouterr().err
    assert "x86/accuracy.json: missing; showing latency only" in err
    assert "x86-int8/latency.json: missing; showing accuracy only" in err
    markdown = summary.readme.read_text()
    # The accuracy-only row joins the one table of its model instead of a table of its own.
    assert len(summary.tables) == 1
    fp32 = table_row(markdown, "x86", "fp32")
    assert fp32[COL["median ms"]] == "10.00" and fp32[COL["top-1 agreement with FP32 ref"]] == "no accuracy.json"
    int8 = table_row(markdown, "x86", "int8")
    assert int8[COL["median ms"]] == "no latency.json" and int8[COL["top-1 agreement with FP32 ref"]] == "50.00%"
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert {(e["precision"], e["median_ms"], e["top1_agreement"]) for e in history} == {
        ("fp32", 10.0, None), ("int8", None, 0.5)}


def test_pair_that_disagrees_keeps_the_latency(tmp_path, capsys):
    write_report(tmp_path, "x86", latency(), accuracy(target="cuda"))
    summary = run(tmp_path)
    assert "accuracy skipped" in capsys.readouterr().err
    assert table_row(summary.readme.read_text(), "x86", "fp32")[COL["top-1 agreement with FP32 ref"]] == \
        "no accuracy.json"


@pytest.mark.parametrize(
    ("tuning", "shown"),
    [("untuned", "untuned"), (None, "untuned"), ({"trials": 2000, "method": "meta_schedule"}, "2000 trials"),
     (512, "512 trials"), ({"method": "meta_schedule"}, "meta_schedule")],
)
def test_tuning_column(tmp_path, tuning, shown):
    write_report(tmp_path, "x86", latency(tuning=tuning), accuracy())
    assert table_row(run(tmp_path).readme.read_text(), "x86", "fp32")[COL["tuning"]] == shown


def test_provenance_details_table(tmp_path):
    write_pair(tmp_path, "x86")
    record = latency(target="cuda", precision="fp16", median=0.5)
    record["provenance"]["host"]["gpu"] = "NVIDIA H100 80GB HBM3"
    record["provenance"]["command"] = "pipeline run --target cuda | tee log"
    write_report(tmp_path, "cuda-fp16", record, accuracy(target="cuda", precision="fp16"))

    details = section(run(tmp_path).readme.read_text(), "Provenance")
    header = [cell.strip() for cell in details.splitlines()[2].strip("|").split("|")]

    cuda = dict(zip(header, table_row(details, "cuda", "fp16")))
    assert cuda["reference"] == "pytorch"
    assert cuda["device"] == "AMD EPYC"
    assert cuda["CPU"] == "AMD EPYC 9654 (2 cores)"
    record["provenance"]["host"]["mcpu"] = "znver4"
    write_report(tmp_path, "cuda-fp16", record, accuracy(target="cuda", precision="fp16"))
    details = section(run(tmp_path).readme.read_text(), "Provenance")
    assert dict(zip(header, table_row(details, "cuda", "fp16")))["CPU"] == "AMD EPYC 9654 (-mcpu=znver4, 2 cores)"
    assert cuda["GPU"] == "NVIDIA H100 80GB HBM3"
    assert [cuda["TVM"], cuda["torch"], cuda["ONNX Runtime"]] == ["0.27.0.post1", "2.13.0+cpu", "1.32.0"]
    assert cuda["command"] == r"`pipeline run --target cuda \| tee log`"
    assert dict(zip(header, table_row(details, "x86", "fp32")))["GPU"] == "none recorded"


def test_target_links_to_its_report(tmp_path):
    folder = write_pair(tmp_path, "x86")
    (folder / "report.md").write_text("# x86\n")
    assert table_row(run(tmp_path).readme.read_text(), "x86", "fp32")[0] == "[x86](x86/report.md)"


def test_wrong_types_inside_a_report_show_as_missing_values(tmp_path):
    record = latency()
    record.update(backends={"tvm": {"median_ms": "fast", "p99_ms": None, "samples_ms": "many"}}, tvm_speedup=[],
                  artifact_bytes="big", provenance=3, model=[], input_shape="1x3x64x64")
    broken_accuracy = accuracy()
    broken_accuracy.update(metrics={"top1_agreement": float("nan")}, provenance={"host": "x", "tools": 1})
    write_report(tmp_path, "x86", record, broken_accuracy)

    summary = run(tmp_path)

    cells = table_row(summary.readme.read_text(), "x86", "fp32")
    assert cells[2:8] == ["n/a"] * 6
    assert cells[COL["top-1 agreement with FP32 ref"]] == "n/a"
    assert cells[COL["artifact MB"]] == "n/a"
    # The model comes from accuracy.json when latency.json's is unusable; the input shape is unknown.
    assert [key.label() for key in summary.tables] == ["micro, 10 classes, input ?"]


def test_compile_matrix_is_linked_once_written(tmp_path):
    write_pair(tmp_path, "x86")
    assert "## Compile matrix" not in run(tmp_path).readme.read_text()

    (tmp_path / "compile-matrix").mkdir()
    (tmp_path / "compile-matrix" / "README.md").write_text("# Compile matrix\n")
    (tmp_path / "compile-matrix" / "matrix.json").write_text('{"cells": []}\n')
    summary = run(tmp_path)
    link = section(summary.readme.read_text(), "Compile matrix")
    assert "[compile-matrix/README.md](compile-matrix/README.md)" in link
    # The matrix folder holds no latency or accuracy report: it adds no row and no warning.
    assert summary.warnings == [] and [row.folder for rows in summary.tables.values() for row in rows
                                       if row.measured] == ["x86"]


def test_speedup_divides_by_the_fastest_pytorch_configuration_and_names_it(tmp_path):
    # As gpu_check.py records a GPU run: eager fp16 (also as "pytorch"), channels_last, torch.compile
    # and torch.compile with CUDA graphs, all beside TVM's 0.584 ms.
    from report_samples import stats

    record = latency(target="cuda", precision="fp16", median=0.584)
    record["backends"] = {
        "tvm": stats(0.584), "pytorch": stats(4.807), "pytorch_fp16": stats(4.807),
        "pytorch_fp16_channels_last": stats(4.778), "torch_compile_fp16": stats(2.271),
        "torch_compile_cudagraphs_fp16": stats(0.733),
    }
    record["tvm_speedup"] = {"vs_pytorch": 4.807 / 0.584}
    write_report(tmp_path, "cuda-fp16", record, accuracy(target="cuda", precision="fp16"))
    eager_only = latency(median=10.0)
    write_report(tmp_path, "x86", eager_only, accuracy())

    markdown = run(tmp_path).readme.read_text()

    # 0.733 / 0.584, not eager's 8.23x.
    assert table_row(markdown, "cuda", "fp16")[COL["speed-up vs fastest PyTorch"]] == (
        "1.26x vs torch.compile reduce-overhead (CUDA graphs) fp16")
    assert table_row(markdown, "x86", "fp32")[COL["speed-up vs fastest PyTorch"]] == "4.00x vs PyTorch eager"
    assert aggregate.pytorch_config("pytorch_fp16_channels_last") == "PyTorch eager fp16 channels_last"


def emulated_pair(target="arm-a76", precision="int8", count=10000, total=10000):
    """The records the report stage writes for `pipeline report --emulate` (stages/report.py)."""
    from reports.target_report import BOARD_LATENCY

    record = latency(target, precision)
    record.update(warmup=None, backends={"tvm": {"not_measured": BOARD_LATENCY}}, tvm_speedup={})
    measured = accuracy(target, precision, 0.995, top1=0.92)
    measured["data"] = {"source": "fashion-mnist:test", "count": count, "labeled": True,
                        "description": f"Fashion-MNIST test split: split has {total} images: using {count}"}
    measured["emulator"] = {"name": "qemu-aarch64 7.2.22", "kind": "user-mode CPU emulator",
                            "binary": "same binary as the board"}
    return record, measured


def test_an_emulated_row_shows_accuracy_no_time_and_what_it_stands_on(tmp_path):
    write_pair(tmp_path, "x86", top1=0.92)
    write_report(tmp_path, "arm-a76-int8", *emulated_pair())
    write_pair(tmp_path, "cuda-fp16", target="cuda", precision="fp16", median=0.5)

    markdown = run(tmp_path).readme.read_text()

    cells = dict(zip(aggregate.COLUMNS, table_row(markdown, "arm-a76", "int8")))
    assert cells["median ms"] == "needs the board (RPC)"
    assert all(cells[name] == "n/a" for name in ("p99 ms", "throughput img/s", "speed-up vs fastest PyTorch",
                                                 "speed-up vs ONNX Runtime"))
    assert cells["top-1"] == "92.00%" and cells["top-1 agreement with FP32 ref"] == "99.50%"
    assert cells["measured on"] == ("qemu-aarch64 7.2.22 (user-mode CPU emulator, same binary as the board) "
                                    "on AMD EPYC")
    assert cells["evaluated on"] == "fashion-mnist:test, all 10000 images"
    # The other GPU targets than the one measured still need a GPU.
    assert not_measured(markdown, "jetson-orin") == {"fp16": "no device: needs an NVIDIA GPU (RPC key 'orin')"}


def test_a_row_of_part_of_the_set_says_how_many(tmp_path):
    write_report(tmp_path, "arm-a76-int8", *emulated_pair(count=256))
    cells = table_row(run(tmp_path).readme.read_text(), "arm-a76", "int8")
    assert cells[COL["evaluated on"]] == "fashion-mnist:test, 256 of 10000 images"
