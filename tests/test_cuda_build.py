"""CUDA artifacts built without a GPU carry machine code for their sm_XX (compiled by nvcc
at build time), load through TVM's own module loader, and record their target; a GPU
run against the CPU build is marked `gpu` and skips without one."""

from __future__ import annotations

import json
import re
import shutil
import struct

import numpy as np
import pytest
import tvm
import tvm_ffi

from edge_models import compiled, elf_machine, sample
from pipeline.runtime.runners import load_artifact
from pipeline import toolchain
from pipeline.compiler import cuda_code
from pipeline.compiler.schedules import gpu as gpu_schedules
from pipeline.compiler import backend, tvm_compat
from pipeline.errors import PipelineError
from pipeline.runtime.runtime_only import metadata_path
from targets import get_target

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed")


def _has_gpu() -> bool:
    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001 -- no CUDA runtime at all
        return False


# ---------------------------------------------------------------------------
# Fast: the pieces, on synthetic bytes


def _fatbin(entries: list[tuple[int, int]]) -> bytes:
    """A fatbin with (kind, sm) entries and 8-byte payloads, laid out as nvcc lays it out."""
    body = b""
    for kind, sm in entries:
        header = struct.pack("<HHIQ", kind, 0x101, 64, 8) + bytes(12) + struct.pack("<I", sm) + bytes(32)
        body += header + b"payload!"
    return struct.pack("<IHHQ", cuda_code.FATBIN_MAGIC, 1, 16, len(body)) + body


def test_fatbin_entries_are_read_from_headers_anywhere_in_a_file():
    data = b"\0" * 37 + _fatbin([(2, 87), (1, 87)]) + b"xx" + _fatbin([(2, 110)])
    assert [str(e) for e in cuda_code.fatbin_entries(data)] == ["sass:sm_87", "ptx:compute_87", "sass:sm_110"]
    assert cuda_code.fatbin_entries(b"no gpu code here") == []


def _serialized(modules: list[tuple[bytes, bytes | None]]) -> bytes:
    u64 = lambda v: struct.pack("<Q", v)  # noqa: E731
    string = lambda b: u64(len(b)) + b  # noqa: E731
    body = u64(3) + u64(0) + u64(1) + u64(1) + u64(1) + u64(1)  # row_ptr [0,1,1], children [1]
    for kind, payload in modules:
        body += string(kind) + (b"" if payload is None else string(payload))
    return u64(len(body)) + body


def test_cuda_modules_are_rewritten_from_source_to_fatbin_keeping_the_function_table():
    u64 = lambda v: struct.pack("<Q", v)  # noqa: E731
    source = "extern \"C\" __global__ void k() {}"
    table = u64(1) + u64(1) + b"k" + b"\x01\x02\x03 opaque function table"
    cuda = u64(4) + b"cuda" + table + u64(len(source)) + source.encode()
    blob = _serialized([(b"_lib", None), (b"cuda", cuda)])

    new, count = tvm_compat.fatbin_module_blob(blob, [source], lambda s: b"FATBIN<" + s.encode() + b">")

    expected_cuda = u64(6) + b"fatbin" + table + u64(len(source) + 8) + b"FATBIN<" + source.encode() + b">"
    assert count == 1
    assert new == _serialized([(b"_lib", None), (b"cuda", expected_cuda)])


def test_a_serialization_tvm_might_change_to_is_refused_not_misread():
    blob = _serialized([(b"_lib", None)])
    with pytest.raises(RuntimeError, match="length header"):
        tvm_compat.fatbin_module_blob(blob + b"x", [], str.encode)


def test_missing_nvcc_is_an_error_naming_the_toolkit_before_any_work(monkeypatch, tmp_path):
    real_which = shutil.which
    monkeypatch.setattr(toolchain.shutil, "which", lambda name: None if name == "nvcc" else real_which(name))
    with pytest.raises(PipelineError, match="nvcc is not installed.*apt-get install nvidia-cuda-toolkit"):
        # The ONNX file does not even exist: the tool check comes first.
        backend.compile_onnx(tmp_path / "none.onnx", get_target("cuda-sm80"), tmp_path / "m.so")


