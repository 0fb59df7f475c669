"""The default GPU schedules (pipeline/compiler/schedules/gpu*.py), checked without a GPU:
tile choices from the shapes, and on ConvNeXt-T (224x224, fp16, batch 1, cuda-sm90) the
scheduled kernels' grids, the CUDA source and SASS nvcc made of them, and the CUDA graph."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm

from pipeline.compiler import cuda_code, gpu_cost_model
from pipeline.compiler.schedules import gpu_depthwise, gpu_row_reduction
from edge_models import seeded_simplified_onnx
from targets import SM_COUNTS, get_target

# ConvNeXt-T per stage at 224x224: (side, channels); GEMMs per image: (M, K, N).
CONVNEXT_T_STAGES = ((56, 96), (28, 192), (14, 384), (7, 768))
CONVNEXT_T_GEMMS = (
    (3136, 48, 96), (3136, 96, 384), (3136, 384, 96), (784, 384, 192), (784, 192, 768), (784, 768, 192),
    (196, 768, 384), (196, 384, 1536), (196, 1536, 384), (49, 1536, 768), (49, 768, 3072), (49, 3072, 768),
)
H200_SMS = SM_COUNTS["sm_90"]


# ---------------------------------------------------------------------------
# Fast: tiles from shapes


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("side, channels", CONVNEXT_T_STAGES)
def test_depthwise_tiles_fill_every_sm_of_an_h200_with_many_outputs_per_block(batch, side, channels):
    tile = gpu_depthwise.choose_tile(batch, side, side, channels, H200_SMS)
    assert side % tile.rows == 0 and side % tile.pixels == 0 and channels % tile.channels == 0
    assert 32 <= tile.threads <= 512
    assert tile.blocks(batch, side, side, channels) >= H200_SMS
    assert tile.threads * tile.pixels_per_thread >= 32  # outputs per block


def test_depthwise_tile_on_a_small_gpu_keeps_wide_channel_tiles():
    """Orin's 16 SMs are filled by wide tiles: channel tiles grow as the SM count shrinks."""
    orin = gpu_depthwise.choose_tile(1, 56, 56, 96, SM_COUNTS["sm_87"])
    h200 = gpu_depthwise.choose_tile(1, 56, 56, 96, H200_SMS)
    assert orin.channels >= h200.channels
    assert orin.blocks(1, 56, 56, 96) >= SM_COUNTS["sm_87"]


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("m, k, n", CONVNEXT_T_GEMMS)
def test_gemm_tiles_fill_every_sm_of_an_h200(batch, m, k, n):
    tile = gpu_cost_model.choose_tile(batch * m, n, H200_SMS)
    assert gpu_cost_model.grid_blocks(batch * m, n, tile) >= H200_SMS
    larger = gpu_cost_model.TILES[:gpu_cost_model.TILES.index(tile)]
    assert all(gpu_cost_model.grid_blocks(batch * m, n, t) < H200_SMS for t in larger)  # the largest that fills


def test_gemm_tile_is_the_smallest_when_nothing_fills_the_gpu():
    assert gpu_cost_model.choose_tile(16, 16, H200_SMS) == gpu_cost_model.TILES[-1]


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("side, channels", CONVNEXT_T_STAGES)
def test_layer_norm_blocks_hold_rows_of_one_image_row_and_fill_the_sms_where_rows_allow(batch, side, channels):
    rows = batch * side * side
    per_block = gpu_row_reduction.choose_rows_per_block(rows, side, H200_SMS)
    assert side % per_block == 0  # a block's rows never straddle two image rows
    assert rows // per_block >= H200_SMS or per_block == 1
    if rows >= 8 * H200_SMS and side % 8 == 0:
        assert per_block == 8  # ConvNeXt-T's stage 0: 256-thread blocks


def _softmax_kernel(axis: int) -> tvm.tirx.PrimFunc:
    from tvm import relax
    from tvm.script import relax as R

    builder = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((2, 8, 64), "float32"))
    with builder.function("main", [x]):
        builder.emit_func_output(builder.emit(relax.op.nn.softmax(x, axis=axis)))
    legalized = relax.transform.LegalizeOps()(builder.get())
    return next(f for _, f in legalized.functions_items() if isinstance(f, tvm.tirx.PrimFunc))


