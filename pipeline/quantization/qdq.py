"""Post-training INT8 quantization with ONNX Runtime's quantizer, in QDQ format.

What gets quantized, and how:

- Convolutions, MatMuls and Gemms (every layer with a constant weight): weights int8,
  symmetric (zero point 0), per output channel by default (`per_channel=False`: one scale
  per tensor); activations int8, per tensor, asymmetric (a zero point). Signed int8 for
  activations because the TVM lowering (pipeline/compiler/int8.py) computes int8 x int8 -> int32,
  the form every CPU/GPU int8 dot product takes; asymmetric because ConvNeXt feeds a GELU
  output (range about [-0.17, +max]) into pwconv2, where a symmetric range would waste
  half of the 256 levels. The zero point costs nothing at run time: the lowering folds
  it into the int32 bias.
- Everything else stays float, by default and on purpose: LayerNorm (normalizing by
  per-token statistics needs more resolution than 8 bits gives its input), GELU (the erf
  curve is where the error concentrates), Softmax, and the residual adds and layer-scale
  multiplies (elementwise and memory-bound: int8 would add rounding to the residual
  stream and save no compute). The reference facts (shared/reference/convnext-facts.md)
  say it plainly: "LayerNorm and GELU make ConvNeXt hard to quantize: keep them in float
  first, then earn them back"; published ConvNeXt INT8 PTQ loses 3.5 to 6 points of top-1
  (RDK X5: atto 73.25 -> 69.75, pico 77.25 -> 71.03) even with vendor tooling.

Calibration (the ranges every quantized tensor gets) is pipeline/quantization/calibrate.py;
what to quantize is a `QuantizeSettings` (pipeline/quantization/settings.py).
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx

from pipeline.errors import PipelineError
from pipeline.quantization.calibrate import calibrate, quiet_ort
from pipeline.quantization.settings import QUANTIZED_OP_TYPES, QuantizeSettings

# Ops that mark a model as already quantized.
QUANTIZED_MARKERS = (
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul", "MatMulNBits",
)

# Why the ops that are not quantized stay float: family -> (op types, reason).
FLOAT_FAMILIES: dict[str, tuple[tuple[str, ...], str]] = {
    "LayerNorm": (
        ("LayerNormalization", "ReduceMean", "Sub", "Pow", "Sqrt"),
        "normalizes by per-token mean and variance; 8 bits cannot hold the statistics of its input "
        "(convnext-facts.md: 'LayerNorm and GELU make ConvNeXt hard to quantize: keep them in float first')",
    ),
    "GELU": (
        ("Erf", "Gelu"),
        "the erf curve is where int8 error concentrates; its output is quantized as the next Linear's input",
    ),
    "Softmax": (("Softmax",), "exponentials over a long-tailed range; int8 needs a lookup table, not a scale"),
    "elementwise": (
        ("Add", "Mul", "Div"),
        "residual adds, layer scale, GELU/LayerNorm arithmetic: memory-bound, so int8 saves no compute "
        "and would round the residual stream",
    ),
    "data movement": (
        ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Constant", "GlobalAveragePool"),
        "moves data, computes nothing",
    ),
}


@dataclass(frozen=True)
class Layer:
    """A quantizable node: its (possibly renamed) name, op type and name in the input model."""

    name: str
    op_type: str
    original_name: str


# ---------------------------------------------------------------------------
# The float model


def load_float_model(path: Path) -> onnx.ModelProto:
    """Load an ONNX model to quantize; refuse one that is already quantized."""
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # DecodeError, OSError: all mean "not a model"
        raise PipelineError(f"'{path}' is not an ONNX model ({type(exc).__name__}); pass the simplified float model") from None
    markers = Counter(node.op_type for node in model.graph.node if node.op_type in QUANTIZED_MARKERS)
    int8_weights = sum(
        init.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) for init in model.graph.initializer
    )
    if markers or int8_weights:
        found = ", ".join(f"{n} {op}" for op, n in markers.most_common(3)) or f"{int8_weights} int8 weights"
        raise PipelineError(
            f"'{path}' is already quantized ({found}); quantize the float model instead "
            "(the output of `pipeline simplify`)"
        )
    return model


def input_shape(model: onnx.ModelProto) -> tuple[int | None, int, int, int]:
    """(batch or None if dynamic, channels, height, width) of the model's one image input."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise PipelineError(f"the model has {len(inputs)} inputs; quantization calibrates models with one image input")
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or any(d is None for d in dims[1:]):
        raise PipelineError(f"the model input is {dims}; quantization needs a fixed (N, C, H, W) image input")
    return dims[0], dims[1], dims[2], dims[3]


_SCOPED = re.compile(r"^(/.*/)([^/]+)/[^/]+$")  # "/stages.0/stages.0.0/act/Div" -> scope, module


def _module_path(name: str) -> tuple[str, str] | None:
    match = _SCOPED.match(name)
    return (match.group(1), match.group(2)) if match else None


