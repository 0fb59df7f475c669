"""An aarch64 artifact checked under qemu: run by pipeline/runtime/cross.py (the runner the
board would use) and compared with a reference, the x86 artifact's output."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.runtime.cross import run_under_qemu


def check_close(output: np.ndarray, reference: np.ndarray, atol: float, what: str) -> dict:
    """Compare through the one comparator; raises when the outputs differ by more than atol."""
    from pipeline.compare import compare_logits

    comparison = compare_logits(
        reference.reshape(reference.shape[0], -1), output.reshape(output.shape[0], -1)
    )
    if comparison["max_abs_error"] > atol:
        raise PipelineError(
            f"{what} differs from the reference by {comparison['max_abs_error']:.3g} (tolerance {atol:g})"
        )
    return comparison


def verify_under_qemu(library: Path, x: np.ndarray, reference: np.ndarray, atol: float = 1e-4) -> dict:
    """Run under qemu and compare with `reference` (e.g. the x86 artifact's output)."""
    output, timing = run_under_qemu(library, x)
    comparison = check_close(output, reference, atol, f"{Path(library).name} under qemu")
    return {**comparison, "qemu_median_ms": timing["median_ms"]}
