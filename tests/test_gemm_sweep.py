"""benchmarks/gemm_sweep.py: the GPU bundle's GEMM sweep, every tensor-core GEMM of a model in
every block tile and split over K. Each variant is a kernel the GPU check times; here each
is run on the CUDA emulator against its CPU build, so that a GPU session times only
kernels that compute the right thing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchmark_scripts import load
from edge_models import micro_onnx
from pipeline.compiler import gpu_cost_model
from targets import get_target

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    sys.path.insert(0, str(REPO / "benchmarks"))
    return load(name)


@pytest.mark.slow
def test_every_gemm_in_every_tile_and_split_computes_on_the_cuda_emulator(tmp_path_factory):
    target = get_target("cuda-sm90")
    onnx_path = micro_onnx(tmp_path_factory)
    _, entries = _load("gemm_sweep").sweep_kernels(onnx_path, target, 1)
    by_gemm: dict[str, list[dict]] = {}
    for entry in entries:
        by_gemm.setdefault(entry["gemm"], []).append(entry)
    assert len(by_gemm) >= 8  # the micro model's expand, project and patch GEMMs
    for gemm, variants in by_gemm.items():
        whole = [v for v in variants if v["splits"] == 1]
        assert sorted(tuple(v["tile"]) for v in whole) == sorted(gpu_cost_model.tile_shape(t) for t in gpu_cost_model.TILES)
        assert sum(v["default"] for v in variants) == 1, gemm  # what the default schedules take
        assert all(v["args"] and v["modeled_steps"] > 0 for v in variants)
    split = [e for e in entries if e["splits"] > 1]
    assert split and all(e["k"] // e["splits"] >= 256 for e in split)  # stage 4's project GEMM, K = 512

    # `make check-cuda-kernels ARGS=--gemm-sweep` runs the same check on ConvNeXt-T's sweep.
    checked = _load("cuda_emulation")._sweep_check(onnx_path, target, 1, seed=0)
    assert len(checked) == len(entries)
    failed = [f"{r['kernel']}: {r['status']}, {r['detail']}" for r in checked if r["status"] != "match"]
    assert not failed, "\n".join(failed)
