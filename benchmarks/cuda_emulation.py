"""Every GPU kernel of a model as compiled for a CUDA target, run on this CPU by the CUDA
emulator (pipeline/verify/cuda_emulator/) and compared with the same kernel unscheduled,
built by TVM for the CPU: what the GPU check will compute, known before a GPU runs it.

    make check-cuda-kernels                 # ConvNeXt-T, cuda-sm90: fp32 b1, fp16 b1, fp16 b8
    make check-cuda-kernels ARGS=--gemm-sweep   # ... and every variant of the bundle's GEMM sweep
    .venv/bin/python benchmarks/cuda_emulation.py --variant micro --input-size 64 --configs fp16:2

Writes reports/cuda-emulation/<target>.md and .json (a folder `pipeline reports` does not
read: these are checks, not measurements). Exit 1 when a kernel does not match.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_bundle import parse_configs  # noqa: E402  (the same configurations as the bundle)

from pipeline.verify.cuda_emulator import gpu_build, kernel_check  # noqa: E402

# The emulated model's largest logit error allowed, relative to the reference's largest logit
# (float16 weights and activations against ONNX Runtime float32).
MODEL_TOLERANCE = 2e-2
from pipeline.provenance import cpu_model, git_commit  # noqa: E402


def log(message: str) -> None:
    print(f"[cuda_emulation] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="tiny", help="ConvNeXt variant (pipeline variants)")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--target", default="cuda-sm90", help="a CUDA target (pipeline targets)")
    parser.add_argument("--configs", default="fp32:1,fp16:1,fp16:8",
                        help="comma-separated precision:batch[:no-split-k] (the GPU bundle's, less the "
                             "no-split-k ones: those are the kernels before split-K)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kernels' random arguments and the input")
    parser.add_argument("--weights-seed", type=int, default=0, help="seed of the weights (pipeline/seeded_weights.py)")
    parser.add_argument("--model-batch-limit", type=int, default=8,
                        help="run the whole model too for configurations up to this batch (ConvNeXt-T fp16: "
                             "about 2 minutes at batch 1, 10 at batch 8, on 2 cores)")
    parser.add_argument("--gemm-sweep", action="store_true",
                        help="also every variant of the GPU bundle's GEMM sweep (benchmarks/gemm_sweep.py) at the "
                             "fp16 batches (ConvNeXt-T: about 4 minutes at batch 1, 20 at batch 8)")
    parser.add_argument("--output", type=Path, default=REPO / "reports" / "cuda-emulation")
    return parser.parse_args(argv)


def _gxx_version() -> str:
    done = subprocess.run(["g++", "--version"], capture_output=True, text=True)
    return done.stdout.splitlines()[0] if done.returncode == 0 else "unknown"


def _markdown(record: dict) -> str:
    lines = [
        f"# CUDA kernels of ConvNeXt-{record['variant']} for `{record['target']}`, run by the CUDA emulator",
        "",
        "Each kernel as compile schedules it, run on the CPU by `pipeline/verify/cuda_emulator/` (twice: "
        "each block's threads first to last, then last to first) and compared with the same kernel "
        "unscheduled, built by TVM for the CPU, on random arguments; then the whole model, compile's GPU "
        "graph with every kernel emulated, against ONNX Runtime float32. Not a GPU run: nvcc's code and "
        "the timing are not seen here (`benchmarks/gpu_check.py` does that).",
        "",
        f"- date: {record['date']}",
        f"- commit: {record['commit']}",
        f"- host: {record['host']}; {record['gxx']}",
        f"- model: {record['input_size']}x{record['input_size']}, {record['num_classes']} classes, "
        f"weights {record['weights']}",
        "",
    ]
    for config in record["configs"]:
        results = config["kernels"]
        matched = sum(r["status"] == "match" for r in results)
        lines += [
            f"## {config['precision']}, batch {config['batch']}" + ("" if config.get("gpu_split_k", True) else ", no split-K")
            + f": {matched} of {len(results)} kernels match "
            f"({config['seconds']:.0f} s)",
            "",
            *_model_lines(config.get("model")),
            "| kernel | rule | status | largest relative error | launch |",
            "|---|---|---|---|---|",
        ]
        for r in results:
            error = "" if r["error"] != r["error"] else f"{r['error']:.2e}"
            lines.append(f"| `{r['kernel']}` | {r['rule']} | {r['status']} | {error} | {r['detail']} |")
        lines.append("")
    for sweep in record.get("gemm_sweep", []):
        results = sweep["kernels"]
        matched = sum(r["status"] == "match" for r in results)
        lines += [f"## GEMM sweep, batch {sweep['batch']}: {matched} of {len(results)} variants match "
                  f"({sweep['seconds']:.0f} s)", "",
                  "Every fp16 GEMM in each block tile and split over K, as the GPU bundle carries them "
                  "(benchmarks/gemm_sweep.py)" + ("." if matched == len(results) else "; the others:"), ""]
        lines += [f"- `{r['kernel']}`: {r['status']}, {r['detail']}" for r in results if r["status"] != "match"]
        lines.append("")
    return "\n".join(lines)


def _model_lines(model: dict | None) -> list[str]:
    if model is None:
        return ["Whole model: not run at this batch (`--model-batch-limit`).", ""]
    verdict = "matches" if model["ok"] else "DOES NOT MATCH"
    return [f"Whole model ({model['launches']} kernel launches, emulated) {verdict} ONNX Runtime float32: "
            f"largest logit error {model['max_abs_error']:.3g} (largest logit {model['reference_max_abs']:.3g}), "
            f"top-1 agreement {model['top1_agreement']:.0%} ({model['images']} random image"
            f"{'s' if model['images'] > 1 else ''}).", ""]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import onnx

    from pipeline.errors import PipelineError
    from pipeline.model import VARIANTS, create_model
    from pipeline.seeded_weights import seed_model
    from pipeline.stages.export import export_onnx
    from pipeline.stages.simplify import simplify
    from targets import get_target

    if args.variant not in VARIANTS:
        raise PipelineError(f"unknown variant '{args.variant}'; use one of: {', '.join(VARIANTS)}")
    target = get_target(args.target)
    if target.device != "cuda":
        raise PipelineError(f"target '{args.target}' is not a CUDA target; use e.g. cuda-sm90")
    configs = parse_configs(args.configs, target)

    record = {
        "variant": args.variant, "target": target.name, "input_size": args.input_size,
        "num_classes": args.num_classes, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": git_commit(), "host": f"{cpu_model()} ({platform.machine()})", "gxx": _gxx_version(),
        "weights": f"pipeline/seeded_weights.py, seed {args.weights_seed}", "configs": [],
    }
    failed = 0
    # The GPU bundle's model: seeded weights, exported at a fixed batch and simplified, as
    # the pipeline's stages do (a fresh model's equal initializers would be merged by onnxsim).
    model = seed_model(create_model(args.variant, num_classes=args.num_classes).eval(), args.weights_seed)
    with tempfile.TemporaryDirectory(prefix="cuda-emulation-") as folder:
        for bundled in configs:
            precision, batch, label = bundled.precision, bundled.batch, bundled.name
            start = time.perf_counter()
            shape = (batch, 3, args.input_size, args.input_size)
            onnx_path = Path(folder) / f"model-b{batch}.onnx"
            if not onnx_path.exists():
                export_onnx(model, onnx_path, shape, opset=17, dynamic_batch=False)
                onnx.save(simplify(onnx.load(str(onnx_path))), str(onnx_path))
            log(f"{label}: compiling to the scheduled kernels")
            kernels = gpu_build.model_gpu_kernels(onnx_path, target, precision=precision, input_shape=shape,
                                                  gpu_split_k=bundled.split_k)

            def progress(index: int, total: int, name: str) -> None:
                log(f"{label}: kernel {index + 1}/{total} {name}")

            results = kernel_check.check_kernels(kernels, seed=args.seed, progress=progress)
            failed += sum(r.status != "match" for r in results)
            config = {
                "precision": precision, "batch": batch, "gpu_split_k": bundled.split_k,
                "kernels": [{"kernel": r.kernel, "rule": r.rule, "status": r.status, "error": r.error,
                             "detail": r.detail} for r in results],
            }
            if batch <= args.model_batch_limit:
                log(f"{label}: the whole model, every kernel emulated")
                config["model"] = _model_check(onnx_path, target, precision, shape, args.seed, bundled.split_k)
                failed += not config["model"]["ok"]
            config["seconds"] = round(time.perf_counter() - start, 1)
            record["configs"].append(config)
        if args.gemm_sweep:
            record["gemm_sweep"] = []
            for batch in sorted({c.batch for c in configs if c.precision == "fp16"}):
                start = time.perf_counter()
                log(f"GEMM sweep, batch {batch}: every GEMM in every tile and split")
                sweep = _sweep_check(Path(folder) / f"model-b{batch}.onnx", target, batch, args.seed)
                failed += sum(r["status"] != "match" for r in sweep)
                record["gemm_sweep"].append({"batch": batch, "kernels": sweep,
                                             "seconds": round(time.perf_counter() - start, 1)})
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{target.name}.json").write_text(json.dumps(record, indent=1, allow_nan=True) + "\n")
    (args.output / f"{target.name}.md").write_text(_markdown(record))
    log(f"wrote {args.output / (target.name + '.md')}: {failed} failure(s)")
    return 1 if failed else 0


def _sweep_check(onnx_path: Path, target, batch: int, seed: int) -> list[dict]:
    """Every variant of the GPU bundle's GEMM sweep of ``onnx_path`` against its CPU build."""
    from gemm_sweep import sweep_kernels

    kernels, _ = sweep_kernels(onnx_path, target, batch)
    built = gpu_build.scheduled_gpu_kernels({n: u for n, (u, _) in kernels.items()},
                                            {n: s for n, (_, s) in kernels.items()},
                                            {n: "TensorCoreMatmul" for n in kernels}, target)
    return [{"kernel": r.kernel, "status": r.status, "error": r.error, "detail": r.detail}
            for r in kernel_check.check_kernels(built, seed=seed)]


def _model_check(onnx_path: Path, target, precision: str, shape: tuple[int, ...], seed: int,
                 gpu_split_k: bool = True) -> dict:
    """The emulated model's logits against ONNX Runtime float32 on the same ONNX and input."""
    import numpy as np
    import onnxruntime as ort

    from pipeline.verify.cuda_emulator import model_run

    model = model_run.emulated_model(onnx_path, target, precision=precision, input_shape=shape,
                                     gpu_split_k=gpu_split_k)
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    logits = model.run(x)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x})[0]
    error = float(np.abs(logits - expected).max()) if np.isfinite(logits).all() else float("inf")
    scale = float(np.abs(expected).max())
    agreement = float((logits.argmax(1) == expected.argmax(1)).mean())
    return {
        "images": shape[0], "launches": model.launches, "max_abs_error": error, "reference_max_abs": scale,
        "top1_agreement": agreement, "ok": error <= MODEL_TOLERANCE * scale and agreement == 1.0,
    }


if __name__ == "__main__":
    from pipeline.errors import EXIT_USER_ERROR, PipelineError

    try:
        sys.exit(main())
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
