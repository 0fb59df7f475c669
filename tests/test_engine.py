import builtins
import errno
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import PipelineConfig
from pipeline.engine import Stage, run_pipeline, stages_needed
from pipeline.errors import PipelineError
from targets import Target
from conftest import REPO

TARGET = Target(name="fake", description="", tvm_target={"kind": "llvm"}, host_triple="x86_64-linux-gnu")


def make_stages(calls: list[str], fail_in: str | None = None, hold: Path | None = None) -> list[Stage]:
    """Three stages a -> b -> c that record their runs; `b` depends on `opset`, `c` on `repeats`.
    With `hold`, `a` waits until that file exists (a build in progress)."""

    def stage(name, inputs, output, setting):
        def run(config, target, files, out_dir: Path):
            calls.append(name)
            while hold is not None and name == "a" and not hold.exists():
                time.sleep(0.05)
            content = f"{name}:{getattr(config, setting)}:" + ",".join(p.read_text() for p in files.values())
            (out_dir / f"{output}.txt").write_text(content)
            if name == fail_in:
                raise RuntimeError("boom")
            return {"outputs": {output: f"{output}.txt"}}

        return Stage(name, inputs, (output,), lambda c, t: {setting: getattr(c, setting)}, run)

    return [
        stage("a", (), "x", "variant"),
        stage("b", ("x",), "y", "opset"),
        stage("c", ("y",), "z", "repeats"),
    ]


def test_rerun_is_a_cache_hit(tmp_path):
    calls: list[str] = []
    config = PipelineConfig(artifacts=tmp_path)
    first = run_pipeline(make_stages(calls), config, TARGET, "c")
    assert calls == ["a", "b", "c"]
    second = run_pipeline(make_stages(calls), config, TARGET, "c")
    assert calls == ["a", "b", "c"]
    assert all(result.cached for result in second.values())
    assert second["c"].outputs == first["c"].outputs


def test_changed_setting_rebuilds_only_downstream(tmp_path):
    calls: list[str] = []
    run_pipeline(make_stages(calls), PipelineConfig(artifacts=tmp_path), TARGET, "c")
    calls.clear()
    run_pipeline(make_stages(calls), PipelineConfig(artifacts=tmp_path, opset=18), TARGET, "c")
    assert calls == ["b", "c"]
    calls.clear()
    run_pipeline(make_stages(calls), PipelineConfig(artifacts=tmp_path, opset=18, repeats=7), TARGET, "c")
    assert calls == ["c"]


def test_failed_stage_leaves_nothing_behind(tmp_path):
    calls: list[str] = []
    with pytest.raises(RuntimeError):
        run_pipeline(make_stages(calls, fail_in="b"), PipelineConfig(artifacts=tmp_path), TARGET, "c")
    assert list((tmp_path / "b").iterdir()) == []
    # The finished upstream stage is kept and reused.
    calls.clear()
    run_pipeline(make_stages(calls), PipelineConfig(artifacts=tmp_path), TARGET, "c")
    assert calls == ["b", "c"]


def test_provided_file_replaces_upstream_stages(tmp_path):
    calls: list[str] = []
    given = tmp_path / "given.txt"
    given.write_text("user")
    results = run_pipeline(make_stages(calls), PipelineConfig(artifacts=tmp_path / "a"), TARGET, "c", {"y": given})
    assert calls == ["c"]
    assert results["c"].outputs["z"].read_text().endswith("user")


def test_manifest_records_inputs_settings_and_tools(tmp_path):
    results = run_pipeline(make_stages([]), PipelineConfig(artifacts=tmp_path), TARGET, "b")
    manifest = results["b"].manifest
    assert manifest["settings"] == {"opset": 17}
    assert set(manifest["inputs"]) == {"x"} and len(manifest["inputs"]["x"]) == 64
    assert "torch" in manifest["tools"] and "apache-tvm" in manifest["tools"]
    assert manifest["seconds"] >= 0


def test_unknown_stage_is_a_user_error():
    with pytest.raises(PipelineError, match="unknown stage 'nope'"):
        stages_needed(make_stages([]), "nope", {}, PipelineConfig())


def test_unavailable_optional_input_is_not_built(tmp_path):
    calls: list[str] = []
    stages = make_stages(calls)
    optional_b = Stage("b", ("x",), ("y",), stages[1].settings, stages[1].run, optional_inputs=("x",))
    run_pipeline([stages[0], optional_b], PipelineConfig(artifacts=tmp_path), TARGET, "b", unavailable=frozenset({"x"}))
    assert calls == ["b"]


def _scratch_dirs(root: Path) -> set[Path]:
    return {path for path in root.glob("*/.*.tmp-*")}