def test_row_reduction_rule_takes_reductions_over_the_innermost_axis_only():
    """A softmax over the last axis is rows like a LayerNorm's: a warp per row, results in
    registers. Over another axis the elementwise pass reads a result per column: declined,
    for dlight's rules."""
    rows = gpu_row_reduction.row_reduction_schedule(_softmax_kernel(-1), H200_SMS)
    assert rows is not None
    script = rows.mod.script()
    assert 'thread="threadIdx.y"' in script and 'T.thread_binding(T.int64(32), thread="threadIdx.x")' in script
    assert 'scope="local"' in script and 'scope="shared"' not in script
    assert gpu_row_reduction.row_reduction_schedule(_softmax_kernel(1), H200_SMS) is None


def _layer_norm_kernel(shape: tuple[int, ...]) -> tvm.tirx.PrimFunc:
    from tvm import relax
    from tvm.script import relax as R

    builder = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor(shape, "float32"))
    gamma, beta = relax.Var("gamma", R.Tensor(shape[-1:], "float32")), relax.Var("beta", R.Tensor(shape[-1:], "float32"))
    with builder.function("main", [x, gamma, beta]):
        builder.emit_func_output(builder.emit(relax.op.nn.layer_norm(x, gamma, beta, axes=[-1])))
    legalized = relax.transform.LegalizeOps()(builder.get())
    return next(f for _, f in legalized.functions_items() if isinstance(f, tvm.tirx.PrimFunc))


@pytest.mark.parametrize("shape", [
    (1, 56, 56, 96), (8, 56, 56, 96), (8, 28, 28, 192), (8, 14, 14, 384), (8, 7, 7, 768),  # ConvNeXt-T
    (8, 8, 8, 16), (3, 16, 16, 40), (2, 1, 1, 320), (1, 768), (8, 768),  # micro b8, atto, heads
])
def test_layer_norms_of_any_batch_get_a_warp_per_row(shape):
    from pipeline.compiler.schedules.gpu import launch_shape

    scheduled = gpu_row_reduction.row_reduction_schedule(_layer_norm_kernel(shape), H200_SMS)
    assert scheduled is not None
    blocks, threads = launch_shape(scheduled.mod["main"])
    rows = int(np.prod(shape[:-1]))
    assert threads % 32 == 0 and blocks * threads // 32 == rows  # one warp per row, every row once


def test_every_gpu_target_names_its_sm_count():
    from targets import known_targets

    for name in known_targets():
        target = get_target(name)
        if target.device == "cuda" and target.unavailable is None:
            assert target.sm_count and target.sm_count >= 16, name


# ---------------------------------------------------------------------------
# Slow: ConvNeXt-T compiled for an H200

_T_SHAPE = (1, 3, 224, 224)


@pytest.fixture(scope="module")
def convnext_t(tmp_path_factory):
    """ConvNeXt-T (1000 classes, fp16) for cuda-sm90: the compile info, the finalized
    module's text, the CUDA source and the library."""
    from pipeline.compiler import backend
    from pipeline.model import create_model
    from pipeline.stages.export import export_onnx

    folder = tmp_path_factory.mktemp("convnext-t-cuda")
    onnx_path = folder / "tiny.onnx"
    export_onnx(create_model("tiny", num_classes=1000).eval(), onnx_path, _T_SHAPE, opset=17, dynamic_batch=False)
    info = backend.compile_onnx(onnx_path, get_target("cuda-sm90"), folder / "model.so", precision="fp16",
                                input_shape=_T_SHAPE, dump_ir_dir=folder / "ir")
    finalize_dump = next(p for p in (folder / "ir").iterdir() if p.stem.endswith("_finalize"))
    return {
        "info": info,
        "finalized": finalize_dump.read_text(),
        "source": (folder / "model.cu").read_text(),
        "library": folder / "model.so",
    }


def _kernels(convnext_t, word: str) -> dict[str, dict]:
    """compile's record of each kernel whose name holds ``word``: rule, blocks, threads."""
    return {k["kernel"]: k for k in convnext_t["info"]["gpu_cost"]["kernels"] if word in k["kernel"]}


def _kernel_source(source: str, name: str) -> str:
    """The body of kernel ``name`` in the CUDA source (up to the next kernel)."""
    start = source.index(f" {name}_kernel(", source.index(f" {name}_kernel(") + 1)
    end = source.find('extern "C" __global__', start)
    return source[start:end if end > 0 else len(source)]


