"""MetaSchedule tuning for GPU targets, on a machine without a GPU: `jetson` names Jetson Orin;
candidates from MetaSchedule's CUDA design space (tensor-core rules for an fp16 GEMM) build with
the project's nvcc for jetson-orin and cuda-sm90 and compute what the default schedule computes
on the CUDA emulator; tuning without a GPU says how to measure; compile applies a GPU record and
says which kernel came from which database."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import run_cli
from edge_models import micro_onnx

from targets import get_target


def test_jetson_means_jetson_orin_and_targets_lists_the_alias(tmp_path, capfd):
    target = get_target("jetson")
    assert target.name == "jetson-orin" and target.cuda_arch == "sm_87"
    note = capfd.readouterr().err
    assert "'jetson' means 'jetson-orin'" in note and "--target jetson-thor" in note
    listed = run_cli("targets", cwd=tmp_path, check=True).stdout
    assert any(line.startswith("jetson ") and "jetson-orin" in line and "jetson-thor" in line
               for line in listed.splitlines()[listed.splitlines().index("aliases:"):])


def _user_error(result) -> str:
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


def _has_gpu() -> bool:
    import tvm

    return tvm.cuda(0).exist


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU: tune would measure on it")
@pytest.mark.parametrize("name,precision", [("jetson", "fp16"), ("cuda-sm90", "fp32"), ("cuda", "fp16")])
def test_tuning_a_gpu_target_without_a_gpu_says_how_to_measure(tmp_path, name, precision):
    # Before any model work: the model options are never used.
    result = run_cli("tune", "--target", name, "--variant", "micro", "--input-size", "32", "--precision", precision,
                     "--artifacts", str(tmp_path / "artifacts"), cwd=tmp_path)
    error = _user_error(result)
    if name == "cuda":  # this machine's GPU, and there is none: the fixed architectures to pick
        assert "none was found" in error and "cuda-sm90" in error, error
    else:
        assert "--rpc-tracker HOST:PORT" in error and "--measure-bundle DIR" in error, error
    if name == "jetson":
        assert result.stderr.splitlines()[0].startswith("note: target 'jetson' means 'jetson-orin'")
    assert not (tmp_path / "artifacts" / "tune").exists()


def test_gpu_targets_tune_fp16_and_fp32_not_int8(tmp_path):
    error = _user_error(run_cli("tune", "--target", "jetson-orin", "--precision", "int8", cwd=tmp_path))
    assert "use one of: fp32, fp16" in error


# ---------------------------------------------------------------------------
# Candidates of the CUDA design space, built and emulated


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    return micro_onnx(tmp_path_factory)


def _gemm_task(onnx_path: Path, target):
    """The smallest fp16 GEMM whose default schedule is on tensor cores, and its default."""
    from pipeline.compiler.tuning import tuner
    from pipeline.compiler.tuning.tasks import extract_tasks, fused_module

    mod, tvm_target = fused_module(onnx_path, target, None, "fp16")
    for task in sorted(extract_tasks(mod, tvm_target), key=lambda t: t.flops):
        sch, kind = tuner.default_schedule(target, task.mod, tvm_target)
        if kind in tuner.TENSOR_CORE_DEFAULTS:
            return task, sch, tvm_target
    raise AssertionError("no tensor-core GEMM among the micro model's fp16 kernels")


def _sampled(task, tvm_target, kind: str, count: int, seed: int = 1) -> list:
    """`count` candidates as the search draws them: traces of the design space replayed with
    fresh decisions and post-processed (tensorized, verified for the GPU)."""
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler.tuning import tuner

    context = ms.TuneContext(
        mod=task.mod, target=tvm_target, space_generator=tuner.space_generator(kind),
        search_strategy=ms.search_strategy.ReplayTrace(), task_name=task.name, rand_state=seed, num_threads=1,
    ).clone()
    context.pre_tuning(max_trials=count, num_trials_per_iter=count,
                       design_spaces=context.generate_design_space(), database=None, cost_model=None)
    return [candidate.sch for candidate in context.generate_measure_candidates()]


@pytest.mark.slow
@pytest.mark.parametrize("target_name", ["jetson-orin", "cuda-sm90"])
def test_tensor_core_candidates_build_with_nvcc_and_compute_like_the_default(small_onnx, target_name):
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler import nvcc
    from pipeline.compiler.tensor_intrinsics import load_tensor_intrinsics
    from pipeline.compiler.tuning import measuring, tuner
    from pipeline.verify.cuda_emulator import gpu_build, kernel_check

    target = get_target(target_name)
    load_tensor_intrinsics()
    task, default, tvm_target = _gemm_task(small_onnx, target)
    assert tuner.space_kind(target, "fp16", "TensorCoreMatmul") == "cuda-tensorcore"
    candidates = _sampled(task, tvm_target, "cuda-tensorcore", 3)
    on_tensor_cores = [sch for sch in candidates if "wmma" in sch.mod.script() or "mma" in sch.mod.script()]
    assert on_tensor_cores, "no tensor-core candidate sampled"

    # The tuner's own builder: the project's nvcc, linked for the target (aarch64 for Jetson).
    assert not nvcc.FAST_MATH
    built = measuring.make_builder(target, measuring.TuneSettings()).build(
        [ms.builder.BuilderInput(sch.mod, tvm_target) for sch in [default, *on_tensor_cores[:2]]])
    try:
        ok = [sch for sch, result in zip([default, *on_tensor_cores[:2]], built) if result.error_msg is None]
        # Every one: with TVM 0.27's own tensor-core rules none of this GEMM's did
        # (tuner._tensor_core_rules says why).
        assert len(ok) == len(built), [str(r.error_msg)[-300:] for r in built]
        for result in built:
            if result.error_msg is None:
                library = Path(result.artifact_path).read_bytes()
                assert library[:4] == b"\x7fELF" and (b"\xb7\x00" if target_name == "jetson-orin" else b"\x3e\x00") == library[18:20]
    finally:
        for result in built:
            if result.artifact_path:
                shutil.rmtree(os.path.dirname(result.artifact_path), ignore_errors=True)

    # The built tensor-core candidate and the default, each run by the emulator against the
    # kernel's CPU build: both compute the same as it.
    unscheduled = task.mod["main"]
    kernels = gpu_build.scheduled_gpu_kernels(
        {"candidate": unscheduled, "default": unscheduled},
        {"candidate": ok[1].mod["main"], "default": default.mod["main"]},
        {"candidate": "cuda-tensorcore candidate", "default": "default"}, target)
    checks = {check.kernel: check for check in kernel_check.check_kernels(kernels)}
    assert checks["default"].status == "match", checks["default"]
    assert checks["candidate"].status == "match", checks["candidate"]


@pytest.mark.slow
def test_compile_applies_a_gpu_record_and_says_from_which_database(small_onnx, tmp_path):
    """A database of cuda-sm90 fp16 records where compile looks (artifacts/tune/<target>/<model>/):
    compile's tuning lookup finds it, and its schedule phase (which fills compile's info["tuning"]
    and the GPU kernels' rules) builds the kernel from its record and says from which database.
    The phase alone, not the whole compile: nvcc on every kernel takes minutes on two cores."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler import pass_results, phases
    from pipeline.compiler.fused import CompileOptions, fuse_model
    from pipeline.compiler.records import RECORD_FILE, WORKLOAD_FILE, open_database
    from pipeline.compiler.schedules.apply import defaults_version
    from pipeline.compiler.tensor_intrinsics import load_tensor_intrinsics
    from pipeline.compiler.tuning import database
    from pipeline.config import PipelineConfig
    from pipeline.stages import compile as compile_stage

    target = get_target("cuda-sm90")
    load_tensor_intrinsics()
    task, default, tvm_target = _gemm_task(small_onnx, target)
    (candidate,) = _sampled(task, tvm_target, "cuda", 1)
    config = PipelineConfig(variant="micro", input_size=64, num_classes=10, precision="fp16",
                            artifacts=tmp_path / "artifacts")
    key = database.config_model_key(config)
    db_dir = database.local_database_dir(tmp_path / "artifacts", target.name, key)
    db_dir.mkdir(parents=True)
    database.write_meta(db_dir, target, key, default_schedule_version=defaults_version(target.tvm_target))
    for name in (WORKLOAD_FILE, RECORD_FILE):
        (db_dir / name).touch()
    records = open_database(db_dir, target, strict=True)
    records.commit_tuning_record(ms.database.TuningRecord(
        candidate.trace, records.commit_workload(task.mod), [1e-3], tvm_target,
        ms.arg_info.ArgInfo.from_entry_func(candidate.mod, remove_preproc=True)))

    # GPU fp16 builds look their records up (they were never looked up before).
    assert compile_stage.tuning_database(config, target) == db_dir.resolve()
    assert compile_stage.tuning_settings(config, target)["tuning_database_sha256"] == database.database_digest(db_dir)

    fused = fuse_model(small_onnx, target, CompileOptions(precision="fp16"))
    with fused.tvm_target, tvm.transform.PassContext(config=phases.pass_config(target)):
        scheduled, results = pass_results.take_results(phases.schedule_pass(target, db_dir)(fused.module))
    report = results["schedule"]
    assert report["database"] == str(db_dir) and report["tasks_from_records"] == 1
    assert report["kernel_schedules"] == {task.name: "record"}
    # The GPU rules scheduled every other kernel, not this one (compile's info: "tuning record").
    assert task.name not in report["gpu_kernels"] and len(report["gpu_kernels"]) == report["tasks_total"] - 1
    # The record's schedule (CUDA cores), not the default (tensor cores: WMMA).
    assert "wmma" in default.mod.script() and "wmma" not in scheduled[task.name].script()


