"""pipeline/precisions.py: one record per precision, read by targets, the compile stage,
tune and the compiler."""

from __future__ import annotations

import pytest
import tvm

from pipeline import precisions
from pipeline.cli.options import option_help, validate_config
from pipeline.compiler import phases
from pipeline.compiler.fused import CompileOptions, compile_phases
from pipeline.config import PRECISIONS, PipelineConfig
from pipeline.errors import PipelineError
from pipeline.stages import bench as bench_stage
from pipeline.stages import compile as compile_stage
from pipeline.stages import report as report_stage
from targets import get_target, known_targets
from conftest import run_cli


def test_every_phase_a_record_names_has_its_passes():
    named = {key for precision in precisions.PLAN.values() for key in precision.phases}
    assert named == set(phases.PRECISION_PHASES)


def test_the_records_are_consistent_and_config_lists_them():
    assert PRECISIONS == tuple(precisions.PLAN) == ("fp32", "fp16", "int8")
    for precision in precisions.PLAN.values():
        # Offered and tuned only where the compiler builds it; a reason only where it builds
        # but is not offered.
        assert set(precision.offered_on) <= set(precision.builds_on)
        assert set(precision.tunable_on) <= set(precision.builds_on)
        assert set(precision.not_offered) == set(precision.builds_on) - set(precision.offered_on)
        assert all("\n" not in reason for reason in precision.not_offered.values())
        assert precision.model_output == {"simplify": "onnx_simplified", "quantize": "onnx_quantized"}[precision.model_stage]


def test_targets_offer_what_the_plan_offers_their_device_kind():
    for name in known_targets():
        target = get_target(name)
        assert target.precisions == tuple(p for p, record in precisions.PLAN.items() if target.device in record.offered_on)


def test_the_compile_stage_takes_each_precisions_model_and_tunes_what_the_plan_says():
    cpu, gpu = get_target("x86"), get_target("cuda-sm90")
    for name, precision in precisions.PLAN.items():
        assert compile_stage.model_input(PipelineConfig(precision=name)) == (precision.model_output,)
        assert compile_stage.tunable(cpu, name) == ("cpu" in precision.tunable_on)
        assert compile_stage.tunable(gpu, name) == ("cuda" in precision.tunable_on)


def test_the_compiler_refuses_in_one_line_what_the_plan_does_not_build():
    with pytest.raises(PipelineError, match=r"^precision fp16 is for GPU targets, not 'x86'; use --precision fp32 or int8$"):
        CompileOptions(precision="fp16").check(get_target("x86"))
    with pytest.raises(PipelineError, match=r"^unknown precision 'fp8'; use one of: fp32, fp16, int8$"):
        CompileOptions(precision="fp8").check(get_target("x86"))
    with pytest.raises(PipelineError, match=r"^precision int8 folds weights .*; use --params embedded$"):
        CompileOptions(precision="int8", params_mode="separate").check(get_target("x86"))
    # Not offered on GPU targets, but the compiler builds it (tests/test_cuda_build.py keeps it right).
    CompileOptions(precision="int8").check(get_target("cuda-sm90"))


