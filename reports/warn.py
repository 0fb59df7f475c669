"""Warnings about report files that were skipped: printed, and kept for the README."""

from __future__ import annotations

import sys


def warn(message: str, sink: list[str] | None = None) -> None:
    """Print `warning: message` on stderr and, when given a list, remember it there."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
    if sink is not None:
        sink.append(message)
