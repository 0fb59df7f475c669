"""reports/committed.py: a record replaces a committed one only when it measures the same
thing, else it goes beside it; and the Makefile's measuring defaults survive an override."""

import json
import shlex
import subprocess

import pytest
import typer

from benchmark_scripts import load
from conftest import REPO
from pipeline.errors import PipelineError
from reports.committed import differences, folder_name, place, read_record


def test_the_same_settings_replace_the_committed_record(tmp_path):
    committed = {"images": 10000, "repeats": 100}
    assert place(tmp_path, committed, dict(committed)) == (tmp_path, None)
    # Nothing there yet, or --replace-report (callers pass None): the folder itself.
    assert place(tmp_path, None, {"images": 256}) == (tmp_path, None)


def test_other_settings_go_beside_the_committed_record_with_one_line_saying_so(tmp_path):
    folder, note = place(tmp_path / "x86", {"images": 10000, "repeats": 100}, {"images": 256, "repeats": 100})
    assert folder == tmp_path / "x86" / "images-256"
    assert note.startswith(f"{tmp_path}/x86/ holds a measurement of other settings (images 10000 there, 256 here)")
    assert note.endswith(f"to {tmp_path}/x86/images-256/; pass --replace-report to replace it instead")
    folder, note = place(tmp_path, {"variants": "tiny,small"}, {"variants": "micro"}, "cpu_latency.json")
    assert folder == tmp_path / "variants-micro"
    assert f"{tmp_path}/cpu_latency.json holds" in note and f"to {folder}/cpu_latency.json;" in note


def test_a_setting_an_older_record_does_not_name_is_not_held_against_it():
    assert differences({"images": 10000, "preprocessing": None}, {"images": 10000, "preprocessing": "imagenet"}) == {}
    assert differences({"images": 10000}, {"images": 10000, "preprocessing": "imagenet"}) == {}
    assert differences({"repeats": 100}, {}) == {"repeats": (100, None)}


def test_folder_names_are_safe_and_bounded():
    assert folder_name({"data": ("fashion-mnist:test", "/data/my images"), "images": (10000, 256)}) == \
        "data-data-my-images_images-256"
    long = folder_name({"targets": ("all", ",".join(f"target-{n}" for n in range(40)))})
    assert len(long) <= 80 and long.startswith("targets-target-0,target-1")
    assert folder_name({"x": (1, "../..")}) == "x"


def test_an_unreadable_committed_record_is_an_error_that_names_the_way_out(tmp_path):
    assert read_record(tmp_path / "absent.json") is None
    (tmp_path / "latency.json").write_text('{"target": "x86", <<<<<<< HEAD')
    with pytest.raises(PipelineError, match="latency.json cannot be read .*pass --replace-report"):
        read_record(tmp_path / "latency.json")


# --- the Makefile ---------------------------------------------------------------------------


def make_command(target: str, program: str, *assignments: str) -> list[str]:
    """The arguments `make TARGET ASSIGNMENTS` would pass to `program` (make -n: nothing runs)."""
    result = subprocess.run(["make", "-n", "--no-print-directory", target, *assignments], cwd=REPO,
                            capture_output=True, text=True, timeout=60, check=True)
    for line in result.stdout.splitlines():
        words = shlex.split(line.replace("\\", ""))
        for index, word in enumerate(words):
            if word.endswith(program):
                rest = words[index + 1:]
                return rest[:rest.index("&&")] if "&&" in rest else rest
    raise AssertionError(f"no {program} command in:\n{result.stdout}")


def parsed(command: list[str]) -> dict:
    """The options `pipeline` parses from a command line (click: the last of a repeated option wins)."""
    from pipeline import cli

    group = typer.main.get_command(cli.app)
    name, *args = command
    return group.commands[name].make_context(name, args).params


def test_overriding_the_repeats_keeps_the_full_evaluation():
    # The README's own example: it used to drop --eval-limit 0 and evaluate 256 images.
    params = parsed(make_command("run", "pipeline", "TARGET=x86", "MEASURE_ARGS=--repeats 20"))
    assert params["repeats"] == 20 and params["eval_limit"] == 0
    params = parsed(make_command("run", "pipeline", "TARGET=x86"))
    assert params["repeats"] == 100 and params["eval_limit"] == 0
    params = parsed(make_command("run", "pipeline", "TARGET=x86", "ARGS=--replace-report"))
    assert params["replace_report"] is True


def test_narrowing_the_benchmarks_and_the_matrix_keeps_their_other_defaults():
    cpu_latency = load("cpu_latency")
    args = cpu_latency.parse_args(make_command("bench", "cpu_latency.py", "BENCH_ARGS=--variants micro"))
    assert (args.variants, args.batches, args.repeats) == ("micro", "1,8", 10)
    params = parsed(make_command("compile-matrix", "pipeline", "MATRIX_ARGS=--targets x86"))
    assert (params["targets"], params["variant"], params["input_size"]) == ("x86", "tiny", 224)
