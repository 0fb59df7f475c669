"""pipeline/compiler/tuning/tuner.py: the time budget in every phase of `pipeline tune`, its
progress lines, and `make tune` tuning the model `make compile` builds (issue #26).

The tuning tests run the real loop on the micro model at 32x32 with at most two tasks; where
the budget must run out at a given point, the tuner's clock is moved on there, so the test
never waits for it and never depends on how fast this machine is.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli


def _model_key_of_make(goal: str) -> tuple[str, str]:
    """The target and tuning model key of the `pipeline` command that `make GOAL` runs, with
    the Makefile's defaults (no overrides from the environment)."""
    import typer

    from pipeline.cli import app
    from pipeline.cli.options import config_from_options
    from pipeline.compiler.tuning.database import config_model_key

    env = {k: v for k, v in os.environ.items()
           if k not in ("MODEL_ARGS", "TUNE_ARGS", "MEASURE_ARGS", "ARGS", "TARGET", "MAKEFLAGS", "MFLAGS")}
    dry = subprocess.run(["make", "-n", "-s", "--no-print-directory", goal], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60, check=True)
    (line,) = [line for line in dry.stdout.splitlines() if f"/pipeline {goal} " in line]
    argv = shlex.split(line)
    command = typer.main.get_command(app).commands[goal]
    options = command.make_context(goal, argv[argv.index(goal) + 1:], resilient_parsing=True).params
    return options["target"], config_model_key(config_from_options(options))


def test_make_tune_tunes_the_model_make_compile_builds():
    """Records serve a compile only under its own model key: `make tune`'s must be the demo's."""
    tune_target, tune_key = _model_key_of_make("tune")
    compile_target, compile_key = _model_key_of_make("compile")
    assert (tune_target, tune_key) == (compile_target, compile_key)
    # The demo's model (MODEL_ARGS): the committed one-channel micro at 32x32.
    assert compile_key == "micro-32-b1-c10-in1-fp32"


@pytest.fixture(scope="module")
def micro_onnx(tmp_path_factory) -> Path:
    """The micro model at 1x3x32x32, exported and simplified as the pipeline's stages do."""
    import onnx

    from pipeline.model import create_model
    from pipeline.stages.export import export_onnx
    from pipeline.stages.simplify import simplify

    path = tmp_path_factory.mktemp("micro-32") / "micro.onnx"
    export_onnx(create_model("micro", num_classes=10).eval(), path, (1, 3, 32, 32), opset=17, dynamic_batch=False)
    onnx.save(simplify(onnx.load(str(path))), str(path))
    return path


class _Clock:
    """The tuner's `time` module, with a monotonic clock the test can move on."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def __getattr__(self, name):
        return getattr(time, name)


def _records(db_dir: Path) -> int:
    return sum(1 for line in (db_dir / "database_tuning_record.json").read_text().splitlines() if line.strip())


@pytest.mark.slow
def test_the_time_budget_stops_the_baselines_keeps_them_and_resume_continues(micro_onnx, tmp_path, monkeypatch):
    """Issue #26: `--time-budget 0.2` measured the baselines of every task for 417 s, with no
    counter. The budget now ends the baseline phase between tasks, the tasks measured are
    kept, and a resumed run measures the next one; the search checks it before each round."""
    from pipeline.compiler.tuning import measuring, tuner
    from targets import get_target

    clock = _Clock()
    monkeypatch.setattr(tuner, "time", clock)
    measure = tuner._Tuner.measure_baselines

    def measure_then_spend_the_budget(self, task, progress, *args, **kwargs):
        before = progress.default_s
        measure(self, task, progress, *args, **kwargs)
        if progress.default_s != before:  # a task measured by an earlier run takes no time
            clock.offset += 3600.0

    monkeypatch.setattr(tuner._Tuner, "measure_baselines", measure_then_spend_the_budget)
    db_dir = tmp_path / "db"
    settings = measuring.TuneSettings(time_budget_s=600.0, max_tasks=2, trials_per_task=2, round_trials=2)

    def run(resume: bool) -> tuple[dict, list[str]]:
        clock.offset = 0.0
        lines: list[str] = []
        summary = tuner.tune(micro_onnx, get_target("x86"), db_dir, "micro-test",
                             dataclasses.replace(settings, resume=resume),
                             input_shape=(1, 3, 32, 32), say=lines.append)
        return summary, [line for line in lines if line.startswith("[tune] baseline ")]

    summary, baselines = run(resume=False)
    assert summary["stopped"] == "the time budget ran out while measuring the baselines (1 of 2 tasks measured, none searched yet)"
    assert len(baselines) == 1 and baselines[0].startswith("[tune] baseline 1/2 ")
    assert "default schedule" in baselines[0] and "left of the budget" in baselines[0]
    assert summary["trials"] == 0 and summary["records"] == _records(db_dir) == 1
    state = json.loads((db_dir / "tune_state.json").read_text())["tasks"]
    assert sum(1 for task in state.values() if task["default_s"]) == 1

    # Resumed: the first task's baseline is kept, the second is measured, and the budget,
    # spent again, stops the search before its first round.
    summary, baselines = run(resume=True)
    assert len(baselines) == 1 and baselines[0].startswith("[tune] baseline 2/2 ")
    assert summary["stopped"] == "the time budget ran out in the search (at task 1 of 2)"
    assert summary["trials"] == 0 and summary["records"] == _records(db_dir) == 2
    state = json.loads((db_dir / "tune_state.json").read_text())["tasks"]
    assert sum(1 for task in state.values() if task["default_s"]) == 2


@pytest.mark.slow
def test_tune_says_in_one_line_that_its_budget_ran_out_before_the_baselines(tmp_path):
    """A budget spent while the model is built (it counts from the command's start) stops
    tune before the first baseline: exit 0, one line saying so and how to continue."""
    result = run_cli("tune", "--variant", "micro", "--input-size", "32", "--num-classes", "10",
                      "--time-budget", "0.0001", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (stopped,) = [line for line in result.stdout.splitlines() if line.startswith("stopped:")]
    assert stopped.startswith("stopped: the time budget ran out while measuring the baselines (0 of ")
    assert stopped.endswith("; continue with the same command and --resume")
    assert "[tune] baseline " not in result.stderr
    db_dir = tmp_path / "artifacts/tune/x86/micro-32-b1-c10-in3-fp32"
    assert json.loads((db_dir / "meta.json").read_text())["model_key"] == db_dir.name