@needs_nvcc
def test_an_nvcc_without_the_architecture_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(backend, "_nvcc_archs", lambda nvcc: ("compute_75", "compute_80"))
    with pytest.raises(PipelineError, match="cannot compile for sm_110.*compute_75, compute_80.*CUDA 13"):
        backend.compile_onnx(tmp_path / "none.onnx", get_target("jetson-thor"), tmp_path / "m.so")


# ---------------------------------------------------------------------------
# Slow: real builds of the micro model, no GPU needed


@pytest.fixture
def cuda_loader_probe():
    """Stand in for the CUDA runtime's module loader (absent without libcuda), recording
    what TVM's own library loader hands it: proof the file's module tree is well formed."""
    seen: list[dict] = []

    def load(data):
        data = bytes(data)
        (length,) = struct.unpack_from("<Q", data, 0)
        seen.append({"format": data[8:8 + length].decode(), "code": cuda_code.fatbin_entries(data)})
        return tvm.get_global_func("runtime.SourceModuleCreate")("", "cuda")

    previous = tvm_ffi.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True)
    if previous is not None:
        pytest.skip("a real CUDA runtime is loaded; the GPU tests cover loading")
    tvm_ffi.register_global_func("ffi.Module.load_from_bytes.cuda", load, override=True)
    yield seen
    tvm_ffi.remove_global_func("ffi.Module.load_from_bytes.cuda")


@needs_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("name, arch, machine", [("cuda-sm80", "sm_80", 62), ("jetson-orin", "sm_87", 183)])
def test_gpu_artifact_carries_sass_for_its_arch_and_no_cuda_source(tmp_path_factory, name, arch, machine):
    library = compiled(tmp_path_factory, name)
    data = library.read_bytes()
    code = [str(entry) for entry in cuda_code.cuda_device_code(library)]
    assert f"sass:{arch}" in code and f"ptx:{arch.replace('sm_', 'compute_')}" in code
    assert not [c for c in code if arch.split("_")[1] not in c], "code for another architecture"
    assert b"__global__" not in data, "CUDA source left in the library"
    assert elf_machine(library) == machine

    meta = json.loads(metadata_path(library).read_text())
    assert meta["target"] == name
    assert meta["target_json"] == get_target(name).tvm_target
    assert meta["device"] == "cuda"
    assert meta["host_triple"] == get_target(name).host_triple
    assert meta["device_code"] == code


@needs_nvcc
@pytest.mark.slow
def test_tvm_loads_the_library_and_finds_a_fatbin_module(tmp_path_factory, cuda_loader_probe):
    library = compiled(tmp_path_factory, "cuda-sm80")
    module = tvm.runtime.load_module(str(library))
    assert module.kind == "relax.VMExecutable"
    assert len(cuda_loader_probe) == 1
    assert cuda_loader_probe[0]["format"] == "fatbin"
    assert [str(c) for c in cuda_loader_probe[0]["code"]] == ["sass:sm_80", "ptx:compute_80"]


@needs_nvcc
@pytest.mark.slow
def test_cuda_build_with_separate_params(tmp_path_factory):
    library = compiled(tmp_path_factory, "cuda-sm75", params_mode="separate")
    assert "sass:sm_75" in [str(c) for c in cuda_code.cuda_device_code(library)]
    assert backend.params_path(library).is_file()


# ---------------------------------------------------------------------------
# Numerics by construction: no pow, no fast-math log in the device code


