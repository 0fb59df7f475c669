"""Summary statistics of measured latencies (NumPy only: the GPU bundle carries it)."""

from __future__ import annotations

import numpy as np


def latency_stats(seconds: list[float], batch_size: int) -> dict:
    """Summary statistics of per-call latencies, in milliseconds."""
    ms = np.asarray(seconds) * 1e3
    median = float(np.median(ms))
    return {
        "repeats": int(ms.size),
        "min_ms": float(ms.min()),
        "median_ms": median,
        "mean_ms": float(ms.mean()),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "std_ms": float(ms.std()),
        "throughput_ips": batch_size * 1e3 / median,
        # Every run, so that reports can draw the distribution, not only its summary.
        "samples_ms": [round(float(v), 4) for v in ms],
    }
