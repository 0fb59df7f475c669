"""bench: latency of the artifact, with PyTorch and ONNX Runtime measured on the same
input as baselines (trtexec-style statistics), each backend alone in a process of its own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline import precisions
from pipeline.config import PipelineConfig
from pipeline.engine import Stage, log
from reports.target_report import latency_table
from targets import Target


def settings(config: PipelineConfig, target: Target) -> dict:
    return {
        "target": target.name, "warmup": config.warmup, "repeats": config.repeats,
        "rpc_tracker": config.rpc_tracker, "rpc_key": config.rpc_key,
    }


def run(config: PipelineConfig, target: Target, inputs: dict[str, Path], out_dir: Path) -> dict:
    from pipeline.runtime.isolated import measure_isolated
    from pipeline.runtime.runners import artifact_runner

    artifact = artifact_runner(inputs["library"], target, config.rpc_tracker, config.rpc_key)
    meta = json.loads(Path(inputs["library_metadata"]).read_text())
    shape = tuple(meta["input"]["shape"])
    batch = np.random.default_rng(config.seed).standard_normal(shape, dtype=np.float32)

    results = {}
    log(f"[bench] tvm: {config.warmup} warm-up + {config.repeats} timed runs, batch {shape[0]}")
    if config.rpc_tracker:
        # Timed on the device by TVM's time_evaluator: no network round trip in the numbers.
        results["tvm"] = artifact.measure(config.warmup, config.repeats, batch)
        remote = "measured on the host, not on the remote device: no like-for-like baseline"
        results["onnxruntime"] = {"not_measured": remote}
        results["pytorch"] = {"not_measured": remote}
    else:
        # Each backend alone in a fresh process (pipeline/runtime/isolated.py says why).
        del artifact  # loaded above only to refuse an artifact this machine cannot run
        results["tvm"] = measure_isolated("tvm", inputs["library"], batch, config.warmup, config.repeats, target.device)
        baselines = [("onnxruntime", inputs["onnx_simplified"])]
        if "checkpoint" in inputs:
            baselines.append(("pytorch", inputs["checkpoint"]))
        else:
            results["pytorch"] = {"not_measured": "no PyTorch model for a user-supplied ONNX file"}
        if "onnx_quantized" in inputs:
            # The same QDQ model the INT8 artifact was compiled from, in ONNX Runtime's INT8 kernels.
            baselines.append(("onnxruntime-int8", inputs["onnx_quantized"]))
        if target.device != "cpu":
            results["onnxruntime"] = {"not_measured": "ONNX Runtime here has only its CPU provider"}
            baselines = [b for b in baselines if b[0] != "onnxruntime"]
        for name, model in baselines:
            log(f"[bench] {name}: {config.warmup} warm-up + {config.repeats} timed runs, batch {shape[0]}")
            results[name] = measure_isolated(name, model, batch, config.warmup, config.repeats)
    for name, stats in results.items():
        if "median_ms" in stats:
            log(f"[bench] {name}: median {stats['median_ms']:.2f} ms, p99 {stats['p99_ms']:.2f} ms")

    tvm_median = results["tvm"]["median_ms"]
    speedups = {
        f"vs_{name}": stats["median_ms"] / tvm_median
        for name, stats in results.items() if name != "tvm" and "median_ms" in stats
    }
    latency = {
        "target": target.name,
        "precision": config.precision,
        "batch_size": int(shape[0]),
        "input_shape": list(shape),
        "warmup": config.warmup,
        "backends": results,
        "tvm_speedup": speedups,
        "artifact_bytes": Path(inputs["library"]).stat().st_size
        + (Path(inputs["params"]).stat().st_size if "params" in inputs else 0),
    }
    (out_dir / "latency.json").write_text(json.dumps(latency, indent=2) + "\n")
    (out_dir / "latency.md").write_text("\n".join(latency_table(latency)) + "\n")
    log("\n".join(latency_table(latency)))
    return {"outputs": {"latency": "latency.json", "latency_table": "latency.md"}, "info": {"tvm_median_ms": tvm_median}}


def bench_inputs(config: PipelineConfig) -> tuple[str, ...]:
    common = ("library", "library_metadata", "params", "onnx_simplified", "checkpoint")
    # A quantized precision's QDQ model is measured in ONNX Runtime's integer kernels too.
    return common + (("onnx_quantized",) if precisions.get(config.precision).quantized else ())


STAGE = Stage(
    name="bench",
    inputs=bench_inputs,
    optional_inputs=("params", "checkpoint"),
    outputs=("latency", "latency_table"),
    settings=settings,
    run=run,
    cacheable=False,
)
