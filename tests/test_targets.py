"""The target table: every row is a valid TVM target, CPU features match LLVM's for that
core, GPU rows carry their host, and the detected targets fail clearly."""

from __future__ import annotations

import dataclasses
import json

import pytest
import tvm
from tvm.target import codegen

import targets
from pipeline.errors import PipelineError
from conftest import run_cli
from pipeline.compiler.backend import compile_onnx
from targets import get_target, known_targets

# Every row but the detected local GPU, which needs one.
FIXED = [name for name in known_targets() if name != "cuda"]
AARCH64 = [name for name in FIXED if get_target(name).host_triple.startswith("aarch64")]


def _features(mcpu: str) -> set[str]:
    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": mcpu})
    return set(codegen.llvm_get_cpu_features(target))


def test_table_lists_the_edge_targets_in_display_order():
    names = known_targets()
    assert names[:2] == ["x86", "cuda"]
    for name in ("cuda-sm75", "cuda-sm80", "cuda-sm86", "cuda-sm89", "cuda-sm90", "jetson-orin",
                 "jetson-orin-cpu", "jetson-thor", "jetson-thor-cpu", "arm-a53", "arm-a72", "arm-a76",
                 "arm-neoverse-n1", "arm-neoverse-v1"):
        assert name in names


@pytest.mark.parametrize("name", FIXED)
def test_every_row_is_a_valid_tvm_target(name):
    target = get_target(name)
    assert target.name == name
    parsed = tvm.target.Target(target.tvm_target)
    assert parsed.kind.name == target.tvm_target["kind"]
    # Written out in full: no tags, and the JSON is stable (it is part of cache keys).
    assert "tag" not in target.target_json()
    assert json.loads(target.target_json()) == target.tvm_target
    assert target.unavailable is None
    assert target.default_precision in target.precisions
    assert target.runner in ("local", "rpc")
    assert target.device in ("cpu", "cuda")
    with pytest.raises(dataclasses.FrozenInstanceError):
        target.name = "other"


@pytest.mark.parametrize("name", FIXED)
def test_host_code_matches_the_host_triple(name):
    target = get_target(name)
    host = target.host_target
    assert host["kind"] == "llvm"
    if "mtriple" in host:
        assert host["mtriple"] == target.host_triple
    if target.cuda_arch is not None:
        assert target.device == "cuda"
        assert target.tvm_target["host"] is host
        assert "gpu" in tvm.target.Target(target.tvm_target).keys


@pytest.mark.parametrize("name", AARCH64)
def test_aarch64_rows_are_cross_compiled_and_measured_over_rpc(name):
    target = get_target(name)
    assert target.cross_compiler == "aarch64-linux-gnu-gcc"
    assert target.cross_compiler_package == "gcc-aarch64-linux-gnu"
    assert target.runner == "rpc" and target.rpc_key
    assert "gcc-aarch64-linux-gnu" in target.needs


@pytest.mark.parametrize("name", AARCH64)
def test_mcpu_is_known_to_llvm_and_every_mattr_feature_is_the_cores_own(name):
    host = get_target(name).host_target
    assert codegen.llvm_is_valid_cpu(host["mcpu"], host["mtriple"])
    features = _features(host["mcpu"])
    for feature in host["mattr"]:
        assert feature.startswith("+")
        assert feature[1:] in features, f"{host['mcpu']} has no {feature}"


@pytest.mark.parametrize(
    "name, dotprod, i8mm_bf16_sve",
    [("arm-a53", False, False), ("arm-a72", False, False), ("arm-a76", True, False),
     ("arm-neoverse-n1", True, False), ("arm-neoverse-v1", True, True),
     ("jetson-orin-cpu", True, False), ("jetson-thor-cpu", True, True)],
)
def test_arm_feature_sets(name, dotprod, i8mm_bf16_sve):
    mattr = get_target(name).host_target["mattr"]
    assert "+neon" in mattr
    assert ("+dotprod" in mattr) == dotprod
    for feature in ("+i8mm", "+bf16", "+sve"):
        assert (feature in mattr) == i8mm_bf16_sve


@pytest.mark.parametrize(
    "name, arch, mcpu",
    [("cuda-sm75", "sm_75", None), ("cuda-sm80", "sm_80", None), ("cuda-sm86", "sm_86", None),
     ("cuda-sm89", "sm_89", None), ("cuda-sm90", "sm_90", None),
     ("jetson-orin", "sm_87", "cortex-a78ae"), ("jetson-thor", "sm_110", targets.THOR_CPU)],
)
def test_gpu_rows(name, arch, mcpu):
    target = get_target(name)
    assert target.cuda_arch == arch
    assert target.tvm_target["max_shared_memory_per_block"] == 49152
    assert target.host_target.get("mcpu") == mcpu
    # No int8 on GPUs (issue #16): 5.6x slower than fp16 on an H200 without integer tensor cores.
    assert target.precisions == ("fp32", "fp16")
    assert target.precision_note("int8") == targets.GPU_INT8_REASON
    assert target.precision_note("fp16") is None
    # The roofline bound's figures are the chip's whose SMs the default schedules fill.
    assert target.gpu_peaks is targets.GPU_PEAKS[arch]


def test_every_gpu_architecture_has_the_peaks_of_a_named_chip():
    assert set(targets.GPU_PEAKS) == set(targets.SM_COUNTS)
    for peaks in targets.GPU_PEAKS.values():
        assert peaks.chip and peaks.source
        # Tensor cores outrun CUDA cores, and every rate is a plausible GPU's.
        assert 1e12 < peaks.fp32_flops < peaks.fp16_tensor_flops < 1e16 and 1e10 < peaks.memory_bytes < 1e13
    assert all(get_target(name).gpu_peaks is None for name in FIXED if get_target(name).device == "cpu")


