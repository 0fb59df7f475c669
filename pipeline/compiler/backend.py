"""ONNX -> TVM Relax -> shared library: compile's driver (``compile_onnx``) and how an
artifact is linked and written.

TVM's compiler is imported only inside pipeline/compiler/ (the runtime and the stages never
import it; import-linter contracts in pyproject.toml). What the pipeline relies on that TVM
offers no API for (its module serialization, an environment switch, a patched
inspect.stack) is in tvm_compat.py, written against one TVM version, with the IR quirks
several modules share and the renamed public APIs used throughout; a rename used in one
module carries a comment that starts with "TVM 0.27:" there.
Running an artifact needs none of this: see ``pipeline/runtime/runtime_only.py``
(``pipeline.runtime.runners.load_artifact`` in the pipeline).

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
import subprocess
import time
from pathlib import Path

import numpy as np

import tvm

from pipeline import toolchain
from pipeline.compiler import cuda_code, nvcc, tvm_compat, weight_params
from pipeline.compiler.cost import kernel_costs
from pipeline.compiler.fused import CompileOptions, compile_phases, fuse_model, run_phases
from pipeline.compiler.phases import pass_config, phases_before
from pipeline.errors import PipelineError
from pipeline.runtime import runtime_only
from pipeline.runtime.runtime_only import metadata_path
from targets import Target

log = logging.getLogger(__name__)

def params_path(library_path: Path) -> Path:
    """Where the weights of a params_mode="separate" library live: ``<stem>.params.npz``."""
    return library_path.with_name(f"{library_path.stem}.params.npz")


def cuda_source_path(library_path: Path) -> Path:
    """Where a CUDA library's kernel source lives: ``<stem>.cu``."""
    return library_path.with_name(f"{library_path.stem}.cu")


def _dump(dump_ir_dir: Path | None, index: int, phase: str, mod: tvm.IRModule) -> None:
    if dump_ir_dir is not None:
        dump_ir_dir.mkdir(parents=True, exist_ok=True)
        (dump_ir_dir / f"{index:02d}_{phase}.py").write_text(mod.script())


def _count_primfuncs(mod: tvm.IRModule) -> int:
    return sum(isinstance(func, tvm.tirx.PrimFunc) for func in mod.functions.values())


def _link_function(target: Target):
    """The export_library fcompile: None (host cc) or the target's cross compiler."""
    if target.cross_compiler is None:
        return None
    # TVM 0.27: cc helpers moved to tvm.support.cc (was tvm.contrib.cc).
    from tvm.support import cc

    return cc.cross_compiler(target.cross_compiler)


# ---------------------------------------------------------------------------
# Cross builds and CUDA device code (kernels kept as source, compiled by nvcc at export:
# tvm_compat.py says why)


def _check_build_tools(target: Target) -> None:
    """Everything the build will run, checked before any compile work starts."""
    target.check_available()
    toolchain.require_cross_compiler(target)
    if target.cuda_arch is not None:
        _require_nvcc(target)


def _nvcc_archs(nvcc_path: str) -> tuple[str, ...]:
    result = subprocess.run([nvcc_path, "--list-gpu-arch"], capture_output=True, text=True, timeout=60)
    return tuple(result.stdout.split()) if result.returncode == 0 else ()


def _require_nvcc(target: Target) -> None:
    nvcc_path = toolchain.require_tool(
        "nvcc", "nvidia-cuda-toolkit", f"compile the GPU kernels of target '{target.name}'"
    )
    compute = target.cuda_arch.replace("sm_", "compute_")
    archs = _nvcc_archs(nvcc_path)
    if compute not in archs:
        raise PipelineError(
            f"{nvcc_path} cannot compile for {target.cuda_arch} (target '{target.name}'); it supports "
            f"{', '.join(a for a in archs if a.startswith('compute_')) or 'nothing it would list'}; "
            f"install a CUDA toolkit that does (sm_110 needs CUDA 13)"
        )


@contextlib.contextmanager
def cuda_source_codegen(target: Target):
    """Make TVM keep CUDA kernels as source (compiled by us at export), GPU or not."""
    if target.cuda_arch is None:
        yield
        return
    with tvm_compat.cuda_codegen_as_source():
        yield