def _start_held_run(root: Path, hold: Path, variant: str) -> subprocess.Popen:
    """`run_pipeline` up to `c` in another process, held in stage `a` until `hold` exists."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from test_engine import TARGET, make_stages\n"
        "from pipeline.config import PipelineConfig\n"
        "from pipeline.engine import run_pipeline\n"
        "run_pipeline(make_stages([], hold=Path(sys.argv[2])), PipelineConfig(artifacts=Path(sys.argv[1]),"
        " variant=sys.argv[3]), TARGET, 'c')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    return subprocess.Popen([sys.executable, "-c", script, str(root), str(hold), variant], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_new_scratch(root: Path, known: set[Path], process: subprocess.Popen) -> Path:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        new = _scratch_dirs(root) - known
        if new:
            (path,) = new
            return path
        time.sleep(0.05)
    raise AssertionError(f"no scratch folder appeared: {process.stderr.read() if process.poll() is not None else ''}")


def test_a_killed_stages_scratch_folder_is_removed_by_the_next_run_and_a_running_ones_is_kept(tmp_path):
    root = tmp_path / "artifacts"
    running = _start_held_run(root, tmp_path / "go", "small")
    try:
        running_scratch = _wait_for_new_scratch(root, set(), running)
        killed = _start_held_run(root, tmp_path / "never", "tiny")
        killed_scratch = _wait_for_new_scratch(root, {running_scratch}, killed)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert _scratch_dirs(root) == {killed_scratch, running_scratch}

        calls: list[str] = []
        run_pipeline(make_stages(calls), PipelineConfig(artifacts=root), TARGET, "c")
        assert calls == ["a", "b", "c"]
        # The killed build's folder is gone; the concurrent build's is untouched and it finishes.
        assert _scratch_dirs(root) == {running_scratch}
        (tmp_path / "go").touch()
        assert running.wait(timeout=120) == 0, running.stderr.read()
    finally:
        running.kill()
        running.wait()
    assert _scratch_dirs(root) == set()
    assert len(list((root / "c").iterdir())) == 2  # both runs' results


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


@pytest.fixture
def read_only(monkeypatch):
    """Make a folder refuse writes as a read-only mount does (EROFS), and record every attempt.
    chmod -R a-w would not do: the tests run as root, which writes through it."""

    def protect(root: Path) -> list[str]:
        root = Path(root).resolve()
        attempts: list[str] = []

        def inside(path, dir_fd=None) -> bool:
            if isinstance(path, int):
                return False
            return dir_fd is not None or Path(os.path.abspath(os.fsdecode(path))).is_relative_to(root)

        def refuse(what, path):
            attempts.append(f"{what} {path}")
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

        def guard(name, paths=1):
            real = getattr(os, name)

            def guarded(*args, **kwargs):
                for path in args[:paths]:
                    if inside(path, kwargs.get("dir_fd") or kwargs.get("src_dir_fd")):
                        refuse(name, path)
                return real(*args, **kwargs)

            monkeypatch.setattr(os, name, guarded)

        for name in ("mkdir", "rmdir", "unlink", "remove", "utime", "chmod", "truncate"):
            guard(name)
        for name in ("rename", "replace", "link", "symlink"):
            guard(name, paths=2)
        real_os_open, real_open = os.open, io.open

        def os_open(path, flags, *args, **kwargs):
            if flags & _WRITE_FLAGS and inside(path, kwargs.get("dir_fd")):
                refuse("open", path)
            return real_os_open(path, flags, *args, **kwargs)

        def open_(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+") and inside(file):
                refuse("open", file)
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(io, "open", open_)
        monkeypatch.setattr(builtins, "open", open_)
        return attempts

    return protect


def test_a_read_only_cache_serves_its_hits_without_writing_and_a_miss_names_the_fix(tmp_path, read_only):
    calls: list[str] = []
    first = run_pipeline(make_stages(calls), PipelineConfig(artifacts=tmp_path), TARGET, "c")
    attempts = read_only(tmp_path)
    again = run_pipeline(make_stages(calls), PipelineConfig(artifacts=tmp_path), TARGET, "c")
    assert all(result.cached for result in again.values()) and calls == ["a", "b", "c"]
    assert again["c"].outputs == first["c"].outputs and again["c"].outputs["z"].read_text().startswith("c:")
    assert attempts == []
    root = re.escape(str(tmp_path.resolve()))
    with pytest.raises(PipelineError, match=(
            rf"^artifacts directory '{root}' is not writable \(Read-only file system\) and holds no 'c' "
            r"result for these settings; pass --artifacts DIR pointing to a writable directory$")):
        run_pipeline(make_stages(calls), PipelineConfig(artifacts=tmp_path, repeats=7), TARGET, "c")
    assert calls == ["a", "b", "c"]


def _can_mount_read_only() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount --bind / /mnt && mount -o remount,ro,bind /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_read_only(), reason="no mount namespace for a read-only bind mount")
def test_a_cache_on_a_read_only_mount_serves_its_hits(tmp_path):
    """The same on a real read-only mount, in a private mount namespace (as a container's would be)."""
    run_pipeline(make_stages([]), PipelineConfig(artifacts=tmp_path), TARGET, "c")
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from test_engine import TARGET, make_stages\n"
        "from pipeline.config import PipelineConfig\n"
        "from pipeline.engine import run_pipeline\n"
        "from pipeline.errors import PipelineError\n"
        "calls = []\n"
        "hit = run_pipeline(make_stages(calls), PipelineConfig(artifacts=Path(sys.argv[1])), TARGET, 'c')\n"
        "print('cached', calls, all(r.cached for r in hit.values()))\n"
        "try:\n"
        "    run_pipeline(make_stages(calls), PipelineConfig(artifacts=Path(sys.argv[1]), repeats=7), TARGET, 'c')\n"
        "except PipelineError as exc:\n"
        "    print('miss', exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    mount = f"mount --bind {tmp_path} {tmp_path} && mount -o remount,ro,bind {tmp_path} && exec \"$@\""
    result = subprocess.run(["unshare", "-m", "sh", "-c", mount, "sh", sys.executable, "-c", script, str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "cached [] True" in result.stdout
    assert "miss artifacts directory" in result.stdout and "is not writable (Read-only file system)" in result.stdout
