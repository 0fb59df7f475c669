"""ONNX -> TVM Relax -> shared library: the only module that touches TVM's compiler.

TVM's Python API moves between releases (0.27 renamed half of it), so every
compiler import lives here, and each quirk of the pinned version carries a
comment that starts with "TVM 0.27:". Running an artifact needs none of this:
see ``pipeline/runtime_only.py``, which this module reuses for ``load_artifact``.

Artifact layout (all in the library's directory, written atomically):

    model.so            the VM executable and its kernels (weights too, if "embedded")
    model.so.json       metadata the runtime reads: target, input/output, params order
    model.params.npz    weights, only for params_mode="separate"
    model.cu            CUDA targets: the kernels' source, as nvcc compiled it (for reading)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import tvm
from tvm import relax

# TVM 0.27: MetaSchedule moved to tvm.s_tir.meta_schedule and dlight to tvm.s_tir.dlight.
from tvm.s_tir import dlight

from pipeline import cuda_nvcc
from pipeline import runtime_only
from pipeline import tvm_graph_rewrites
from pipeline import tvm_layout
from pipeline import tvm_prepack
from pipeline.errors import PipelineError
from pipeline.runtime_only import LoadedArtifact, metadata_path
from targets import Target

log = logging.getLogger(__name__)

PARAMS_MODES = ("embedded", "separate")


def params_path(library_path: Path) -> Path:
    """Where the weights of a params_mode="separate" library live: ``<stem>.params.npz``."""
    return library_path.with_name(f"{library_path.stem}.params.npz")


def cuda_source_path(library_path: Path) -> Path:
    """Where a CUDA library's kernel source lives: ``<stem>.cu``."""
    return library_path.with_name(f"{library_path.stem}.cu")


# ---------------------------------------------------------------------------
# ONNX loading and input resolution


def _load_onnx(onnx_path: Path) -> onnx.ModelProto:
    if not onnx_path.is_file():
        raise PipelineError(f"ONNX model {onnx_path} does not exist; re-run `pipeline export`")
    try:
        model = onnx.load(str(onnx_path))
        # An empty or truncated file can parse as an empty ModelProto; the checker catches it.
        onnx.checker.check_model(model)
    except Exception as exc:  # DecodeError, ValidationError, OSError: all mean "bad file"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(
            f"{onnx_path} is not a valid ONNX model: {reason}; re-run `pipeline export`"
        ) from None
    return model


def _resolve_input(
    model: onnx.ModelProto, input_name: str | None, input_shape: tuple[int, ...] | None
) -> tuple[str, tuple[int, ...], str]:
    """Pick the graph input and fix its shape: (name, static shape, numpy dtype name)."""
    initializers = {init.name for init in model.graph.initializer}
    # Old exporters list weights among the graph inputs too; those are not real inputs.
    inputs = [i for i in model.graph.input if i.name not in initializers]
    names = [i.name for i in inputs]
    if input_name is None:
        if len(inputs) != 1:
            raise PipelineError(
                f"the ONNX model has {len(inputs)} inputs ({', '.join(names)}); "
                f"name one with input_name"
            )
        graph_input = inputs[0]
    else:
        matches = [i for i in inputs if i.name == input_name]
        if not matches:
            raise PipelineError(
                f"the ONNX model has no input '{input_name}'; its inputs are: {', '.join(names)}"
            )
        graph_input = matches[0]

    tensor_type = graph_input.type.tensor_type
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
    # A dim is either a positive int (static) or a symbol such as "batch" (dynamic).
    dims: list[int | str] = [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
        for d in tensor_type.shape.dim
    ]
    model_shape = "(" + ", ".join(str(d) for d in dims) + ")"

    if input_shape is None:
        dynamic = [d for d in dims if isinstance(d, str)]
        if dynamic:
            raise PipelineError(
                f"input '{graph_input.name}' has dynamic dims {model_shape}; "
                f"pass a static input_shape, e.g. batch 1"
            )
        return graph_input.name, tuple(int(d) for d in dims), dtype

    shape = tuple(int(d) for d in input_shape)
    fits = len(shape) == len(dims) and all(
        isinstance(d, str) or d == s for d, s in zip(dims, shape)
    )
    if not fits or any(s <= 0 for s in shape):
        raise PipelineError(
            f"input_shape {shape} does not match input '{graph_input.name}' of the ONNX model, "
            f"which is {model_shape}"
        )
    return graph_input.name, shape, dtype