@needs_nvcc
@pytest.mark.slow
def test_cuda_source_beside_the_library_holds_no_pow_call(tmp_path_factory):
    """The micro model's channels-first LayerNorms square with ONNX Pow(x, 2); under nvcc's
    fast math that was exp2(2 * log2(x)), NaN for every negative x (all outputs on an H200)."""
    import onnx

    from edge_models import micro_onnx

    assert "Pow" in {node.op_type for node in onnx.load(str(micro_onnx(tmp_path_factory))).graph.node}
    library = compiled(tmp_path_factory, "cuda-sm80")
    source = backend.cuda_source_path(library).read_text()
    assert "__global__" in source
    assert not re.search(r"\b(__)?powf?\s*\(", source)
    meta = json.loads(metadata_path(library).read_text())
    assert meta["cuda"]["source"] == "model.cu"
    assert meta["cuda"]["fast_math"] is False
    assert "--use_fast_math" not in meta["cuda"]["nvcc_flags"]
    assert "arch=compute_80,code=[sm_80,compute_80]" in meta["cuda"]["nvcc_flags"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["cuda"]["nvcc_version"])


@needs_nvcc
@pytest.mark.slow
@pytest.mark.skipif(cuda_code.cuobjdump_path() is None, reason="cuobjdump is not installed")
def test_device_code_of_a_model_without_log_ops_has_no_log2_instruction(tmp_path_factory):
    """SASS and PTX read back from the artifact: the model has no log, so a log2 unit
    instruction (MUFU.LG2, lg2.approx) could only come from a fast-math pow."""
    library = compiled(tmp_path_factory, "cuda-sm80")
    sass = cuda_code.disassemble(library, "sass")
    ptx = cuda_code.disassemble(library, "ptx")
    assert "Function :" in sass and ".entry" in ptx  # real listings, not empty output
    assert "MUFU.LG2" not in sass
    assert "lg2." not in ptx


@needs_nvcc
@pytest.mark.slow
def test_the_32_pixel_demo_model_compiles_for_cuda(tmp_path):
    """A 32-pixel ConvNeXt reaches stage 4 at 1x1, where the 7x7 depthwise conv made dlight's
    GEMV rule assert (113-line traceback); the rule now declines and the next one applies."""
    from pipeline.model import create_model
    from pipeline.stages.export import export_onnx

    shape = (1, 1, 32, 32)
    onnx_path = tmp_path / "demo.onnx"
    export_onnx(create_model("micro", num_classes=10, in_chans=1).eval(), onnx_path, shape, opset=17,
                dynamic_batch=False)
    info = backend.compile_onnx(onnx_path, get_target("cuda-sm90"), tmp_path / "model.so", input_shape=shape)
    assert "sass:sm_90" in [str(c) for c in cuda_code.cuda_device_code(tmp_path / "model.so")]
    assert info["output"]["shape"] == [1, 10]


# ---------------------------------------------------------------------------
# GPU: the artifact runs and matches the CPU build


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA GPU")
def test_local_gpu_matches_the_cpu_build(tmp_path_factory):
    gpu = load_artifact(compiled(tmp_path_factory, "cuda"), device="cuda")
    cpu = load_artifact(compiled(tmp_path_factory, "x86"))
    x = sample()
    np.testing.assert_allclose(gpu.infer(x), cpu.infer(x), atol=1e-3, rtol=1e-3)
    gpu.check_target("cuda")
    with pytest.raises(PipelineError, match="built for target 'cuda'"):
        gpu.check_target("x86")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA GPU")
def test_fixed_arch_build_runs_on_a_matching_gpu(tmp_path_factory):
    local = get_target("cuda")
    fixed = [n for n in ("cuda-sm75", "cuda-sm80", "cuda-sm86", "cuda-sm89", "cuda-sm90")
             if get_target(n).cuda_arch == local.cuda_arch]
    if not fixed:
        pytest.skip(f"no fixed target for this GPU's {local.cuda_arch}")
    gpu = load_artifact(compiled(tmp_path_factory, fixed[0]), device="cuda")
    cpu = load_artifact(compiled(tmp_path_factory, "x86"))
    x = sample(1)
    np.testing.assert_allclose(gpu.infer(x), cpu.infer(x), atol=1e-3, rtol=1e-3)



