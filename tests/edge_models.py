"""The micro ConvNeXt at 64x64, exported once and compiled once per (target, params mode)
per test session, for the tests of edge targets (cross builds, CUDA, RPC, packaging)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SHAPE = (1, 3, 64, 64)
_cache: dict[tuple, Path] = {}


def micro_onnx(tmp_path_factory) -> Path:
    """The micro variant (10 classes) exported to ONNX for a 1x3x64x64 input."""
    if "onnx" not in _cache:
        from pipeline.model import create_model
        from pipeline.stages.export import export_onnx

        path = tmp_path_factory.mktemp("micro-onnx") / "micro.onnx"
        export_onnx(create_model("micro", num_classes=10).eval(), path, SHAPE, opset=17, dynamic_batch=False)
        _cache["onnx"] = path
    return _cache["onnx"]


def compiled(tmp_path_factory, target_name: str, params_mode: str = "embedded") -> Path:
    """The micro model compiled for a target: the path of its model.so."""
    key = (target_name, params_mode)
    if key not in _cache:
        from pipeline.compiler.backend import compile_onnx
        from targets import get_target

        library = tmp_path_factory.mktemp(f"micro-{target_name}-{params_mode}") / "model.so"
        compile_onnx(micro_onnx(tmp_path_factory), get_target(target_name), library,
                     params_mode=params_mode, input_shape=SHAPE)
        _cache[key] = library
    return _cache[key]


def seeded_simplified_onnx(path: Path, variant: str, num_classes: int, shape: tuple[int, ...]) -> Path:
    """``variant`` with pipeline/seeded_weights.py's weights (seed 0), exported at a fixed
    ``shape`` and simplified as the pipeline's stages do: the model the GPU bundle compiles
    (weights no two alike: onnxsim merges equal initializers, e.g. the zero biases of a
    fresh model, into one parameter read in many places)."""
    import onnx

    from pipeline.model import create_model
    from pipeline.seeded_weights import seed_model
    from pipeline.stages.export import export_onnx
    from pipeline.stages.simplify import simplify

    export_onnx(seed_model(create_model(variant, num_classes=num_classes).eval(), 0), path, shape, opset=17,
                dynamic_batch=False)
    onnx.save(simplify(onnx.load(str(path))), str(path))
    return path


def sample(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE, dtype=np.float32)


def elf_machine(path: Path) -> int:
    """e_machine of an ELF file: 62 x86-64, 183 aarch64."""
    header = Path(path).read_bytes()[:20]
    assert header[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return int.from_bytes(header[18:20], "little")
