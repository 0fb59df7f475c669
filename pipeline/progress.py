"""Progress lines for long work (evaluation, calibration, tuning, training)."""

from __future__ import annotations

import sys
import time


class Progress:
    """Reports `done/total` about every 10%, with rate and time left.

    On a terminal it redraws one line; in a log (CI, a pipe) it prints whole lines
    so that the log stays readable.
    """

    def __init__(self, label: str, total: int, unit: str = "images", stream=None):
        self.label = label
        self.total = max(int(total), 1)
        self.unit = unit
        self.stream = stream or sys.stderr
        self.started = time.perf_counter()
        self.next_fraction = 0.1
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, done: int) -> None:
        fraction = done / self.total
        if fraction < self.next_fraction and done < self.total:
            return
        while self.next_fraction <= fraction:
            self.next_fraction += 0.1
        elapsed = time.perf_counter() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (self.total - done) / rate if rate > 0 else 0.0
        line = f"{self.label}: {done}/{self.total} {self.unit} ({rate:.1f}/s, {left:.0f}s left)"
        if self.interactive:
            end = "\n" if done >= self.total else ""
            print(f"\r{line}", end=end, file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)
