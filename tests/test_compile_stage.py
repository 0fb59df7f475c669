"""stages/compile: what its cache key holds."""

from __future__ import annotations

from pipeline.stages import compile as compile_stage


def test_a_changed_compiler_source_changes_the_cache_key(tmp_path, monkeypatch):
    (tmp_path / "schedules").mkdir()
    source = tmp_path / "schedules" / "gpu.py"
    source.write_text("TILE = 64\n")
    monkeypatch.setattr(compile_stage, "COMPILER_DIR", tmp_path)
    compile_stage.compiler_digest.cache_clear()
    before = compile_stage.compiler_digest()
    source.write_text("TILE = 32\n")
    compile_stage.compiler_digest.cache_clear()
    assert compile_stage.compiler_digest() != before
    compile_stage.compiler_digest.cache_clear()


def test_the_cache_key_holds_the_digest_of_this_checkout_s_compiler():
    from pipeline.config import PipelineConfig
    from targets import get_target

    compile_stage.compiler_digest.cache_clear()
    settings = compile_stage.settings(PipelineConfig(), get_target("x86"))
    assert settings["compiler_sha256"] == compile_stage.compiler_digest() and len(settings["compiler_sha256"]) == 64
