"""Latency of one backend measured in a process of its own.

Measured one after another in one process, backends slow each other down: each keeps a
thread pool whose idle workers spin for a while before they sleep (ONNX Runtime, TVM,
PyTorch's OpenMP), and on a machine with few cores those spinning threads take cores from
the backend being timed. On this 2-core VM, ConvNeXt-T in ONNX Runtime took 72 ms right
after PyTorch and 52 ms alone; TVM took 101 ms interleaved with ONNX Runtime and 64 ms
alone. So every local latency number comes from a fresh process that loads one model,
warms it up and times it, like trtexec or a deployed application would.

    python -m pipeline.runtime.isolated --backend tvm --model model.so --input x.npy --warmup 5 --repeats 50
    (prints the statistics as JSON on its last stdout line)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

BACKENDS = ("pytorch", "onnxruntime", "onnxruntime-int8", "tvm")


def _runner(backend: str, model: Path, device: str):
    from pipeline.runtime.runners import OnnxRuntimeRunner, TorchRunner, TvmRunner

    if backend == "pytorch":
        return TorchRunner.from_checkpoint(model)
    if backend.startswith("onnxruntime"):
        return OnnxRuntimeRunner(model)
    return TvmRunner(model, device=device)


def time_runner(runner, batch: np.ndarray, warmup: int, repeats: int) -> dict:
    """Time `repeats` calls after `warmup` untimed ones (in this process)."""
    from pipeline.latency_stats import latency_stats

    for _ in range(warmup):
        runner.infer(batch)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.infer(batch)
        seconds.append(time.perf_counter() - start)
    stats = latency_stats(seconds, batch.shape[0])
    # CPU threads the backend computed with: comparisons are fair only on equal footing.
    stats["threads"] = getattr(runner, "threads", None)
    return stats


def measure_isolated(backend: str, model: Path, batch: np.ndarray, warmup: int, repeats: int,
                     device: str = "cpu", timeout_s: float = 3600.0) -> dict:
    """`time_runner` for one backend in a fresh Python process; returns its statistics."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend}")
    with tempfile.TemporaryDirectory(prefix="isolated-") as scratch:
        batch_file = Path(scratch) / "batch.npy"
        np.save(batch_file, batch)
        command = [
            sys.executable, "-m", "pipeline.runtime.isolated", "--backend", backend, "--model", str(model),
            "--input", str(batch_file), "--warmup", str(warmup), "--repeats", str(repeats), "--device", device,
        ]
        repo = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise PipelineError(f"measuring {backend} took longer than {timeout_s:.0f} s; lower --repeats") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise PipelineError(f"measuring {backend} on {model} failed: {lines[-1] if lines else f'exit {done.returncode}'}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time one backend on one input, alone in this process.")
    parser.add_argument("--backend", choices=BACKENDS, required=True)
    parser.add_argument("--model", type=Path, required=True, help="checkpoint, ONNX file or compiled library")
    parser.add_argument("--input", type=Path, required=True, help=".npy batch")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    # A TVM artifact sizes the thread pool when it loads (runtime_only.configure_cpu_threads).
    runner = _runner(args.backend, args.model, args.device)
    stats = time_runner(runner, np.load(args.input), args.warmup, args.repeats)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
