"""ConvNeXt weights made from a seed on a coarse grid, the same on any machine.

The GPU check (benchmarks/gpu_check.py) compares a TVM artifact compiled here with
PyTorch on a machine that receives at most 64 MiB: random float weights do not compress
(an fp16 ConvNeXt-T artifact is 58 MB), but values on a coarse power-of-two grid do
(a few bits of entropy each, so xz shrinks them 8-10x), and both sides can rebuild them
from the seed instead of shipping a checkpoint. Every value is a small integer times a
power of two, so float16 holds it exactly: the fp16 and fp32 artifacts carry the same
weights.

Scales keep activations of order one through every stage, so that fp16 neither
overflows nor loses the logits' ranking in rounding: convolution and linear weights
~ 1/sqrt(fan_in), LayerNorm weights near 1, layer scale 1/4 (the release's 1e-6 would
make every block an identity and test nothing).

NumPy only: this file travels in the GPU bundle beside pipeline/model.py.
"""

from __future__ import annotations

import math
import zlib
from typing import Iterable

import numpy as np

# Integer levels of the grid: k * step for k in -LEVELS..LEVELS.
LEVELS = 4


def _step(scale: float) -> float:
    """The power of two nearest to scale / 2 (so that +-LEVELS steps span about +-2 scale)."""
    return 2.0 ** round(math.log2(scale / 2))


def _kind(name: str, shape: tuple[int, ...]) -> str:
    if name.endswith("gamma"):
        return "layer_scale"
    if name.endswith("bias"):
        return "bias"
    if len(shape) == 1:
        return "norm"  # LayerNorm weights (biases are caught above)
    return "weight"


def seeded_array(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The float32 value of parameter ``name`` for ``seed`` (independent of other names)."""
    rng = np.random.Generator(np.random.PCG64([seed, zlib.crc32(name.encode())]))
    levels = np.clip(np.rint(rng.standard_normal(shape) * LEVELS / 2), -LEVELS, LEVELS)
    kind = _kind(name, shape)
    if kind == "layer_scale":
        return np.full(shape, 0.25, dtype=np.float32) + levels.astype(np.float32) * 2.0**-6
    if kind == "norm":
        return 1.0 + levels.astype(np.float32) * 2.0**-4
    if kind == "bias":
        return levels.astype(np.float32) * 2.0**-6
    fan_in = int(np.prod(shape[1:]))
    return (levels * _step(1.0 / math.sqrt(fan_in))).astype(np.float32)


def seeded_state(shapes: Iterable[tuple[str, tuple[int, ...]]], seed: int) -> dict[str, np.ndarray]:
    """Name -> float32 array for every (name, shape), e.g. a model's state_dict items."""
    return {name: seeded_array(name, tuple(shape), seed) for name, shape in shapes}


def seed_model(net, seed: int):
    """``net`` (a torch module) with every parameter and buffer set to its seeded value."""
    import torch

    state = seeded_state(((k, tuple(v.shape)) for k, v in net.state_dict().items()), seed)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    return net
