"""The one comparator every accuracy check goes through (NumPy only: the GPU bundle carries it)."""

from __future__ import annotations

import numpy as np


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k largest logits."""
    k = min(k, logits.shape[1])
    topk = np.argpartition(-logits, kth=k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(topk == labels[:, None], axis=1)))


def compare_logits(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """Agreement and error of `candidate` against `reference` (both (N, classes)),
    plus top-1/top-5 of each when labels are known."""
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape:
        raise ValueError(f"output shapes differ: {reference.shape} vs {candidate.shape}")
    diff = np.abs(reference - candidate)
    ref_norm = np.linalg.norm(reference, axis=1)
    cand_norm = np.linalg.norm(candidate, axis=1)
    cosine = np.sum(reference * candidate, axis=1) / np.maximum(ref_norm * cand_norm, 1e-30)
    result = {
        "count": int(reference.shape[0]),
        # NaN compares unequal to everything, so a NaN output cannot hide in the errors
        # below (they become NaN too), but a count says how much of it there is.
        "nan_count": int(np.isnan(candidate).sum()),
        "top1_agreement": float(np.mean(reference.argmax(1) == candidate.argmax(1))),
        "relative_l2": float(np.linalg.norm(reference - candidate) / max(float(np.linalg.norm(reference)), 1e-30)),
        "max_abs_error": float(diff.max()) if diff.size else 0.0,
        "mean_abs_error": float(diff.mean()) if diff.size else 0.0,
        "cosine_min": float(cosine.min()) if cosine.size else 1.0,
        "cosine_mean": float(cosine.mean()) if cosine.size else 1.0,
    }
    if labels is not None:
        labels = np.asarray(labels)
        result["reference_top1"] = topk_accuracy(reference, labels, 1)
        result["reference_top5"] = topk_accuracy(reference, labels, 5)
        result["top1"] = topk_accuracy(candidate, labels, 1)
        result["top5"] = topk_accuracy(candidate, labels, 5)
    return result
