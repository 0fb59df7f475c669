"""How much memory building a model needs, and how much this machine has: an input size that
cannot fit is refused before any work starts, not by a traceback or the OOM killer minutes later.

Export traces the model on a batch of inputs, and evaluation runs it in PyTorch and ONNX Runtime:
each holds a whole batch's activations in float32 at once. ConvNeXt's largest live set is in a
stage-0 block at 1/4 resolution: the block's input (kept for the residual), the Linear C->4C output
and its GELU (the permute before them is a view) -- 9C floats a pixel.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.model import VariantSpec

FLOAT_BYTES = 4
# Copies of the weights alive at once: the PyTorch model, the exported and the simplified ONNX
# graph, the compiled module's constants.
WEIGHT_COPIES = 4
# Allocator slack, temporaries of unfused ops, ONNX Runtime's arena: a forward pass needs more than
# the tensors the estimate names. Twice the estimate keeps clear of the OOM killer.
ACTIVATION_MARGIN = 2


def parameter_count(spec: VariantSpec, in_chans: int, num_classes: int) -> int:
    """Parameters of a ConvNeXt of this spec (pipeline/model.py's layers, counted)."""
    dims = spec.dims
    count = in_chans * 16 * dims[0] + dims[0] + 2 * dims[0]  # stem conv 4x4 + LayerNorm
    for before, dim in zip(dims, dims[1:]):
        count += 2 * before + 4 * before * dim + dim  # LayerNorm + conv 2x2
    for depth, dim in zip(spec.depths, dims):
        # dwconv 7x7, LayerNorm, Linear C->4C, Linear 4C->C, gamma
        count += depth * (49 * dim + dim + 2 * dim + 4 * dim * dim + 4 * dim + 4 * dim * dim + dim + dim)
    return count + 2 * dims[-1] + dims[-1] * num_classes + num_classes  # norm + head


def build_memory_bytes(spec: VariantSpec, in_chans: int, num_classes: int, input_size: int,
                       batch_size: int) -> int:
    """Bytes a build of this model needs at its peak, with margin (see the module docstring): the
    batch's inputs and largest live activations, and the copies of the weights."""
    pixels = input_size * input_size
    per_image = in_chans * pixels + 9 * spec.dims[0] * (pixels // 16)
    activations = batch_size * per_image * FLOAT_BYTES
    weights = WEIGHT_COPIES * parameter_count(spec, in_chans, num_classes) * FLOAT_BYTES
    return ACTIVATION_MARGIN * activations + weights


def available_memory_bytes() -> int | None:
    """Memory this process can still take: Linux's MemAvailable, capped by a cgroup v2 limit
    (a container's OOM killer acts on that); None where neither can be read."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            room = int(limit) - used
            available = room if available is None else min(available, room)
    except (OSError, ValueError):
        pass
    return available


def largest_input_size(spec: VariantSpec, in_chans: int, num_classes: int, batch_size: int,
                       limit: int) -> int:
    """The largest multiple of 32 whose build fits in `limit` bytes (0 if none does)."""
    size = 0
    while build_memory_bytes(spec, in_chans, num_classes, size + 32, batch_size) <= limit:
        size += 32
    return size


def gigabytes(count: int) -> str:
    return f"{count / 2**30:.1f} GB"