def _fatbin_import_packer(target: Target, sources: list[str]):
    """An export_library ``fpack_imports``: the module tree with CUDA modules as fatbins
    (pipeline/compiler/nvcc.py), embedded in an object file by LLVM (as TVM's default packer
    does). The CUDA sources it compiled are appended to ``sources``."""

    def pack(module, is_system_lib: bool, prefix: str, workspace_dir: str) -> str:
        get = tvm.get_global_func
        blob = get("runtime.ModulePackImportsToTensor")(module).numpy().tobytes()
        sources.extend(
            m.inspect_source("cuda")
            for m in module._collect_from_import_tree(lambda m: m.kind == "cuda")
        )
        blob, rewritten = tvm_compat.fatbin_module_blob(
            blob, sources, lambda source: nvcc.compile_source(source, target.cuda_arch)
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


def export_kernel_library(module, path: Path, target: Target) -> None:
    """A module of built GPU kernels (tvm.tirx.build) linked into ``path`` as compile links
    an artifact: its CUDA source through nvcc into a fatbin (the GPU check's GEMM sweep)."""
    module.export_library(str(path), fcompile=_link_function(target), fpack_imports=_fatbin_import_packer(target, []))


def _export_library(executable, path: Path, target: Target) -> tuple[list[str], str]:
    """Link the executable into ``path``; returns the GPU code it carries and the CUDA
    source that code was compiled from (([], "") for CPU)."""
    if target.cuda_arch is None:
        executable.export_library(str(path), fcompile=_link_function(target))
        return [], ""
    sources: list[str] = []
    tvm_compat.export_with_packer(executable, str(path), _link_function(target), _fatbin_import_packer(target, sources))
    code = cuda_code.cuda_device_code(path)
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
    gpu_split_k: bool = True,
) -> dict:
    """Compile an ONNX model into ``library_path`` (+ metadata, + weights if "separate").

    Nothing appears at ``library_path`` unless the whole build succeeded. Returns a
    JSON-friendly summary: sizes, input/output, PrimFunc count, compile seconds, and
    ``tuning``: how many PrimFuncs got a schedule from ``tuning_database`` (a directory
    made by `pipeline tune`) and how many a default schedule (pipeline/compiler/schedules/);
    for GPU targets ``gpu_cost``: each kernel's roofline bound (pipeline/compiler/cost.py)
    and the rule, grid ("blocks") and block size ("threads") its schedule has,
    and ``cuda_graph_captures``: how many kernel sequences run as captured CUDA graphs.

    The settings that decide the kernels make a ``fused.CompileOptions``, and the phases up
    to scheduling run in ``fused.fuse_model``, as tuning and the CUDA emulator run them.
    ``precision`` names a record of pipeline/precisions.py, which says the phases it adds:
    "int8" compiles a QDQ model with its convolutions and matmuls lowered to integers
    (pipeline/compiler/int8.py; the summary's "int8" says what was lowered), "fp16" adds
    TVM's mixed precision rewrite for GPU targets. ``gpu_split_k=False`` keeps every GPU
    GEMM unsplit (pipeline/compiler/split_k.py). What the passes report (the int8 lowering,
    the schedule phase) is read off the module after each phase (pass_results.py).
    """
    start = time.perf_counter()
    onnx_path, library_path = Path(onnx_path), Path(library_path)
    dump_ir_dir = Path(dump_ir_dir) if dump_ir_dir is not None else None
    options = CompileOptions(precision=precision, params_mode=params_mode, gpu_split_k=gpu_split_k,
                             input_name=input_name, input_shape=input_shape)
    options.check(target)

    _check_build_tools(target)
    log.info(
        "compile %s -> %s: target %s %s, %s, TVM %s",
        onnx_path, library_path, target.name, target.target_json(), options, tvm.__version__,
    )
    fused = fuse_model(onnx_path, target, options, dump_ir=lambda *args: _dump(dump_ir_dir, *args))
    name, shape, dtype = fused.input
    param_names, param_values = fused.param_names, fused.param_values
    output = fused.output

    tvm_target = fused.tvm_target
    phases = compile_phases(target, options, tuning_database=tuning_database)
    first = len(phases_before(phases, "schedule"))
    # What each GPU kernel must cost at least, on the kernels as fused (whose FLOPs TVM counts
    # exactly, before scheduling): the bound a GPU schedule is measured against.
    gpu_cost = kernel_costs(fused.module, target.cuda_arch) if target.device == "cuda" else None
    with tvm_target, cuda_source_codegen(target), tvm.transform.PassContext(config=pass_config(target)):
        mod, results, param_transforms = run_phases(
            fused.module, phases[first:], 2 + first, lambda *args: _dump(dump_ir_dir, *args), fused.param_transforms)
        num_primfuncs = _count_primfuncs(mod)
        # Regions RewriteCUDAGraph lifted out of main to capture as CUDA graphs (GPU targets).
        cuda_graphs = sum(1 for gv in mod.functions if "cuda_graph_capture" in gv.name_hint)
        # The schedule phase's counts (schedules/apply.py), and each GPU kernel's schedule beside
        # its cost: the rule that made it, its grid and block.
        tuning = results["schedule"]
        gpu_kernels = tuning.pop("gpu_kernels", {})
        for kernel in (gpu_cost or {}).get("kernels", []):
            kernel.update(gpu_kernels.get(kernel["kernel"], {"rule": "tuning record"}))
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
            metadata["cuda"] = {**nvcc.build_record(target.cuda_arch), "source": cuda_source.name}
            temp_source.write_text(source)
        if params_mode == "separate":
            with open(temp_weights, "wb") as f:
                # In the layout and dtype the kernels read them (weight_params.lift_weight_layouts).
                np.savez(f, **weight_params.saved_weights(param_names, param_values, param_dtypes, param_transforms))
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
        **({"gpu_cost": gpu_cost, "cuda_graph_captures": cuda_graphs} if gpu_cost else {}),
        **({"int8": fused.int8_report} if fused.int8_report is not None else {}),
        "compile_s": round(time.perf_counter() - start, 3),
        "tvm_version": tvm.__version__,
        "target": target.name,
    }
