"""simplify: ONNX -> onnxsim-simplified ONNX with the same outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import PipelineConfig
from pipeline.engine import Stage
from pipeline.errors import PipelineError
from pipeline.onnx_io import load_onnx
from targets import Target

SIMPLIFY_TOLERANCE = 1e-5


def settings(config: PipelineConfig, target: Target) -> dict:
    return {}


def check_user_onnx(path: Path, shape: tuple[int, ...]) -> None:
    """A user's --onnx must load and take one input that fits `shape` (dynamic dims fit
    anything); checked before any stage runs, so the error is the first thing printed."""
    model = load_onnx(path)
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise PipelineError(f"'{path}' has {len(inputs)} inputs; the pipeline compiles models with one image input")
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != len(shape) or any(d is not None and d != s for d, s in zip(dims, shape)):
        described = "x".join("?" if d is None else str(d) for d in dims)
        raise PipelineError(
            f"'{path}' takes input '{inputs[0].name}' of shape {described}, not {'x'.join(map(str, shape))}; "
            f"pass the --batch-size, --in-chans and --input-size it was exported with"
        )


def count_ops(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def random_feed(model, seed: int, batch_size: int) -> dict[str, np.ndarray]:
    """A random input for every graph input, with dynamic dims set to batch_size."""
    initializers = {init.name for init in model.graph.initializer}
    feed = {}
    rng = np.random.default_rng(seed)
    for graph_input in model.graph.input:
        if graph_input.name in initializers:
            continue
        dims = [d.dim_value if d.dim_value > 0 else batch_size for d in graph_input.type.tensor_type.shape.dim]
        feed[graph_input.name] = rng.standard_normal(dims, dtype=np.float32)
    return feed


def simplify(model):
    """``model`` (an onnx.ModelProto) simplified by onnxsim, as this stage does."""
    import onnxsim

    simplified, ok = onnxsim.simplify(model, check_n=0)
    if not ok:
        raise PipelineError("onnxsim could not simplify the model; pass --onnx with an already simplified model")
    return simplified


def run(config: PipelineConfig, target: Target, inputs: dict[str, Path], out_dir: Path) -> dict:
    import onnx
    import onnxruntime as ort

    original = load_onnx(inputs["onnx"])
    simplified = simplify(original)
    path = out_dir / "model.sim.onnx"
    onnx.save(simplified, str(path))
    onnx.checker.check_model(str(path))

    # onnxsim's own check compares random runs too; this one is ours, with our tolerance.
    feed = random_feed(original, config.seed, config.batch_size)
    before = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    after = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
    max_error = max(float(np.abs(a - b).max()) for a, b in zip(before, after))
    if max_error > SIMPLIFY_TOLERANCE:
        raise PipelineError(f"simplified model differs by {max_error:.2e}; report this model to the developers")
    ops_before, ops_after = count_ops(original), count_ops(simplified)
    return {
        "outputs": {"onnx_simplified": "model.sim.onnx"},
        "info": {
            "nodes_before": sum(ops_before.values()),
            "nodes_after": sum(ops_after.values()),
            "ops_before": ops_before,
            "ops_after": ops_after,
            "max_abs_error_vs_original": max_error,
        },
    }


STAGE = Stage(name="simplify", inputs=("onnx",), outputs=("onnx_simplified",), settings=settings, run=run)