def test_a_new_precision_is_one_record_and_its_phase_function(monkeypatch):
    """What adding bf16 takes: its record and the passes of its phase; targets, the compile
    stage, tune's check and the compiler's phases and checks follow."""

    @tvm.transform.module_pass(opt_level=0, name="Bf16Stand-in")
    def bf16_pass(mod, _ctx):
        return mod

    monkeypatch.setitem(precisions.PLAN, "bf16", precisions.Precision(
        "bf16", model_stage="simplify", model_output="onnx_simplified", phases=("bf16",),
        offered_on=("cuda",), builds_on=("cuda",), tunable_on=("cuda",)))
    monkeypatch.setitem(phases.PRECISION_PHASES, "bf16", lambda target: [bf16_pass])
    gpu, cpu = get_target("cuda-sm90"), get_target("x86")

    assert gpu.precisions == ("fp32", "fp16", "bf16") and cpu.precisions == ("fp32", "int8")
    gpu.check_precision("bf16")
    with pytest.raises(PipelineError, match=r"^target 'x86' does not support precision 'bf16'; use one of: fp32, int8$"):
        cpu.check_precision("bf16")
    assert compile_stage.model_input(PipelineConfig(precision="bf16")) == ("onnx_simplified",)
    assert compile_stage.tunable(gpu, "bf16") and not compile_stage.tunable(cpu, "bf16")
    names = [name for name, _ in compile_phases(gpu, CompileOptions(precision="bf16", params_mode="separate"))]
    assert names[0] == "bf16" and names[1:] == [name for name, _ in phases.relax_phases(gpu)]
    with pytest.raises(PipelineError, match=r"^precision bf16 is for GPU targets, not 'x86'; use --precision fp32 or int8$"):
        CompileOptions(precision="bf16").check(cpu)


def test_the_precision_plan_is_part_of_the_compile_cache_key(tmp_path, monkeypatch):
    plan = tmp_path / "precisions.py"
    plan.write_text('PLAN = {"fp16": ("fp16",)}\n')
    monkeypatch.setattr(compile_stage, "PRECISION_PLAN", plan)
    compile_stage.compiler_digest.cache_clear()
    before = compile_stage.compiler_digest()
    plan.write_text('PLAN = {"fp16": ("fp16", "another_phase")}\n')
    compile_stage.compiler_digest.cache_clear()
    assert compile_stage.compiler_digest() != before
    compile_stage.compiler_digest.cache_clear()


def test_tune_names_an_unknown_precision_in_one_line_before_any_work(tmp_path):
    result = run_cli("tune", "--variant", "micro", "--input-size", "32", "--target", "x86", "--precision", "bf16",
                     cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == ["error: unknown precision 'bf16'; use one of: fp32, fp16, int8"]
    assert not (tmp_path / "artifacts").exists()


def test_tune_refuses_a_precision_the_plan_does_not_tune_on_the_targets_device(tmp_path):
    result = run_cli("tune", "--variant", "micro", "--input-size", "32", "--target", "cuda-sm90",
                     "--precision", "int8", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "error: --precision int8 cannot be tuned for target 'cuda-sm90'; use one of: fp32, fp16"]


def test_a_new_precision_reaches_the_cli_and_the_measuring_stages_from_its_record(monkeypatch):
    """--precision's help and check, and what bench and report read, come from the plan: a
    new record (a float bf16, a quantized int4) needs no edit there."""
    monkeypatch.setitem(precisions.PLAN, "bf16", precisions.Precision(
        "bf16", model_stage="simplify", model_output="onnx_simplified", phases=(),
        offered_on=("cuda",), builds_on=("cuda",), tunable_on=()))
    monkeypatch.setitem(precisions.PLAN, "int4", precisions.Precision(
        "int4", model_stage="quantize", model_output="onnx_quantized", phases=(),
        offered_on=("cpu",), builds_on=("cpu",), tunable_on=()))

    _, _, help_text = option_help("precision")
    assert "fp32, fp16, int8, bf16, int4" in help_text
    validate_config(PipelineConfig(variant="micro", input_size=32, precision="bf16"), None)
    with pytest.raises(PipelineError, match=r"^unknown precision 'fp8'; use one of: fp32, fp16, int8, bf16, int4$"):
        validate_config(PipelineConfig(variant="micro", input_size=32, precision="fp8"), None)

    assert "onnx_quantized" in bench_stage.bench_inputs(PipelineConfig(precision="int4"))
    assert "onnx_quantized" not in bench_stage.bench_inputs(PipelineConfig(precision="bf16"))
    assert "quantization_report" in report_stage.report_inputs(PipelineConfig(precision="int4"))
    assert "quantization_report" not in report_stage.report_inputs(PipelineConfig(precision="bf16"))