# ---------------------------------------------------------------------------
# FP16


@needs_nvcc
@pytest.mark.slow
def test_fp16_build_computes_convolutions_and_matmuls_in_half(tmp_path_factory):
    from edge_models import SHAPE, micro_onnx

    out = tmp_path_factory.mktemp("fp16")
    backend.compile_onnx(
        micro_onnx(tmp_path_factory), get_target("cuda-sm80"), out / "model.so",
        input_shape=SHAPE, precision="fp16", dump_ir_dir=out / "ir",
    )
    (rewritten,) = (out / "ir").glob("*_fp16.py")
    text = rewritten.read_text()
    # Operands in float16, accumulation and the model's interface in float32.
    assert 'R.nn.conv2d(' in text and 'R.matmul(' in text
    assert text.count('"float16"') > 10
    assert 'out_dtype="float32"' in text
    meta = json.loads(metadata_path(out / "model.so").read_text())
    assert meta["input"]["dtype"] == "float32" and meta["output"]["dtype"] == "float32"
    assert "sass:sm_80" in meta["device_code"]


@needs_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("params_mode", ["embedded", "separate"])
def test_fp16_weights_are_stored_in_half_and_not_cast_per_call(tmp_path_factory, params_mode):
    from edge_models import SHAPE, micro_onnx

    out = tmp_path_factory.mktemp(f"fp16-{params_mode}")
    backend.compile_onnx(
        micro_onnx(tmp_path_factory), get_target("cuda-sm80"), out / "model.so",
        input_shape=SHAPE, precision="fp16", params_mode=params_mode, dump_ir_dir=out / "ir",
    )
    (fused,) = (out / "ir").glob("*_fuse.py")
    main = fused.read_text().split("def main(", 1)[1]
    # What is cast first in a kernel: the input, and the residual stream each depthwise
    # convolution reads (fused into it, pipeline/compiler/cast_fusion.py); never a weight.
    casts = re.findall(r"R\.call_tir\(cls\.(?:fused_)?cast\w*, \(([^,)]+)", main)
    assert casts, "the input is still cast once"
    if params_mode == "embedded":
        assert not [arg for arg in casts if arg.startswith("metadata")], "a constant cast per call"
        return
    with np.load(backend.params_path(out / "model.so")) as weights:
        dtypes = {name: str(weights[name].dtype) for name in weights.files}
        sizes = {name: weights[name].size for name in weights.files}
    # Convolution and GEMM weights are read in half, the rest (biases, norms, the head's
    # float32 GEMM) as float32: almost every weight is stored in half.
    assert dtypes["stages.0.0.dwconv.weight"] == dtypes["downsample_layers.0.0.weight"] == "float16"
    assert sum(n for name, n in sizes.items() if dtypes[name] == "float16") > 0.95 * sum(sizes.values())
    weight_vars = {name.replace(".", "_") for name in dtypes}
    assert not [arg for arg in casts if arg in weight_vars], "a weight cast per call"


def test_fp16_is_refused_for_cpu_targets(tmp_path_factory):
    from edge_models import SHAPE, micro_onnx

    with pytest.raises(PipelineError, match="fp16 is for GPU targets"):
        backend.compile_onnx(
            micro_onnx(tmp_path_factory), get_target("x86"), tmp_path_factory.mktemp("x") / "m.so",
            input_shape=SHAPE, precision="fp16",
        )


