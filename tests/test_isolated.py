"""pipeline/runtime/isolated.py: one backend timed alone in a fresh process."""

from __future__ import annotations

import numpy as np
import pytest

from edge_models import SHAPE, compiled, micro_onnx, sample
from pipeline.errors import PipelineError
from pipeline.runtime.isolated import measure_isolated
from pipeline.runtime.runtime_only import physical_cores


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tvm", "onnxruntime"])
def test_a_backend_is_timed_in_its_own_process_with_every_core(tmp_path_factory, backend):
    model = compiled(tmp_path_factory, "x86") if backend == "tvm" else micro_onnx(tmp_path_factory)
    stats = measure_isolated(backend, model, sample(), warmup=1, repeats=5)
    assert stats["repeats"] == 5 and len(stats["samples_ms"]) == 5
    assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]
    assert stats["throughput_ips"] == pytest.approx(SHAPE[0] * 1e3 / stats["median_ms"])
    assert stats["threads"] == physical_cores()


def test_a_model_that_does_not_load_is_a_one_line_error(tmp_path):
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not onnx")
    with pytest.raises(PipelineError, match=r"^measuring onnxruntime on .*model.onnx failed: [^\n]+$"):
        measure_isolated("onnxruntime", broken, np.zeros(SHAPE, np.float32), warmup=0, repeats=1)
