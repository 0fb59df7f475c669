import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Small enough that an untuned CPU build takes seconds.
TINY_ARGS = ["--variant", "micro", "--input-size", "64", "--num-classes", "10"]
# The measuring options: only the commands that measure (bench, evaluate, report, run) take them.
MEASURE_ARGS = ["--warmup", "1", "--repeats", "3"]


def run_cli(*args: str, cwd: Path, check: bool = False) -> subprocess.CompletedProcess:
    """Run `pipeline ARGS` in a fresh process, as a user would."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and result.returncode != 0:
        raise AssertionError(f"pipeline {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def output_path(result: subprocess.CompletedProcess, name: str) -> Path:
    """The path a stage command printed as `name: PATH` on stdout."""
    for line in result.stdout.splitlines():
        key, sep, value = line.partition(": ")
        if sep and key == name:
            return Path(value.strip())
    raise AssertionError(f"no '{name}:' line in:\n{result.stdout}")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One whole pipeline run of a tiny model; tests read what it left behind."""
    workdir = tmp_path_factory.mktemp("tiny-run")
    run_cli("run", *TINY_ARGS, *MEASURE_ARGS, cwd=workdir, check=True)
    return workdir