# ---------------------------------------------------------------------------
# INT8


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA GPU")
def test_int8_gpu_build_matches_the_int8_cpu_build(tmp_path_factory):
    """The same integer kernels on the GPU and the CPU: the same logits up to float epilogues.

    GPU targets do not offer int8 (targets.GPU_INT8_REASON: 5.6x slower than fp16 on an H200
    without integer tensor cores), so the pipeline never builds this; the low-level compiler
    still does, and this keeps that path right for when integer tensor-core kernels land."""
    from test_tvm_int8 import quantized

    out = tmp_path_factory.mktemp("int8-gpu")
    qdq = quantized(out)
    backend.compile_onnx(qdq, get_target("cuda"), out / "gpu.so", precision="int8")
    backend.compile_onnx(qdq, get_target("x86"), out / "cpu.so", precision="int8")
    gpu = load_artifact(out / "gpu.so", device="cuda")
    cpu = load_artifact(out / "cpu.so")
    x = np.random.default_rng(0).standard_normal(cpu.input_shape, dtype=np.float32)
    np.testing.assert_allclose(gpu.infer(x), cpu.infer(x), atol=1e-3, rtol=1e-3)


def test_int8_gemms_skip_dlights_tensor_core_matmul_rule():
    """dlight's Matmul schedules int8 GEMMs with tensor cores that TVM 0.27 cannot lower
    (ConvNeXt-T INT8 failed for every CUDA target); float GEMMs still get it."""
    from tvm import te

    target = tvm.target.Target(get_target("cuda-sm80").tvm_target)

    def gemm(dtype: str, out_dtype: str):
        a = te.placeholder((256, 256), dtype, name="a")
        b = te.placeholder((256, 256), dtype, name="b")
        k = te.reduce_axis((0, 256), name="k")
        c = te.compute((256, 256), lambda i, j: te.sum(a[i, k].astype(out_dtype) * b[k, j].astype(out_dtype), axis=k))
        return te.create_prim_func([a, b, c])

    rule = gpu_schedules.FloatMatmul()
    assert rule.apply(gemm("int8", "int32"), target, False) is None
    assert rule.apply(gemm("float32", "float32"), target, False) is not None


# ---------------------------------------------------------------------------
# What each GPU kernel must cost at least


@needs_nvcc
@pytest.mark.slow
def test_compile_states_each_gpu_kernels_roofline_bound(tmp_path_factory):
    """FLOPs, bytes and the time they take at the H200's rates, per kernel and in all,
    counted on the unscheduled kernels; the pointwise GEMMs hold at least 2 M N K FLOPs."""
    from edge_models import SHAPE, micro_onnx

    info = backend.compile_onnx(micro_onnx(tmp_path_factory), get_target("cuda-sm80"),
                                tmp_path_factory.mktemp("cost") / "model.so", input_shape=SHAPE)
    cost = info["gpu_cost"]
    kernels = {k["kernel"]: k for k in cost["kernels"]}
    assert cost["launches"] == sum(k["calls"] for k in kernels.values()) >= len(kernels) > 10
    for kernel in kernels.values():
        assert kernel["bytes"] > 0 and kernel["roofline_us"] > 0 and kernel["bound"] in ("compute", "memory")
        rate = cost["rates"]["fp32_flops"]
        assert kernel["roofline_us"] == pytest.approx(
            max(kernel["flops"] / rate, kernel["bytes"] / cost["rates"]["memory_bytes"]) * 1e6, abs=1e-6)
    # Stage 0's first expand GEMM of the micro model at 64x64: 16x16 pixels, 16 -> 64 channels.
    expand = [k for name, k in kernels.items() if name.startswith("fused_matmul") and "erf" in name]
    assert max(k["flops"] for k in expand) >= 2 * 16 * 16 * 16 * 64
    assert cost["roofline_ms"] == pytest.approx(sum(k["roofline_us"] * k["calls"] for k in kernels.values()) / 1e3,
                                                abs=1e-3)
    assert "gpu_cost" not in info["tuning"]
    x86 = backend.compile_onnx(micro_onnx(tmp_path_factory), get_target("x86"),
                               tmp_path_factory.mktemp("cost-cpu") / "model.so", input_shape=SHAPE)
    assert "gpu_cost" not in x86