def _import_relax(
    model: onnx.ModelProto, onnx_path: Path, name: str, shape: tuple[int, ...], dtype: str
) -> tuple[tvm.IRModule, list[str], list[tvm.runtime.Tensor]]:
    """ONNX -> Relax with weights as function inputs: (module, param names, param values)."""
    # Imported here: the frontend pulls in the onnx converter tables only when compiling.
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.onnx import from_onnx

    try:
        # keep_params_in_input=True makes every initializer a parameter of "main" after the
        # real input (its count is in the "num_input" attribute) and puts the values in the
        # function's "params" attribute; detach_params takes them out again.
        mod = from_onnx(
            model, shape_dict={name: list(shape)}, dtype_dict={name: dtype},
            keep_params_in_input=True,
        )
    except tvm.error.OpNotImplemented as exc:
        # TVM 0.27: the message reads "The following operators are not supported for
        # frontend ONNX: Celu, ..." and so already names the operators.
        raise PipelineError(
            f"{onnx_path} uses operators TVM {tvm.__version__} cannot import: "
            f"{str(exc).split(':', 1)[-1].strip().splitlines()[0]}"
        ) from None
    except Exception as exc:  # the importer raises bare ValueError/TVMError on odd graphs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"TVM could not import {onnx_path}: {first}") from exc
    mod, params = detach_params(mod)
    main = mod["main"]
    num_input = int(main.attrs["num_input"])
    # TVM 0.27: relax.Var's name is `.name` (was `.name_hint`) and its type is `.ty`
    # (was `.struct_info`); the frontend strips a leading "onnx::" from weight names.
    param_names = [str(var.name) for var in main.params[num_input:]]
    return mod, param_names, list(params.get("main", []))


def _output_spec(mod: tvm.IRModule) -> dict[str, Any]:
    # TVM 0.27: a function's return type is `.ret_ty` (was `.ret_struct_info`).
    ret = mod["main"].ret_ty
    if not isinstance(ret, relax.TensorType) or ret.shape is None:
        raise PipelineError(f"the model must have exactly one tensor output; TVM sees {ret}")
    return {"shape": [int(d) for d in ret.shape], "dtype": str(ret.dtype)}


# ---------------------------------------------------------------------------
# The Relax pipeline, written out


class _FloatMatmul(dlight.gpu.Matmul):
    """dlight's GPU matmul rule for float kernels only. On int8 operands (pipeline/tvm_int8.py)
    its tensor-core schedule fails to lower in TVM 0.27 ("fragment_info" check in the TIR
    pipeline, ConvNeXt-T's INT8 GEMMs); those kernels get dlight's other rules instead."""

    def apply(self, func, target, tunable):
        if isinstance(func, tvm.tirx.PrimFunc):
            from tvm.s_tir.meta_schedule.arg_info import ArgInfo

            if any(str(info.dtype) in ("int8", "uint8") for info in ArgInfo.from_prim_func(func)):
                return None
        return super().apply(func, target, tunable)


class _GEMV(dlight.gpu.GEMV):
    """dlight's GPU GEMV rule, falling through to the next rule where it cannot apply.

    TVM 0.27: the rule's normalize() asserts that a GEMV-like kernel has a spatial loop
    instead of declining it; a 7x7 depthwise convolution on a 1x1 feature map (every
    32-pixel ConvNeXt at stage 4) has none, and the assert aborted the whole build. A rule
    that declines returns None, which is what this does there.
    """

    def apply(self, func, target, tunable):
        try:
            return super().apply(func, target, tunable)
        except AssertionError:
            return None


