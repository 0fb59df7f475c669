from pathlib import Path

import pytest

from pipeline.config import PipelineConfig
from pipeline.engine import Stage, run_pipeline, stages_needed
from pipeline.errors import PipelineError
from targets import Target

TARGET = Target(name="fake", description="", tvm_target={"kind": "llvm"}, host_triple="x86_64-linux-gnu")


def make_stages(calls: list[str], fail_in: str | None = None) -> list[Stage]:
    """Three stages a -> b -> c that record their runs; `b` depends on `opset`, `c` on `repeats`."""

    def stage(name, inputs, output, setting):
        def run(config, target, files, out_dir: Path):
            calls.append(name)
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
