"""Where a number came from: machine, tools, commit, command line."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

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
def cpu_mcpu() -> str | None:
    """LLVM's name for this CPU (-mcpu: znver5, sapphirerapids, neoverse-n1): the model name
    string alone ("AMD EPYC" in many VMs) does not say which generation measured."""
    try:
        from tvm.target import codegen
    except ImportError:
        return None
    return str(codegen.llvm_get_system_cpu()) or None


def cpu_cores() -> int:
    """The CPUs this process may run on (what TVM's num-cores and the thread pools see)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_description() -> str:
    """The CPU precisely enough to compare measurements: model name, -mcpu and cores."""
    mcpu = cpu_mcpu()
    return f"{cpu_model()} ({f'-mcpu={mcpu}, ' if mcpu else ''}{cpu_cores()} cores)"


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
    return {
        "device": device or cpu_description(),
        "host": {"machine": platform.machine(), "cpu": cpu_model(), "mcpu": cpu_mcpu(), "cores": cpu_cores()},
        "date": now_iso(),
        "commit": git_commit(),
        "tools": tool_versions(),
        "command": " ".join([_program(), *sys.argv[1:]]),
    }


def _program() -> str:
    """How the command was invoked: `pipeline` also for `python -m pipeline.cli` (whose
    argv[0] is the package's __main__.py), else the script's name."""
    path = Path(sys.argv[0])
    return "pipeline" if path.parent.name == "cli" and path.name in ("__main__.py", "__init__.py") else path.name


def _local_roots() -> list[str]:
    """Folders of this machine that committed files must not name: the repository and the
    working directory (longest first, so the deeper one is cut when one holds the other)."""
    roots = {str(Path(__file__).resolve().parents[1]), str(Path.cwd().resolve())}
    return sorted((root for root in roots if root != "/"), key=len, reverse=True)


def portable(value: Any) -> Any:
    """`value` (text, or JSON-like data) with this machine's repository and working-directory
    paths made relative ("/home/me/convnext-edge/tuning/x86" -> "tuning/x86"), for files that
    are committed and read on other machines."""
    if isinstance(value, str):
        for root in _local_roots():
            value = value.replace(root + os.sep, "")
            if value == root:
                value = "."
        return value
    if isinstance(value, dict):
        return {key: portable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(item) for item in value]
    return value


def write_measurement(json_path: Path, record: dict, table_lines: list[str]) -> None:
    """A benchmark's record (with its "provenance") as JSON, and beside it a .txt of the
    table as printed, stamped with where and when it was measured, for readers of the repository."""
    import json

    record, table_lines = portable(record), portable(table_lines)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    origin = record["provenance"]
    json_path.with_suffix(".txt").write_text(
        "\n".join(table_lines) + f"\n\nmeasured on {origin['device']}, {origin['date']}, commit {origin['commit']}\n"
    )