def relax_phases(target: tvm.target.Target) -> list[tuple[str, list[tvm.transform.Pass]]]:
    """The Relax passes from an imported graph to VM-ready code, in order, per phase.

    This follows TVM's own per-target pipeline (relax/backend/cpu_generic/pipeline.py)
    rather than relax.build's "default", because on CPU that default skips fusion
    (TVM 0.27: vm_build.py keeps the unfused pipeline for CPU because fusion can drop
    side-effecting call_pure_packed calls; ONNX vision graphs have none).
    """
    transform = relax.transform
    is_gpu = "gpu" in target.keys
    return [
        # Simplify: split composite ops (batch_norm, attention) into basic ones, drop
        # trivial bindings so that legalization sees plain ops; x ** 2 (channels-first
        # LayerNorm) becomes x * x, exact for negative x where a fast pow is NaN
        # (pipeline/tvm_graph_rewrites.py).
        ("simplify", [
            transform.DecomposeOpsForInference(),
            transform.CanonicalizeBindings(),
            tvm_graph_rewrites.integer_power_to_multiply(),
        ]),
        # Channels last (CPU): NCHW convolutions compute in NHWC so that the transposes
        # around ConvNeXt's LayerNorms cancel and channel reductions read contiguous
        # memory (pipeline/tvm_layout.py). GPU targets keep NCHW until measured on one.
        ("channels_last", [] if is_gpu else [tvm_layout.channels_last_pass()]),
        # Library dispatch: route sampling/sort ops to hand-written kernels (a no-op for
        # CNNs, kept so that the list matches TVM's own CPU pipeline).
        ("dispatch", [relax.backend.DispatchSampling(), relax.backend.DispatchSortScan()]),
        # Fast math: erf (GELU), exp and tanh become polynomial approximations that LLVM
        # vectorizes (float32 error ~1e-7 relative, ~2e-6 on ConvNeXt-T logits). The libm
        # erf is a scalar call per element and took more time than the 1x1-conv GEMMs it
        # is fused into (ConvNeXt-atto, znver4: 34 ms -> 24 ms per image untuned).
        ("fast_math", [transform.FastMathTransform()]),
        # Legalize: every Relax op becomes a call_tir to a TE-generated PrimFunc; constant
        # subgraphs (weight transposes of embedded params) are evaluated now.
        ("legalize", [
            transform.LegalizeOps(),
            transform.AnnotateTIROpPattern(),
            transform.FoldConstant(),
        ]),
        # Fuse: group elementwise/injective ops into their producers and merge each group
        # into one PrimFunc. A tuning database would be applied right after this phase.
        # Weights marked layout free (CPU): a tuned kernel may read them packed in its
        # tiles' order, packed once after scheduling (pipeline/tvm_prepack.py).
        ("fuse", [transform.FuseOps(), transform.FuseTIR(), *([] if is_gpu else [tvm_prepack.mark_weights()])]),
        # Schedule: GPU kernels need thread bindings, which dlight's default rules give
        # (untested until a GPU target exists). CPU PrimFuncs were scheduled right after
        # fusion: tuning records or default schedules (compile_onnx, pipeline/tvm_tuning.py).
        ("schedule", [dlight.ApplyDefaultSchedule(
            _FloatMatmul(), _GEMV(), dlight.gpu.Reduction(),
            dlight.gpu.GeneralReduction(), dlight.gpu.Fallback(),
        )] if is_gpu else []),
        # Dataflow lowering: leave the pure dataflow world; call_tir becomes explicit
        # output allocation plus a call.
        ("lower_dataflow", [
            transform.RewriteDataflowReshape(),
            transform.ToNonDataflow(),
            transform.RemovePurityChecking(),
            transform.CallTIRRewrite(),
        ]),
        # VM finalization: plan and reuse memory statically, free after last use, lower
        # builtins and shape computations to VM instructions, name the entry points.
        ("finalize", [
            transform.StaticPlanBlockMemory(),
            transform.LowerAllocTensor(),
            transform.KillAfterLastUse(),
            transform.LowerRuntimeBuiltin(),
            transform.ComputePrimValue(),
            transform.VMShapeLower(),
            transform.AttachGlobalSymbol(),
        ]),
    ]


