import json

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


def test_unwritable_root_is_a_user_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(PipelineError, match="not writable.*--artifacts"):
        artifacts.ensure_writable_root(blocker / "artifacts")


def test_atomic_write_json_leaves_no_temp_files(tmp_path):
    target = tmp_path / "out" / "x.json"
    artifacts.atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]
