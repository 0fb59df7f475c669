"""fused.fuse_model: compile, tuning and the CUDA emulator see the same kernels."""

from __future__ import annotations

import pytest
import tvm_ffi
from edge_models import micro_onnx
from test_tvm_int8 import quantized

from pipeline.compiler import backend, phases
from pipeline.compiler.fused import CompileOptions, fuse_model
from pipeline.compiler.tuning.tasks import extract_tasks, fused_module
from pipeline.errors import PipelineError
from targets import get_target


def _compiled_kernels(monkeypatch, onnx_path, target, **options) -> dict[str, int]:
    """The kernels compile's schedule phase receives (name -> structural hash), by way of
    MetaSchedule's task extraction, as tuning reads them."""
    seen = {}

    def capture(mod, tvm_target, *_args, **_kwargs):
        seen["tasks"] = extract_tasks(mod, tvm_target)
        raise RuntimeError("scheduling reached")  # enough: no kernel needs building

    monkeypatch.setattr(phases.schedule_apply, "schedule_module", capture)
    # Raised inside a pass, it comes back through TVM's FFI as some other exception.
    with pytest.raises(Exception):
        backend.compile_onnx(onnx_path, target, onnx_path.parent / "never.so", **options)
    return _workloads(seen["tasks"])


def _workloads(tasks) -> dict[str, int]:
    return {task.name: tvm_ffi.structural_hash(task.mod) for task in tasks}


@pytest.fixture(scope="module")
def qdq_model(tmp_path_factory):
    return quantized(tmp_path_factory.mktemp("fused-int8"), float_outputs=False)


@pytest.mark.slow  # up to scheduling only: no kernel is built
@pytest.mark.parametrize("target_name,precision", [("x86", "fp32"), ("cuda-sm90", "fp16"), ("x86", "int8")])
def test_tunes_workloads_equal_compiles_kernels(monkeypatch, tmp_path_factory, qdq_model, target_name, precision):
    target = get_target(target_name)
    onnx_path = qdq_model if precision == "int8" else micro_onnx(tmp_path_factory)
    tuned = _workloads(extract_tasks(*fused_module(onnx_path, target, None, precision)))
    compiled = _compiled_kernels(monkeypatch, onnx_path, target, precision=precision)
    assert tuned and tuned == compiled
    if precision == "fp16":  # the precision reached the kernels: a float16 GEMM on tensor cores
        assert any("float16" in task.mod.script() for task in extract_tasks(*fused_module(onnx_path, target, None, precision)))
    if precision == "int8":
        fp32 = _workloads(extract_tasks(*fused_module(onnx_path, target, None, "fp32")))
        assert fp32 != tuned  # the integer lowering ran: tuning int8 as fp32 would tune other kernels


def test_options_are_checked_before_any_work(tmp_path):
    with pytest.raises(PipelineError, match="--params embedded"):
        fuse_model(tmp_path / "missing.onnx", get_target("x86"), CompileOptions(precision="int8", params_mode="separate"))
    with pytest.raises(PipelineError, match="unknown params_mode 'shared'"):
        fuse_model(tmp_path / "missing.onnx", get_target("x86"), CompileOptions(params_mode="shared"))


def test_the_int8_report_is_read_off_the_fused_module(qdq_model):
    from pipeline.compiler import pass_results

    fused = fuse_model(qdq_model, get_target("x86"), CompileOptions(precision="int8"))
    assert fused.int8_report["integer_ops"] == {"conv2d": 9, "matmul": 11}
    # Read and taken off: the module the schedule phase gets carries no result.
    assert pass_results.take_results(fused.module)[1] == {}


@pytest.mark.slow  # schedules micro's kernels with the CPU defaults (no kernel is built)
def test_the_schedule_phase_reports_its_counts_on_the_module(tmp_path_factory):
    import tvm

    from pipeline.compiler import pass_results

    target = get_target("x86")
    fused = fuse_model(micro_onnx(tmp_path_factory), target)
    with fused.tvm_target, tvm.transform.PassContext(config=phases.pass_config(target)):
        scheduled, results = pass_results.take_results(phases.schedule_pass(target, None)(fused.module))
    report = results["schedule"]
    assert report["tasks_total"] == len(fused.prim_funcs()) == report["tasks_default"]
    assert report["database"] is None and report["tasks_from_records"] == 0
    assert set(report["kernel_schedules"]) == set(fused.prim_funcs())
    assert dict(scheduled.attrs or {}) == dict(fused.module.attrs or {})
