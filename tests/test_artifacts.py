import json
import os
import subprocess
import sys
import time

import pytest

from pipeline import artifacts
from pipeline.errors import PipelineError


def test_content_key_is_stable_and_order_independent():
    assert artifacts.content_key({"a": 1, "b": [1, 2]}) == artifacts.content_key({"b": [1, 2], "a": 1})
    assert artifacts.content_key({"a": 1}) != artifacts.content_key({"a": 2})


def test_file_sha256_tracks_content(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"one")
    first = artifacts.file_sha256(path)
    path.write_bytes(b"two!")
    assert artifacts.file_sha256(path) != first


def test_stage_dir_manifest_requires_all_outputs(tmp_path):
    stage_dir = artifacts.StageDir(tmp_path, "export", "abc")
    temp = artifacts.new_temp_dir(stage_dir)
    (temp / "model.onnx").write_bytes(b"x")
    artifacts.commit_temp_dir(temp, stage_dir, {"outputs": {"onnx": "model.onnx"}})
    assert stage_dir.manifest()["outputs"] == {"onnx": "model.onnx"}
    (stage_dir.path / "model.onnx").unlink()
    assert stage_dir.manifest() is None


def test_manifest_unreadable_means_not_done(tmp_path):
    stage_dir = artifacts.StageDir(tmp_path, "export", "abc")
    stage_dir.path.mkdir(parents=True)
    (stage_dir.path / artifacts.MANIFEST).write_text("{not json")
    assert stage_dir.manifest() is None


def test_a_root_that_cannot_be_made_is_a_user_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(PipelineError, match="cannot be created.*--artifacts"):
        artifacts.open_root(blocker / "artifacts")


def _dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    return int(child.stdout)


def test_a_scratch_folder_is_stale_only_when_its_owner_is_provably_gone(tmp_path):
    stage_dir = artifacts.StageDir(tmp_path, "compile", "0123456789abcdef")
    mine = artifacts.new_temp_dir(stage_dir)
    machine, pid, start = mine.name.split(".tmp-")[1].split("-")[0].split(".")
    assert int(pid) == os.getpid()
    assert not artifacts.is_stale_temp_dir(mine)  # this process runs: a build in progress

    def scratch(owner: str) -> os.PathLike:
        path = stage_dir.path.parent / f".{stage_dir.key}.tmp-{owner}-abc"
        path.mkdir()
        return path

    # Made here by a process that has exited, or whose PID now names a later process.
    assert artifacts.is_stale_temp_dir(scratch(f"{machine}.{_dead_pid()}.{start}"))
    assert artifacts.is_stale_temp_dir(scratch(f"{machine}.{pid}.{int(start) + 1}"))
    # Another host or container sharing the cache, or an older pipeline's random name: /proc
    # cannot say, so only an age no build reaches makes them stale.
    day_later = time.time() + artifacts.STALE_AFTER_SECONDS + 60
    for path in (scratch(f"{'f' * 12}.{_dead_pid()}.{start}"), scratch("k2j4h5g6")):
        assert not artifacts.is_stale_temp_dir(path)
        assert artifacts.is_stale_temp_dir(path, now=day_later)


def test_remove_stale_temp_dirs_keeps_live_scratch_results_and_foreign_files(tmp_path):
    stage_dir = artifacts.StageDir(tmp_path, "compile", "0123456789abcdef")
    live = artifacts.new_temp_dir(stage_dir)
    done = artifacts.new_temp_dir(artifacts.StageDir(tmp_path, "compile", "fedcba9876543210"))
    artifacts.commit_temp_dir(done, artifacts.StageDir(tmp_path, "compile", "fedcba9876543210"), {"outputs": {}})
    machine, _, start = live.name.split(".tmp-")[1].split("-")[0].split(".")
    dead = tmp_path / "export" / f".{'a' * 16}.tmp-{machine}.{_dead_pid()}.{start}-xyz"
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "half.onnx").write_bytes(b"partial")
    tuning = tmp_path / "tune" / "x86" / ".db.tmp-old"  # another module's scratch: not ours to judge
    tuning.mkdir(parents=True)
    assert artifacts.remove_stale_temp_dirs(tmp_path) == [dead]
    assert live.is_dir() and tuning.is_dir() and (tmp_path / "compile" / "fedcba9876543210" / "manifest.json").is_file()
    assert list((tmp_path / "export").iterdir()) == []


def test_atomic_write_json_leaves_no_temp_files(tmp_path):
    target = tmp_path / "out" / "x.json"
    artifacts.atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]
