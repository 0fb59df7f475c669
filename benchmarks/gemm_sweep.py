"""The GEMM sweep of the GPU bundle: every tensor-core GEMM of the bundled float16 models
in each block tile, and split over K as split_k.py would split it, as one library of
kernels that the GPU check times one by one (gpu_check.measure_gemm_sweep).

The default GPU schedules choose tiles and splits without measuring
(gpu_cost_model.py: the largest tile that fills the SMs; split-K by a model whose
constants are assumptions). A GPU session is short and rare, so one call should bring
back what those choices are worth: each GEMM's time in every tile, next to the tile the
defaults chose and the steps the model predicted, and each split's partial GEMM (the
kernel adding the partial sums is timed in the model's kernel table).

    .venv/bin/python benchmarks/gemm_sweep.py --onnx model.onnx --batch 1   # build only, to look
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LIBRARY = "gemm_sweep.so"
MANIFEST = "gemm_sweep.json"


def _kernel_name(*parts: object) -> str:
    return "_".join(str(p) for p in parts)


def _partial_gemm(m: int, n: int, k: int, splits: int):
    """split_k.py's partial GEMM of an M x N x K GEMM in ``splits`` slices, as a PrimFunc."""
    from tvm import te

    from pipeline.compiler.split_k import partial_products

    a = te.placeholder((m, k), "float16", name="a")
    w = te.placeholder((k, n), "float16", name="w")
    return te.create_prim_func([a, w, partial_products(a, w, splits)])


def sweep_kernels(onnx_path: Path, target, batch: int) -> tuple[dict, list[dict]]:
    """(kernel name -> unscheduled and scheduled PrimFunc, the entries the check times) of
    one float16 model at ``batch``: each GEMM in every tile, and each allowed split of it
    in the tile the model chooses for the split."""
    import tvm

    from pipeline.verify.cuda_emulator.gpu_build import fused_model
    from pipeline.compiler import gpu_cost_model
    from pipeline.compiler.schedules import gpu_matmul

    sm_count = target.sm_count
    fused = fused_model(onnx_path, target, precision="fp16", gpu_split_k=False)
    kernels: dict[str, tuple] = {}
    entries: list[dict] = []
    with tvm.target.Target(target.tvm_target):
        for gvar, func in fused.module.functions_items():
            if not isinstance(func, tvm.tirx.PrimFunc):
                continue
            plan = gpu_matmul.gemm_plan(func, sm_count)
            if plan is None or plan["gemm"][0] != 1:
                continue
            _, m, n, k = plan["gemm"]
            default_tile = gpu_cost_model.choose_tile(m, n, sm_count)
            chosen_splits = gpu_cost_model.split_k_factor(m, n, k, sm_count)
            for tile in gpu_cost_model.TILES:
                rows, columns = gpu_cost_model.tile_shape(tile)
                name = _kernel_name("b", batch, gvar.name_hint, "t", rows, columns)
                _add(kernels, entries, name, func, gpu_matmul.tensor_core_matmul_schedule(func, sm_count, tile), {
                    "gemm": gvar.name_hint, "batch": batch, "m": m, "n": n, "k": k, "splits": 1, "tile": [rows, columns],
                    "default": chosen_splits == 1 and tile == default_tile,
                    "modeled_steps": gpu_cost_model.modeled_steps(m, n, k, 1, tile, sm_count),
                })
            for splits in gpu_cost_model.allowed_splits(k):
                depth = k // splits
                partial = _partial_gemm(m, n, k, splits)
                tile = gpu_cost_model.choose_tile(m, n, sm_count, splits, depth)
                rows, columns = gpu_cost_model.tile_shape(tile)
                name = _kernel_name("b", batch, gvar.name_hint, "split", splits, "t", rows, columns)
                _add(kernels, entries, name, partial, gpu_matmul.tensor_core_matmul_schedule(partial, sm_count, tile), {
                    "gemm": gvar.name_hint, "batch": batch, "m": m, "n": n, "k": k, "splits": splits,
                    "tile": [rows, columns], "default": splits == chosen_splits,
                    "modeled_steps": gpu_cost_model.modeled_steps(m, n, depth, splits, tile, sm_count),
                })
    return kernels, entries


def _add(kernels: dict, entries: list, name: str, func, schedule, entry: dict) -> None:
    """A scheduled variant, and its arguments' shapes and dtypes for the check."""
    if schedule is None:
        return
    kernels[name] = (func, schedule.mod["main"])
    args = [{"shape": [int(d) for d in p.shape], "dtype": str(p.dtype)} for p in func.params]
    entries.append({"kernel": name, "args": args, **entry})


def build_sweep(models: list[tuple[Path, int]], target, out_dir: Path, log=print) -> dict:
    """``out_dir``/gemm_sweep.so with the sweep's kernels of every (ONNX, batch) in
    ``models``, and ``out_dir``/gemm_sweep.json listing them; returns that listing."""
    import tvm

    from pipeline.compiler import backend, phases

    kernels: dict[str, tuple] = {}
    entries: list[dict] = []
    for onnx_path, batch in models:
        log(f"GEMM sweep: the GEMMs of {onnx_path.name} at batch {batch} in every tile and split")
        found, listed = sweep_kernels(onnx_path, target, batch)
        kernels.update(found)
        entries += listed
    tvm_target = tvm.target.Target(target.tvm_target)
    module = tvm.IRModule({name: scheduled.with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True)
                           for name, (_, scheduled) in kernels.items()})
    log(f"GEMM sweep: building {len(kernels)} kernels (nvcc)")
    with tvm_target, backend.cuda_source_codegen(target), tvm.transform.PassContext(config=phases.pass_config(target)):
        built = tvm.tirx.build(module, target=tvm_target)
    out_dir.mkdir(parents=True, exist_ok=True)
    backend.export_kernel_library(built, out_dir / LIBRARY, target)
    listing = {"target": target.name, "sm_count": target.sm_count, "library": LIBRARY, "kernels": entries}
    (out_dir / MANIFEST).write_text(json.dumps(listing, indent=1) + "\n")
    return listing


def main(argv: list[str] | None = None) -> int:
    from targets import get_target

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", type=Path, required=True, help="a simplified ONNX model with a fixed input shape")
    parser.add_argument("--batch", type=int, required=True, help="the model's batch (for the kernels' names)")
    parser.add_argument("--target", default="cuda-sm90")
    parser.add_argument("--output", type=Path, default=REPO / "dist" / "gemm-sweep")
    args = parser.parse_args(argv)
    listing = build_sweep([(args.onnx, args.batch)], get_target(args.target), args.output)
    print(f"{len(listing['kernels'])} kernels in {args.output / LIBRARY}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