def precision_phases(precision: str, target: Target) -> list[tuple[str, list[tvm.transform.Pass]]]:
    """Passes that change the arithmetic precision, run before legalization.

    FP16: convolutions and matmuls take float16 operands and accumulate in float32
    (ToMixedPrecision's out_dtype), the rest of the graph follows the float16 values where
    it is numerically safe; the model's input and output stay float32. Only GPU targets
    offer it: their tensor cores are where FP16 pays off. Weights passed in at run time
    (params_mode="separate") become float16 parameters, cast once when they are saved.
    """
    if precision in ("fp32", "int8"):
        return []
    if precision != "fp16":
        raise PipelineError(f"unknown precision '{precision}'; use fp32, fp16 or int8")
    if target.device != "cuda":
        raise PipelineError(f"precision fp16 is for GPU targets, not '{target.name}'; use --precision fp32 or int8")
    return [("fp16", [
        relax.transform.ToMixedPrecision(out_dtype="float32"),
        tvm_graph_rewrites.cast_weight_params_once(),
    ])]


def _dump(dump_ir_dir: Path | None, index: int, phase: str, mod: tvm.IRModule) -> None:
    if dump_ir_dir is not None:
        dump_ir_dir.mkdir(parents=True, exist_ok=True)
        (dump_ir_dir / f"{index:02d}_{phase}.py").write_text(mod.script())


def _count_primfuncs(mod: tvm.IRModule) -> int:
    # TVM 0.27: TIR lives in tvm.tirx (was tvm.tir).
    return sum(isinstance(func, tvm.tirx.PrimFunc) for func in mod.functions.values())


def _link_function(target: Target):
    """The export_library fcompile: None (host cc) or the target's cross compiler."""
    if target.cross_compiler is None:
        return None
    # TVM 0.27: cc helpers moved to tvm.support.cc (was tvm.contrib.cc).
    from tvm.support import cc

    return cc.cross_compiler(target.cross_compiler)


# ---------------------------------------------------------------------------
# Cross builds and CUDA device code
#
# TVM 0.27: without libcuda.so.1 (any machine with no GPU driver) the CUDA runtime module
# does not load, so codegen silently keeps the kernels as CUDA *source* in a placeholder
# module (CUDAFallbackModuleNode), which a GPU machine would have to JIT-compile at load
# time with NVRTC or nvcc. Artifacts must carry machine code instead, so for CUDA targets
# we always take that source path (TVM_COMPILE_FORCE_FALLBACK=1, the same on machines with
# and without a GPU), compile the source with nvcc for the target's sm_XX at export time,
# and write the module as a fatbin (SASS for sm_XX plus PTX for newer GPUs).


def _check_build_tools(target: Target) -> None:
    """Everything the build will run, checked before any compile work starts."""
    from pipeline import cross

    target.check_available()
    cross.require_cross_compiler(target)
    if target.cuda_arch is not None:
        _require_nvcc(target)


def _nvcc_archs(nvcc: str) -> tuple[str, ...]:
    result = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60)
    return tuple(result.stdout.split()) if result.returncode == 0 else ()


def _require_nvcc(target: Target) -> None:
    from pipeline import cross

    nvcc = cross.require_tool(
        "nvcc", "nvidia-cuda-toolkit", f"compile the GPU kernels of target '{target.name}'"
    )
    compute = target.cuda_arch.replace("sm_", "compute_")
    archs = _nvcc_archs(nvcc)
    if compute not in archs:
        raise PipelineError(
            f"{nvcc} cannot compile for {target.cuda_arch} (target '{target.name}'); it supports "
            f"{', '.join(a for a in archs if a.startswith('compute_')) or 'nothing it would list'}; "
            f"install a CUDA toolkit that does (sm_110 needs CUDA 13)"
        )