@pytest.mark.slow
def test_the_tuner_times_the_default_gpu_schedule_first_then_searches_tensor_core_candidates(small_onnx, tmp_path,
                                                                                             monkeypatch):
    """The one tuner on a GPU target, with a stand-in for the GPU (none here): each candidate
    is built with nvcc for sm_90, and the stand-in 'times' it as faster than the one before.
    The default schedule is timed first and is the task's first record; the search rounds
    draw from the tensor-core space and add their records."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler.records import open_database, read_meta
    from pipeline.compiler.schedules.apply import defaults_version
    from pipeline.compiler.tuning import measuring, tuner

    @derived_object
    class StandIn(ms.runner.PyRunner):
        def __init__(self):
            super().__init__()
            self.artifacts: list[str] = []

        def run(self, inputs):
            futures = []
            for runner_input in inputs:
                assert runner_input.device_type == "cuda" and Path(runner_input.artifact_path).is_file()
                self.artifacts.append(runner_input.artifact_path)
                futures.append(ms.runner.LocalRunnerFuture([1e-3 / len(self.artifacts)] * 3, None))
            return futures

    stand_in = StandIn()
    monkeypatch.setattr(measuring, "make_runner", lambda *args, **kwargs: stand_in)
    monkeypatch.setattr(measuring, "local_measure_problem", lambda target: None)
    lines: list[str] = []
    db_dir = tmp_path / "db"
    summary = tuner.tune(small_onnx, get_target("cuda-sm90"), db_dir, "micro", precision="fp16", say=lines.append,
                         settings=measuring.TuneSettings(trials_per_task=1, round_trials=1, max_tasks=1, population=8))
    (task,) = [t for t in summary["tasks"] if t["trials"]]
    assert task["default_s"] is not None and task["trials"] == 1 and task["best_s"] < task["default_s"]
    assert lines.index(next(l for l in lines if l.startswith("[tune] baseline 1/1"))) < \
        lines.index(next(l for l in lines if "searching MetaSchedule's cuda-tensorcore space" in l))
    assert "default schedule (TensorCoreMatmul)" in next(l for l in lines if l.startswith("[tune] baseline"))
    records = open_database(db_dir, get_target("cuda-sm90"), strict=True).get_all_tuning_records()
    assert len(records) == 2 and summary["records"] == 2
    meta = read_meta(db_dir)
    assert meta["target_json"]["arch"] == "sm_90" and meta["default_schedule_version"] == defaults_version(meta["target_json"])