def name_layers(model: onnx.ModelProto) -> dict[str, str]:
    """Give quantizable nodes without a module path a readable one, in place; {new: old}.

    The TorchScript exporter names nodes after their module ("/stages.0/stages.0.0/dwconv/Conv"),
    but onnxsim's MatMul+Add -> Gemm fusion leaves "Gemm_1". Such a node is named after the
    module of a tensor just downstream of it through reshapes ("/.../pwconv2/Add_output_0"
    -> "/.../pwconv2/Gemm"), else after its scope and the module feeding it
    ("/stages.0/stages.0.0/Gemm_after_norm").
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    taken = {node.name for node in model.graph.node}
    renamed: dict[str, str] = {}

    def downstream_module(tensor: str) -> tuple[str, str] | None:
        for _ in range(3):
            users = consumers.get(tensor, [])
            if len(users) != 1 or users[0].op_type not in ("Reshape", "Transpose", "Flatten", "Squeeze"):
                return None
            tensor = users[0].output[0]
            found = _module_path(tensor)
            if found:
                return found
        return None

    def upstream_module(tensor: str) -> tuple[str, str] | None:
        for _ in range(3):
            node = producers.get(tensor)
            if node is None:
                return None
            found = _module_path(node.name)
            if found:
                return found
            tensor = node.input[0] if node.input else ""
        return None

    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OP_TYPES or node.name.startswith("/"):
            continue
        below = downstream_module(node.output[0])
        if below:
            name = f"{below[0]}{below[1]}/{node.op_type}"
        else:
            above = upstream_module(node.input[0])
            if above is None:
                continue
            name = f"{above[0]}{node.op_type}_after_{above[1]}"
        base, k = name, 2
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        renamed[name] = node.name or f"{node.op_type}_{len(renamed)}"
        node.name = name
    return renamed


def quantizable_layers(model: onnx.ModelProto, renamed: dict[str, str] | None = None) -> list[Layer]:
    """Conv/MatMul/Gemm nodes whose weight is a constant, in graph order."""
    renamed = renamed or {}
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    return [
        Layer(node.name, node.op_type, renamed.get(node.name, node.name))
        for node in model.graph.node
        if node.op_type in QUANTIZED_OP_TYPES and len(node.input) > 1 and node.input[1] in constants
    ]


def activation_matmuls(model: onnx.ModelProto, layers: list[Layer]) -> list[str]:
    """MatMul/Gemm nodes with two activation inputs (attention): kept float."""
    names = {layer.name for layer in layers}
    return [n.name for n in model.graph.node if n.op_type in QUANTIZED_OP_TYPES and n.name not in names]


def resolve_exclude(model: onnx.ModelProto, layers: list[Layer], patterns: Iterable[str]) -> dict[str, str]:
    """{layer name: the pattern that excludes it}. A pattern that matches no node is an error;
    one that matches only float ops (LayerNormalization) is fine: they are float already."""
    excluded: dict[str, str] = {}
    for pattern in patterns:
        hits = [
            layer for layer in layers
            if any(fnmatch.fnmatchcase(text, pattern) for text in (layer.name, layer.original_name, layer.op_type))
        ]
        for layer in hits:
            excluded.setdefault(layer.name, pattern)
        if not hits and not any(
            fnmatch.fnmatchcase(node.name, pattern) or fnmatch.fnmatchcase(node.op_type, pattern)
            for node in model.graph.node
        ):
            examples = ", ".join(layer.name for layer in layers[:2])
            raise PipelineError(
                f"--exclude '{pattern}' matches no node name or op type; "
                f"layers are named like {examples} (op types: {', '.join(QUANTIZED_OP_TYPES)})"
            )
    return excluded


def float_op_families(model: onnx.ModelProto) -> list[dict]:
    """The ops that stay float because they are not quantized at all, grouped, with why."""
    counts = Counter(node.op_type for node in model.graph.node if node.op_type not in QUANTIZED_OP_TYPES)
    families = []
    for family, (op_types, reason) in FLOAT_FAMILIES.items():
        ops = {op: counts.pop(op) for op in op_types if op in counts}
        if ops:
            families.append({"family": family, "ops": ops, "reason": reason})
    if counts:
        families.append({"family": "other", "ops": dict(counts), "reason": "not a quantized op type"})
    return families


# ---------------------------------------------------------------------------
# Quantizing


@dataclass
class Calibrated:
    """A float model with calibrated ranges: quantize it any number of ways without recalibrating."""

    float_model: Path  # the float model with readable layer names
    ranges: Path  # ORT calibration cache (MinMax-tagged JSON)
    settings: QuantizeSettings
    layers: list[Layer]
    batch_size: int
    # Conv/MatMul/Gemm nodes that are never quantized (two activation inputs), with why.
    always_float: dict[str, str]

    def quantize(self, output: Path, exclude: Iterable[str] = (), only: Iterable[str] | None = None) -> Path:
        """Write a QDQ model quantizing every layer but `exclude` (or only `only`)."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        only = list(only) if only is not None else None
        with quiet_ort():
            quantize_static(
                str(self.float_model), str(output), calibration_data_reader=None,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OP_TYPES),
                per_channel=self.settings.per_channel,
                reduce_range=False,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=only or [],
                nodes_to_exclude=sorted(set(exclude) | set(self.always_float)),
                calibrate_method=CalibrationMethod.MinMax,
                calibration_cache_path=str(self.ranges),
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
        if self.settings.float_outputs:
            model = onnx.load(str(output))
            float_consumers_read_float(model)
            onnx.save(model, str(output))
        return output