def test_cpu_rows_keep_int8_and_have_no_gpu_reason():
    for name in ("x86", "jetson-orin-cpu", "jetson-thor-cpu", "arm-a72"):
        target = get_target(name)
        assert target.precisions == ("fp32", "int8")
        assert target.precision_note("int8") is None and target.precision_note("fp16") is None


def test_int8_on_a_gpu_target_is_refused_with_the_reason_and_the_fix():
    reason = targets.GPU_INT8_REASON
    assert "\n" not in reason and "5.6x slower than fp16" in reason and "H200" in reason
    assert reason.endswith("use --precision fp16")
    with pytest.raises(PipelineError) as refused:
        get_target("cuda-sm90").check_precision("int8")
    assert str(refused.value) == f"target 'cuda-sm90' does not support precision 'int8': {reason}"
    get_target("cuda-sm90").check_precision("fp16")
    # Elsewhere the error lists what the target offers, as before.
    with pytest.raises(PipelineError, match=r"^target 'x86' does not support precision 'fp16'; use one of: fp32, int8$"):
        get_target("x86").check_precision("fp16")


def test_pipeline_targets_gives_the_reason_on_gpu_rows(tmp_path):
    listing = run_cli("targets", cwd=tmp_path, check=True).stdout
    rows: dict[str, list[str]] = {}
    for line in listing.splitlines():
        if not line.startswith(" "):
            rows[line.split()[0]] = []
        rows[next(reversed(rows))].append(line)
    for name in ("cuda-sm90", "jetson-orin", "cuda"):
        assert "precisions fp32, fp16;" in rows[name][1]
        assert any(line.strip() == targets.GPU_INT8_REASON for line in rows[name]), rows[name]
    for name in ("x86", "jetson-orin-cpu"):
        assert "precisions fp32, int8;" in rows[name][1]
        assert targets.GPU_INT8_REASON not in "\n".join(rows[name])


def test_compile_int8_for_a_gpu_target_is_a_one_line_error_before_any_work(tmp_path):
    result = run_cli("compile", "--variant", "atto", "--input-size", "32", "--target", "cuda-sm90",
                     "--precision", "int8", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"error: target 'cuda-sm90' does not support precision 'int8': {targets.GPU_INT8_REASON}"]
    # Refused before export and quantize: nothing was built or cached.
    assert not (tmp_path / "artifacts").exists()


def test_jetson_cpu_rows_share_the_boards_host():
    assert get_target("jetson-orin-cpu").tvm_target == get_target("jetson-orin").host_target
    assert get_target("jetson-thor-cpu").tvm_target == get_target("jetson-thor").host_target
    assert get_target("jetson-orin-cpu").cuda_arch is None


def test_thor_falls_back_to_neoverse_v2_on_an_llvm_without_v3ae(monkeypatch):
    monkeypatch.setattr(codegen, "llvm_is_valid_cpu", lambda cpu, triple: cpu != targets.THOR_CPU)
    targets._thor_cpu.cache_clear()
    try:
        assert get_target("jetson-thor").host_target["mcpu"] == targets.THOR_CPU_FALLBACK
    finally:
        targets._thor_cpu.cache_clear()


def test_local_cuda_without_a_gpu_names_the_fixed_architectures(monkeypatch, tmp_path):
    monkeypatch.setattr(targets, "_nvidia_smi_arch", lambda: None)
    monkeypatch.setattr(targets, "_tvm_cuda_arch", lambda: None)
    targets._local_cuda.cache_clear()
    try:
        target = get_target("cuda")  # listing it still works
        assert "none found here" in target.description and target.cuda_arch is None
        with pytest.raises(PipelineError, match="none was found.*cuda-sm80"):
            target.check_available()
        with pytest.raises(PipelineError, match="none was found"):
            # Building raises it before any work (the ONNX file need not exist).
            compile_onnx(tmp_path / "none.onnx", target, tmp_path / "m.so")
    finally:
        targets._local_cuda.cache_clear()


def test_local_cuda_takes_the_detected_architecture(monkeypatch):
    monkeypatch.setattr(targets, "_nvidia_smi_arch", lambda: "sm_89")
    targets._local_cuda.cache_clear()
    try:
        target = get_target("cuda")
        assert target.cuda_arch == "sm_89" and target.device == "cuda"
        assert target.precisions == ("fp32", "fp16")
        target.check_available()
        tvm.target.Target(target.tvm_target)
    finally:
        targets._local_cuda.cache_clear()


def test_nvidia_smi_output_is_parsed(monkeypatch):
    class Done:
        stdout = "9.0\n9.0\n"

    monkeypatch.setattr(targets.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(targets.subprocess, "run", lambda *a, **k: Done())
    assert targets._nvidia_smi_arch() == "sm_90"


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(PipelineError, match="unknown target 'orin'.*jetson-orin"):
        get_target("orin")


def test_thors_fallback_core_has_every_feature_thor_is_built_with():
    assert codegen.llvm_is_valid_cpu(targets.THOR_CPU_FALLBACK, "aarch64-linux-gnu")
    features = _features(targets.THOR_CPU_FALLBACK)
    assert all(f[1:] in features for f in get_target("jetson-thor-cpu").host_target["mattr"])