@pytest.mark.slow
def test_convnext_t_depthwise_kernels_use_shared_tiles_and_fill_the_sms(convnext_t):
    depthwise = _kernels(convnext_t, "conv2d")
    assert len(depthwise) == 4  # one per stage
    for name, kernel in depthwise.items():
        assert kernel["rule"] == "DepthwiseNHWC", name
        assert kernel["blocks"] >= H200_SMS and 32 <= kernel["threads"] <= 512, kernel
        body = _kernel_source(convnext_t["source"], name)
        assert "__shared__" in body, name  # the input tile with its halo
        assert "__syncthreads" in body, name
        assert "half pad_temp_shared" in body, name  # float16 in, float32 accumulators
        # The tile is copied 4 channels per thread and instruction, in and out.
        assert re.search(r"\*\((float4|half4|uint2)\*\)\(\w+_ptr \+", body), name
        assert re.search(r"\*\((half4|uint2)\*\)\(pad_temp_shared_ptr \+", body), name
    assert not [k for k in _kernels(convnext_t, "") if re.fullmatch(r"cast\d*", k)]  # no kernel only casts


@pytest.mark.slow
def test_convnext_t_gemms_run_on_tensor_cores_with_async_copies_and_fill_the_sms(convnext_t):
    # Every matmul but the classifier head (M = 1, 1.5 MFLOP: a GEMV); the smallest GEMM
    # (stage 4 at batch 1) is 2 x 49 x 768 x 1536 = 116 MFLOP.
    gemms = {name: k for name, k in _kernels(convnext_t, "matmul").items() if k["flops"] > 10e6}
    assert len(gemms) >= 12
    for name, kernel in gemms.items():
        assert kernel["rule"] == "TensorCoreMatmul", name
        assert kernel["blocks"] >= H200_SMS and kernel["threads"] >= 32, kernel
        body = _kernel_source(convnext_t["source"], name)
        assert "wmma::mma_sync" in body, name
        assert re.search(r"cp_async\w*_16", body), name  # 16-byte cp.async (a PTX helper TVM emits)
        assert "cp_async_wait_group" in body, name  # ... pipelined: waits for the older stage only
        # compile's info holds what the GPU check's kernel table sets the measured time beside.
        assert len(kernel["gemm"]) == 4 and kernel["modeled_steps"] > 0 and len(kernel["tile"]) == 2, kernel
    # GEMMs of few rows and deep K are split (pipeline/compiler/split_k.py): stage 3's project
    # GEMM (K 3072) is a batch of partial GEMMs over K.
    split = [k for name, k in gemms.items() if name.startswith("split_k_matmul") and k["gemm"][3] * k["gemm"][0] == 3072]
    assert split and all(k["gemm"][0] > 1 for k in split), split