def float_consumers_read_float(model: onnx.ModelProto) -> int:
    """Let ops that compute in float read the float tensor, not its int8-rounded copy; in place.

    ONNX Runtime puts one QuantizeLinear -> DequantizeLinear pair on every tensor a quantized
    layer reads or writes, and points *all* consumers at the dequantized copy: the residual
    adds, LayerNorms, GELUs and the logits all see values rounded to 8 bits although they
    compute in float. Here only quantized layers keep reading the QDQ copy; the pairs nobody
    reads any more go away (a layer whose output only float ops read then ends in a
    dequantizing, not a requantizing, epilogue). Returns the number of inputs rewired.
    """
    nodes = model.graph.node
    quantize_of = {n.output[0]: n for n in nodes if n.op_type == "QuantizeLinear"}
    source = {  # dequantized copy -> the float tensor it copies
        n.output[0]: quantize_of[n.input[0]].input[0]
        for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in quantize_of
    }
    dequantized = {n.output[0] for n in nodes if n.op_type == "DequantizeLinear"}
    rewired = 0
    for node in nodes:
        quantized_layer = node.op_type in QUANTIZED_OP_TYPES and len(node.input) > 1 and node.input[1] in dequantized
        if quantized_layer or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for index, name in enumerate(node.input):
            if name in source:
                node.input[index] = source[name]
                rewired += 1
    # A quantized graph output: the float tensor takes the output's name.
    for output in model.graph.output:
        if output.name in source:
            float_name = source[output.name]
            for node in nodes:
                if node.op_type in ("QuantizeLinear", "DequantizeLinear") and (
                    float_name in node.input or output.name in node.output
                ):
                    continue
                node.output[:] = [output.name if o == float_name else o for o in node.output]
                node.input[:] = [output.name if i == float_name else i for i in node.input]
            rewired += 1
    _remove_dead_qdq(model)
    return rewired


def _remove_dead_qdq(model: onnx.ModelProto) -> None:
    graph = model.graph
    while True:
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        producers = {name for node in graph.node for name in node.output}
        dead = [
            node for node in graph.node
            if node.op_type in ("QuantizeLinear", "DequantizeLinear")
            and (node.output[0] not in used or node.input[0] not in producers | _graph_inputs(model))
        ]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    unused = [init for init in graph.initializer if init.name not in used]
    for init in unused:
        graph.initializer.remove(init)


def _graph_inputs(model: onnx.ModelProto) -> set[str]:
    return {i.name for i in model.graph.input} | {init.name for init in model.graph.initializer}


def prepare(
    model: onnx.ModelProto, images: np.ndarray, settings: QuantizeSettings, work_dir: Path
) -> tuple[Calibrated, dict[str, str]]:
    """Name the layers, check the exclusions, calibrate: (Calibrated, {layer: exclude pattern})."""
    from onnxruntime.quantization.calibrate import save_tensors_data

    work_dir.mkdir(parents=True, exist_ok=True)
    renamed = name_layers(model)
    layers = quantizable_layers(model, renamed)
    if not layers:
        raise PipelineError("the model has no Conv, MatMul or Gemm with constant weights: nothing to quantize")
    excluded = resolve_exclude(model, layers, settings.exclude)
    float_model = work_dir / "model.named.onnx"
    onnx.save(model, str(float_model))
    batch = input_shape(model)[0] or 8
    tensors = calibrate(float_model, images, settings, work_dir, batch)
    ranges = work_dir / "calibration_ranges.json"
    save_tensors_data(tensors, ranges)
    always_float = {
        name: "both inputs are activations (no constant weight to quantize per channel)"
        for name in activation_matmuls(model, layers)
    }
    return Calibrated(float_model, ranges, settings, layers, batch, always_float), excluded


def quantized_layers(model_path: Path) -> list[str]:
    """Names of the Conv/MatMul/Gemm nodes of a QDQ model whose weight is dequantized int8."""
    model = onnx.load(str(model_path))
    dequantized = {node.output[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    return [
        node.name for node in model.graph.node
        if node.op_type in QUANTIZED_OP_TYPES and len(node.input) > 1 and node.input[1] in dequantized
    ]
