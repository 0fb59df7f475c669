"""Synthetic latency.json / accuracy.json in the report stage's layout, and fake targets,
for the tests of reports/ (no pipeline run, no TVM)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError


@dataclass(frozen=True)
class FakeTarget:
    name: str
    tvm_target: dict = field(default_factory=lambda: {"kind": "llvm"})
    host_triple: str = "x86_64-linux-gnu"
    precisions: tuple[str, ...] = ("fp32",)
    runner: str = "local"
    rpc_key: str | None = None


FAKE_TARGETS = {
    "x86": FakeTarget("x86", precisions=("fp32", "int8")),
    "cuda": FakeTarget("cuda", {"kind": "cuda", "arch": "sm_90"}, precisions=("fp32", "fp16")),
    "jetson-orin": FakeTarget("jetson-orin", {"kind": "cuda", "arch": "sm_87"}, "aarch64-linux-gnu",
                              ("fp16",), runner="rpc", rpc_key="orin"),
    "arm-a76": FakeTarget("arm-a76", {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}, "aarch64-linux-gnu"),
}
KNOWN = list(FAKE_TARGETS)


def lookup(name: str) -> FakeTarget:
    if name not in FAKE_TARGETS:
        raise PipelineError(f"unknown target '{name}'")
    return FAKE_TARGETS[name]


def model(variant: str = "micro", num_classes: int = 10, tuning: Any = "untuned") -> dict:
    return {"variant": variant, "num_classes": num_classes, "parameters": 270298, "weights": "random init (seed 0)",
            "checkpoint_sha256": "ab" * 32, "nodes_before": 165, "nodes_after": 115, "compile_seconds": 6.5,
            "target_json": {"kind": "llvm"}, "tuning": tuning}


def provenance(date: str = "2026-01-01T00:00:00+00:00", commit: str = "aaaaaaaaaaaa", device: str = "AMD EPYC") -> dict:
    return {"device": device, "host": {"machine": "x86_64", "cpu": "AMD EPYC 9654", "cores": 2}, "date": date,
            "commit": commit, "tools": {"apache-tvm": "0.27.0.post1", "torch": "2.13.0+cpu", "onnxruntime": "1.32.0"},
            "command": "pipeline run --variant micro"}


def stats(median: float, repeats: int = 5, samples: list[float] | None = None) -> dict:
    result = {"repeats": repeats, "min_ms": 0.9 * median, "median_ms": median, "mean_ms": median,
              "p90_ms": 1.2 * median, "p99_ms": 1.5 * median, "max_ms": 1.6 * median, "std_ms": 0.1 * median,
              "throughput_ips": 1e3 / median}
    if samples is not None:
        result["samples_ms"] = samples
    return result


def latency(target: str = "x86", precision: str = "fp32", median: float = 10.0, *, variant: str = "micro",
            num_classes: int = 10, input_size: int = 64, tuning: Any = "untuned", samples: list[float] | None = None,
            **origin: str) -> dict:
    return {
        "target": target, "precision": precision, "batch_size": 1, "input_shape": [1, 3, input_size, input_size],
        "warmup": 5,
        "backends": {"tvm": stats(median, samples=samples), "onnxruntime": stats(2 * median),
                     "pytorch": stats(4 * median)},
        "tvm_speedup": {"vs_onnxruntime": 2.0, "vs_pytorch": 4.0},
        "artifact_bytes": 1_730_000,
        "model": model(variant, num_classes, tuning),
        "provenance": provenance(**origin),
    }


def accuracy(target: str = "x86", precision: str = "fp32", agreement: float = 1.0, *, top1: float | None = None,
             variant: str = "micro", num_classes: int = 10, **origin: str) -> dict:
    metrics = {"count": 16, "top1_agreement": agreement, "max_abs_error": 3e-7, "mean_abs_error": 1e-7,
               "cosine_min": 0.99999, "cosine_mean": 0.999999}
    if top1 is not None:
        metrics.update(reference_top1=top1, reference_top5=0.99, top1=top1, top5=0.98)
    return {
        "target": target, "precision": precision, "reference": "pytorch",
        "data": {"source": "random normal inputs", "count": 16, "labeled": top1 is not None},
        "metrics": metrics, "model": model(variant, num_classes), "provenance": provenance(**origin),
    }


def write_report(reports_dir: Path, folder: str, latency_record: dict | str | None = None,
                 accuracy_record: dict | str | None = None) -> Path:
    """reports_dir/folder/{latency,accuracy}.json; a str is written as is (for malformed files)."""
    path = Path(reports_dir) / folder
    path.mkdir(parents=True, exist_ok=True)
    for name, record in (("latency.json", latency_record), ("accuracy.json", accuracy_record)):
        if record is not None:
            (path / name).write_text(record if isinstance(record, str) else json.dumps(record, indent=2))
    return path


def write_pair(reports_dir: Path, folder: str, target: str = "x86", precision: str = "fp32", median: float = 10.0,
               agreement: float = 1.0, **kwargs: Any) -> Path:
    """A whole report: latency and accuracy of the same run."""
    origin = {k: kwargs.pop(k) for k in ("date", "commit", "device") if k in kwargs}
    top1 = kwargs.pop("top1", None)
    shared = {k: kwargs[k] for k in ("variant", "num_classes") if k in kwargs}
    return write_report(
        reports_dir, folder,
        latency(target, precision, median, **kwargs, **origin),
        accuracy(target, precision, agreement, top1=top1, **shared, **origin),
    )
