"""benchmarks/cpu_latency.py: the committed record is replaced only by a run of the same
settings; a narrowed run is written beside it."""

import json
from pathlib import Path

import pytest

from benchmark_scripts import load
from conftest import REPO

COMMITTED = REPO / "reports" / "benchmarks" / "cpu_latency.json"


def _script():
    return load("cpu_latency")


def test_the_committed_record_predating_its_settings_is_read_from_its_command_line():
    script = _script()
    assert script.recorded_settings(json.loads(COMMITTED.read_text())) == {
        "variants": "tiny,small,base", "input-size": 224, "classes": 1000, "batches": "1,8",
        "schedules": "defaults,records", "warmup": 2, "repeats": 10}


def test_a_narrowed_run_goes_beside_the_committed_record(tmp_path, capsys):
    script = _script()
    committed = tmp_path / "cpu_latency.json"
    committed.write_bytes(COMMITTED.read_bytes())
    makefile = ["--variants", "tiny,small,base", "--batches", "1,8", "--repeats", "10", "--json", str(committed)]
    assert script.destination(script.parse_args(makefile)) == committed
    assert script.destination(script.parse_args([*makefile, "--batches", "1, 8"])) == committed
    narrowed = script.parse_args([*makefile, "--variants", "micro", "--input-size", "32"])
    assert script.destination(narrowed) == tmp_path / "variants-micro_input-size-32" / "cpu_latency.json"
    assert (f"{committed} holds a measurement of other settings (variants tiny,small,base there, micro here; "
            f"input-size 224 there, 32 here)") in capsys.readouterr().err
    narrowed.replace_report = True
    assert script.destination(narrowed) == committed
    assert committed.read_bytes() == COMMITTED.read_bytes()


def test_an_unreadable_record_is_one_line_and_exit_2(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "cpu_latency.json"
    out.write_text("{not json")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cpu_latency.py"), "--variants", "micro",
                             "--json", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {out} cannot be read (JSONDecodeError), so it is unknown whether this run measures the same thing; "
        f"fix or delete it, or pass --replace-report to replace it"]
    assert out.read_text() == "{not json"


@pytest.mark.slow
def test_cpu_latency_keeps_a_record_of_other_settings(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "cpu_latency.json"
    out.write_bytes(COMMITTED.read_bytes())
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "cpu_latency.py"), "--variants", "micro", "--input-size", "32",
         "--num-classes", "10", "--batches", "1", "--schedules", "defaults", "--warmup", "0", "--repeats", "1",
         "--artifacts", str(tmp_path / "artifacts"), "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == COMMITTED.read_bytes()
    assert result.stderr.splitlines()[0].startswith(f"{out} holds a measurement of other settings")
    beside = Path(result.stdout.strip().splitlines()[-1].removeprefix("json: "))
    assert beside.parent.parent == tmp_path and beside.parent.name.startswith("variants-micro_input-size-32_")
    record = json.loads(beside.read_text())
    assert {row["variant"] for row in record["rows"]} == {"micro"} and record["settings"]["variants"] == "micro"
    assert beside.with_suffix(".txt").is_file()
