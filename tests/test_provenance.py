"""pipeline/provenance.py: where a number came from, said precisely and without this machine's paths."""

import json
import os
from pathlib import Path

from pipeline import provenance
from pipeline.provenance import cpu_description, portable, write_measurement

REPO = Path(__file__).resolve().parents[1]


def test_the_cpu_is_named_with_its_model_mcpu_and_cores():
    from targets import get_target

    mcpu = get_target("x86").tvm_target["mcpu"]  # the -mcpu compile uses on this machine
    cores = len(os.sched_getaffinity(0))
    assert cpu_description() == f"{provenance.cpu_model()} (-mcpu={mcpu}, {cores} cores)"
    host = provenance.provenance()["host"]
    assert (host["mcpu"], host["cores"]) == (mcpu, cores)
    assert provenance.provenance()["device"] == cpu_description()


def test_portable_makes_repository_and_working_directory_paths_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    record = {"database": f"{REPO}/tuning/x86/tiny/znver5", "library": str(tmp_path / "artifacts" / "m.so"),
              "notes": [f"48/48 kernels from records ({REPO}/tuning/x86)", str(REPO)],
              "elsewhere": "/opt/data/x.npy", "count": 3}
    assert portable(record) == {"database": "tuning/x86/tiny/znver5", "library": "artifacts/m.so",
                                "notes": ["48/48 kernels from records (tuning/x86)", "."],
                                "elsewhere": "/opt/data/x.npy", "count": 3}
    # A folder whose name only starts like the repository's is not cut.
    assert portable(f"{REPO}-old/x") == f"{REPO}-old/x"


def test_benchmark_files_name_the_cpu_and_no_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    record = {"rows": [{"tuning": f"records ({REPO}/tuning/x86/tiny/znver5)"}], "provenance": provenance.provenance()}
    write_measurement(tmp_path / "bench.json", record, ["tvm  1.00 ms  records (" + str(REPO) + "/tuning/x86)"])
    text = (tmp_path / "bench.txt").read_text()
    assert str(REPO) not in text and str(REPO) not in (tmp_path / "bench.json").read_text()
    assert "records (tuning/x86)" in text
    assert f"measured on {cpu_description()}, " in text
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][0]["tuning"] == "records (tuning/x86/tiny/znver5)"
