"""Where a number came from: machine, tools, commit, command line."""

from __future__ import annotations

import datetime as _dt
import platform
import subprocess
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path

_TOOLS = ("torch", "onnx", "onnxruntime", "onnxsim", "apache-tvm", "apache-tvm-ffi", "numpy")


@lru_cache(maxsize=None)
def tool_versions() -> dict[str, str]:
    """Installed versions of the tools whose output ends up in an artifact."""
    versions = {"python": platform.python_version()}
    for name in _TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@lru_cache(maxsize=None)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=None)
def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=10, cwd=Path(__file__).resolve().parent,
        )
        commit = out.stdout.strip()
        if out.returncode != 0 or not commit:
            return "unknown"
        # The committed reports are outputs: `make reports` rewrites them between its runs,
        # which must not mark the code that measured them as modified.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", ":(exclude,top)reports"],
            capture_output=True, text=True, timeout=10, cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def provenance(device: str | None = None) -> dict:
    """Everything needed to compare two reports honestly."""
    import os

    return {
        "device": device or cpu_model(),
        "host": {"machine": platform.machine(), "cpu": cpu_model(), "cores": os.cpu_count()},
        "date": now_iso(),
        "commit": git_commit(),
        "tools": tool_versions(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def write_measurement(json_path: Path, record: dict, table_lines: list[str]) -> None:
    """A benchmark's record (with its "provenance") as JSON, and beside it a .txt of the
    table as printed, stamped with where and when it was measured, for readers of the repository."""
    import json

    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    origin = record["provenance"]
    json_path.with_suffix(".txt").write_text(
        "\n".join(table_lines) + f"\n\nmeasured on {origin['device']}, {origin['date']}, commit {origin['commit']}\n"
    )