@contextlib.contextmanager
def _cuda_source_codegen(target: Target):
    """Make TVM keep CUDA kernels as source (compiled by us at export), GPU or not."""
    if target.cuda_arch is None:
        yield
        return
    previous = os.environ.get("TVM_COMPILE_FORCE_FALLBACK")
    os.environ["TVM_COMPILE_FORCE_FALLBACK"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TVM_COMPILE_FORCE_FALLBACK"]
        else:
            os.environ["TVM_COMPILE_FORCE_FALLBACK"] = previous


def _u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def _string(value: bytes) -> bytes:
    return _u64(len(value)) + value


def _fatbin_module_blob(blob: bytes, sources: list[str], compile_source) -> tuple[bytes, int]:
    """Rewrite the "cuda" modules of a serialized module tree from source to fatbin.

    TVM 0.27 (tvm-ffi) serialization, every integer u64 little-endian, strings and byte
    strings length-prefixed: total length, import-tree row pointers (vector), child
    indices (vector), then per module its kind and, unless the kind is "_lib", its bytes.
    A CUDA module's bytes are: format, function table, code; the code is the CUDA source
    for format "cuda". Only the format and the code change; the function table is kept
    byte for byte. Returns the new blob and the number of modules rewritten.
    """
    view = memoryview(blob)
    offset = 0

    def read_u64() -> int:
        nonlocal offset
        (value,) = struct.unpack_from("<Q", view, offset)
        offset += 8
        return value

    def read_bytes() -> bytes:
        nonlocal offset
        size = read_u64()
        value = bytes(view[offset:offset + size])
        offset += size
        return value

    if read_u64() != len(blob) - 8:
        raise RuntimeError("unexpected TVM module serialization: length header mismatch")
    header_start = offset
    row_ptr = [read_u64() for _ in range(read_u64())]
    for _ in range(read_u64()):
        read_u64()
    out = [bytes(view[header_start:offset])]
    encoded_sources = [source.encode() for source in sources]
    rewritten = 0
    for _ in range(len(row_ptr) - 1):
        kind = read_bytes()
        out.append(_string(kind))
        if kind == b"_lib":
            continue
        payload = read_bytes()
        fmt_length = struct.unpack_from("<Q", payload, 0)[0]
        if kind == b"cuda" and payload[8:8 + fmt_length] == b"cuda":
            source = next(
                (s for s in encoded_sources if payload.endswith(_string(s))), None
            )
            if source is None:
                raise RuntimeError("unexpected TVM module serialization: CUDA source not found")
            function_table = payload[8 + fmt_length:len(payload) - len(source) - 8]
            payload = _string(b"fatbin") + function_table + _string(compile_source(source.decode()))
            rewritten += 1
        out.append(_string(payload))
    if offset != len(blob):
        raise RuntimeError("unexpected TVM module serialization: trailing bytes")
    body = b"".join(out)
    return _u64(len(body)) + body, rewritten


def _fatbin_import_packer(target: Target, sources: list[str]):
    """An export_library ``fpack_imports``: the module tree with CUDA modules as fatbins
    (pipeline/cuda_nvcc.py), embedded in an object file by LLVM (as TVM's default packer
    does). The CUDA sources it compiled are appended to ``sources``."""

    def pack(module, is_system_lib: bool, prefix: str, workspace_dir: str) -> str:
        get = tvm.get_global_func
        blob = get("runtime.ModulePackImportsToTensor")(module).numpy().tobytes()
        sources.extend(
            m.inspect_source("cuda")
            for m in module._collect_from_import_tree(lambda m: m.kind == "cuda")
        )
        blob, rewritten = _fatbin_module_blob(
            blob, sources, lambda source: cuda_nvcc.compile_source(source, target.cuda_arch)
        )
        if rewritten == 0:
            raise RuntimeError(f"no CUDA kernels to compile for target '{target.name}'")
        packed = get("codegen.codegen_blob")(
            blob, is_system_lib, json.dumps(target.host_target), prefix
        )
        path = os.path.join(workspace_dir, f"{prefix}devc.o")
        packed.write_to_file(path)
        return path

    return pack


def _export_library(executable, path: Path, target: Target) -> tuple[list[str], str]:
    """Link the executable into ``path``; returns the GPU code it carries and the CUDA
    source that code was compiled from (([], "") for CPU)."""
    if target.cuda_arch is None:
        executable.export_library(str(path), fcompile=_link_function(target))
        return [], ""
    sources: list[str] = []
    # TVM 0.27: Executable.export_library does not pass fpack_imports on; its .mod does.
    executable.mod.export_library(
        str(path), fcompile=_link_function(target), fpack_imports=_fatbin_import_packer(target, sources)
    )
    from pipeline import cross

    code = cross.cuda_device_code(path)
    if not any(entry.kind == "sass" and entry.arch == target.cuda_arch for entry in code):
        raise RuntimeError(
            f"{path.name} has no {target.cuda_arch} code after the build (found: "
            f"{', '.join(map(str, code)) or 'none'})"
        )
    return [str(entry) for entry in code], "\n".join(sources)


# ---------------------------------------------------------------------------
# Public API


def compile_onnx(
    onnx_path: Path,
    target: Target,
    library_path: Path,
    *,
    params_mode: str = "embedded",
    input_name: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    dump_ir_dir: Path | None = None,
    tuning_database: Path | None = None,
    precision: str = "fp32",
    rewrites: tuple[tuple[str, list], ...] = (),
) -> dict:
    """Compile an ONNX model into ``library_path`` (+ metadata, + weights if "separate").

    Nothing appears at ``library_path`` unless the whole build succeeded. Returns a
    JSON-friendly summary: sizes, input/output, PrimFunc count, compile seconds, and
    ``tuning``: how many PrimFuncs got a schedule from ``tuning_database`` (a directory
    made by `pipeline tune`) and how many a default schedule (pipeline/tvm_tuning.py).

    ``rewrites`` are extra (phase name, passes) run first, once params are bound (the
    INT8 lowering in pipeline/tvm_int8.py is one); ``precision="fp16"`` adds TVM's mixed
    precision rewrite for GPU targets.
    """
    start = time.perf_counter()
    onnx_path, library_path = Path(onnx_path), Path(library_path)
    dump_ir_dir = Path(dump_ir_dir) if dump_ir_dir is not None else None
    if params_mode not in PARAMS_MODES:
        raise PipelineError(
            f"unknown params_mode '{params_mode}'; use one of: {', '.join(PARAMS_MODES)}"
        )

    _check_build_tools(target)
    model = _load_onnx(onnx_path)
    name, shape, dtype = _resolve_input(model, input_name, input_shape)
    log.info(
        "compile %s -> %s: target %s %s, input %s %s %s, params %s, TVM %s",
        onnx_path, library_path, target.name, target.target_json(), name, shape, dtype,
        params_mode, tvm.__version__,
    )

    mod, param_names, param_values = _import_relax(model, onnx_path, name, shape, dtype)
    output = _output_spec(mod)
    _dump(dump_ir_dir, 0, "imported", mod)
    if params_mode == "embedded":
        # Weights become constants, so FoldConstant can pre-compute their transposes and
        # the executable carries them in its constant pool.
        main = mod["main"]
        num_input = int(main.attrs["num_input"])
        bindings = dict(zip(main.params[num_input:], param_values))
        mod = relax.transform.BindParams("main", bindings)(mod)
        _dump(dump_ir_dir, 1, "params_bound", mod)

    tvm_target = tvm.target.Target(target.tvm_target)
    phases = [*rewrites, *precision_phases(precision, target), *relax_phases(tvm_target)]
    with tvm_target, _cuda_source_codegen(target):
        for index, (phase, passes) in enumerate(phases, start=2):
            if passes:
                mod = tvm.transform.Sequential(passes, name=phase)(mod)
                _dump(dump_ir_dir, index, phase, mod)
            if phase == "fuse":
                # Tuning records where the database has them, default schedules for every
                # other PrimFunc on CPU (GPU ones get dlight's in the next phase).
                from pipeline import tvm_tuning

                mod, tuning = tvm_tuning.schedule_module(mod, tvm_target, target, tuning_database)
                if "gpu" not in tvm_target.keys:
                    mod = tvm.transform.Sequential(tvm_prepack.pack_weights(), name="pack_weights")(mod)
                _dump(dump_ir_dir, index, "scheduled", mod)
        num_primfuncs = _count_primfuncs(mod)
        # A precision phase may have changed the dtype the weights are passed in.
        param_dtypes = [str(var.ty.dtype) for var in mod["main"].params[-len(param_names):]] if (
            params_mode == "separate" and param_names) else []
        # relax_pipeline=None: the Relax passes ran above; tvm.compile now runs TIR's
        # default lowering pipeline and LLVM (or the target's) codegen.
        executable = tvm.compile(mod, target=tvm_target, relax_pipeline=None)

    library_path.parent.mkdir(parents=True, exist_ok=True)
    weights = params_path(library_path)
    cuda_source = cuda_source_path(library_path)
    metadata = {
        "format": 1,
        "target": target.name,
        "target_json": target.tvm_target,
        "host_triple": target.host_triple,
        "device": target.device,
        "tvm_version": tvm.__version__,
        "library": library_path.name,
        "entry": "main",
        "input": {"name": name, "shape": list(shape), "dtype": dtype},
        "output": output,
        "params_mode": params_mode,
        "params_file": weights.name if params_mode == "separate" else None,
        "params_order": param_names if params_mode == "separate" else [],
    }

    # Everything is written to temporary names in the destination directory and renamed
    # into place at the end, the library last: a crash leaves no half-written artifact.
    tag = f".tmp-{os.getpid()}"
    temp_library = library_path.with_name(f".{library_path.stem}{tag}{library_path.suffix}")
    temp_metadata = library_path.with_name(f".{metadata_path(library_path).name}{tag}")
    temp_weights = weights.with_name(f".{weights.stem}{tag}.npz")
    temp_source = cuda_source.with_name(f".{cuda_source.stem}{tag}.cu")
    temps = [temp_library, temp_metadata, temp_weights, temp_source]
    try:
        device_code, source = _export_library(executable, temp_library, target)
        if device_code:
            metadata["device_code"] = device_code
            metadata["cuda"] = {**cuda_nvcc.build_record(target.cuda_arch), "source": cuda_source.name}
            temp_source.write_text(source)
        if params_mode == "separate":
            with open(temp_weights, "wb") as f:
                np.savez(f, **{
                    name: value.numpy().astype(dtype, copy=False)
                    for name, value, dtype in zip(param_names, param_values, param_dtypes)
                })
        runtime_only.write_metadata(temp_metadata, metadata)
        if params_mode == "separate":
            os.replace(temp_weights, weights)
        elif weights.exists():
            weights.unlink()  # a stale weights file from an earlier "separate" build
        if device_code:
            os.replace(temp_source, cuda_source)
        elif cuda_source.exists():
            cuda_source.unlink()  # a stale source from an earlier CUDA build
        os.replace(temp_metadata, metadata_path(library_path))
        os.replace(temp_library, library_path)
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)

    return {
        "library": str(library_path),
        "library_bytes": library_path.stat().st_size,
        "metadata_file": str(metadata_path(library_path)),
        "params_file": str(weights) if params_mode == "separate" else None,
        "params_bytes": weights.stat().st_size if params_mode == "separate" else 0,
        "params_mode": params_mode,
        "input": metadata["input"],
        "output": output,
        "num_primfuncs": num_primfuncs,
        "tuning": tuning,
        "compile_s": round(time.perf_counter() - start, 3),
        "tvm_version": tvm.__version__,
        "target": target.name,
    }


class ArtifactPipelineError(PipelineError, runtime_only.ArtifactError):
    """An artifact problem met inside the pipeline: a user error like any other (exit 2)."""


class _PipelineArtifact(LoadedArtifact):
    error_type = ArtifactPipelineError


def load_artifact(library_path: Path, device: str = "cpu") -> LoadedArtifact:
    """Load a compiled library for inference (runtime_only.LoadedArtifact, PipelineError errors)."""
    return _PipelineArtifact(library_path, device=device)