@pytest.mark.slow
def test_convnext_t_has_at_most_60_kernels_and_runs_as_a_cuda_graph(convnext_t):
    kernels = set(re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', convnext_t["source"]))
    assert len(kernels) <= 60
    assert convnext_t["info"]["cuda_graph_captures"] == 1
    assert "vm.builtin.cuda_graph.run_or_capture" in convnext_t["finalized"]


@pytest.mark.slow
def test_convnext_t_with_separate_weights_reads_them_as_saved(tmp_path):
    """--params separate: the weights are saved in the layout and dtype the kernels read, so
    no kernel transposes, reshapes or casts a weight per call, and the kernels stay <= 60."""
    from pipeline.compiler import backend

    onnx_path = seeded_simplified_onnx(tmp_path / "tiny.onnx", "tiny", 1000, _T_SHAPE)
    info = backend.compile_onnx(onnx_path, get_target("cuda-sm90"), tmp_path / "model.so", precision="fp16",
                                params_mode="separate", input_shape=_T_SHAPE)
    kernels = {k["kernel"] for k in info["gpu_cost"]["kernels"]}
    assert len(kernels) <= 60
    # What layout kernels remain cut the three downsampling layers' inputs into patches.
    layout_only = [k for k in kernels if re.fullmatch(r"(fused_)?((transpose|reshape)\d*_?)+", k)]
    assert len(layout_only) <= 3, layout_only
    # The float32 residual stream is read by the depthwise kernels as it is and converted on
    # the copy into their float16 tiles (pipeline/compiler/cast_fusion.py): no kernel only casts.
    assert not [k for k in kernels if re.fullmatch(r"cast\d*", k)]
    depthwise = [k for k in info["gpu_cost"]["kernels"] if "conv2d" in k["kernel"]]
    assert len(depthwise) == 4 and all(k["kernel"].startswith("fused_cast") for k in depthwise), depthwise
    source = (tmp_path / "model.cu").read_text()
    for kernel in depthwise:  # 16-byte loads of the float32 input, converted on the copy
        assert re.search(r"\*\(float4\*\)\(\w+_ptr \+", _kernel_source(source, kernel["kernel"])), kernel["kernel"]
    # 105 with a cast kernel before each depthwise conv; a split GEMM (split_k.py) adds the
    # kernel of its partial sums.
    split_launches = sum(k["calls"] for k in info["gpu_cost"]["kernels"] if k["kernel"].startswith("split_k_matmul"))
    assert info["gpu_cost"]["launches"] - split_launches <= 90
    assert info["cuda_graph_captures"] == 1
    with np.load(tmp_path / "model.params.npz") as weights:
        depthwise = [weights[n] for n in weights.files if "dwconv" in n and "weight" in n]
        assert depthwise and all(w.shape[:2] == (7, 7) and w.dtype == np.float16 for w in depthwise)  # HWOI


@pytest.mark.slow
def test_no_convnext_t_kernel_is_left_to_the_generic_rules(convnext_t):
    """dlight's GeneralReduction and Fallback rules are what made the depthwise convs slow;
    what they may still get is a mean or an elementwise kernel."""
    for name, kernel in _kernels(convnext_t, "").items():
        if kernel["rule"] in ("GeneralReduction", "Fallback"):
            assert "conv2d" not in name and "matmul" not in name and "layer_norm" not in name, kernel


@pytest.mark.slow
def test_convnext_t_layer_norms_are_a_warp_per_pixel_with_shuffle_reductions_in_registers(convnext_t):
    norms = _kernels(convnext_t, "layer_norm")
    assert len(norms) >= 6  # the stem's, three downsampling layers', the blocks' per stage, the head's
    for name, kernel in norms.items():
        assert kernel["rule"] == "RowReductionPerWarp", kernel
        assert kernel["threads"] % 32 == 0 and kernel["threads"] <= 256, kernel
        body = _kernel_source(convnext_t["source"], name)
        assert body.count("__shfl_down_sync") == 10, name  # two reductions, five steps each
        # Results in registers: no shared memory, so no barrier for TVM's sync planner to miss.
        assert "__shared__" not in body and "__syncthreads" not in body, name
    stage_0 = [k for k in norms.values() if k["flops"] > 1e6 and k["blocks"] * k["threads"] == 56 * 56 * 32]
    assert stage_0 and all(k["threads"] == 256 for k in stage_0)  # 8 pixels per block


@pytest.mark.slow
@pytest.mark.skipif(cuda_code.cuobjdump_path() is None, reason="cuobjdump is not installed")
def test_convnext_t_gemm_machine_code_holds_tensor_core_and_async_copy_instructions(convnext_t):
    sass = cuda_code.disassemble(convnext_t["library"], "sass")
    assert "HMMA" in sass
    assert "LDGSTS" in sass  # cp.async


@pytest.mark.slow
def test_every_convnext_t_kernel_computes_on_the_cuda_emulator_what_its_cpu_build_does(tmp_path):
    """The H200 kernels of ConvNeXt-T fp16 batch 1, as the GPU bundle compiles them (seeded
    weights passed separately, simplified ONNX), each run on this CPU by the CUDA emulator
    (pipeline/verify/cuda_emulator/)."""
    from pipeline.verify.cuda_emulator import gpu_build, kernel_check

    onnx_path = seeded_simplified_onnx(tmp_path / "tiny.onnx", "tiny", 1000, _T_SHAPE)
    kernels = gpu_build.model_gpu_kernels(onnx_path, get_target("cuda-sm90"), precision="fp16", input_shape=_T_SHAPE)
    results = kernel_check.check_kernels(kernels)
    failed = [f"{r.kernel} ({r.rule}): {r.status}, {r.detail}" for r in results if r.status != "match"]
    assert not failed, "\n".join(failed)
    # 28 kernels, and 4 more: four GEMM shapes are split-K (pipeline/compiler/split_k.py),
    # a partial GEMM and a kernel of its sum and epilogue each.
    assert len(results) == 32
    assert sum(r.rule == "PartialSums" for r in results) == 4
    assert sum(r.rule == "TensorCoreMatmul" for r in results) == 12  # the head at batch 1 is a GEMV
