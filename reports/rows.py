"""One row of reports/README.md: a target x precision of one model (ModelKey), with what it
reads from its latency.json and accuracy.json (Row), or the reason it has no measurement."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any


def as_dict(value: Any) -> dict:
    """A report's section when it is one, else an empty dict, so optional sections read without checks."""
    return value if isinstance(value, dict) else {}


def as_number(value: Any) -> float | None:
    """A finite number from a report, or None for anything else (absent, null, text, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class ModelKey:
    """What makes two reports comparable in one table."""

    variant: str
    num_classes: int | None
    input_shape: tuple[int, ...] | None

    def label(self) -> str:
        classes = "? classes" if self.num_classes is None else f"{self.num_classes} classes"
        shape = "input ?" if self.input_shape is None else "input " + "x".join(map(str, self.input_shape))
        return f"{self.variant}, {classes}, {shape}"

    def text(self) -> str:
        """The model's name in history.jsonl."""
        shape = "?" if self.input_shape is None else "x".join(map(str, self.input_shape))
        return f"{self.variant}/{'?' if self.num_classes is None else self.num_classes}/{shape}"

    def slug(self) -> str:
        """A file-name-safe form, for the plots."""
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.text().replace("/", "-")).strip("-") or "model"

    def sort_key(self) -> tuple:
        return (self.variant, self.num_classes is None, self.num_classes or 0, self.input_shape or ())


@dataclass
class Row:
    """One target x precision of one model: a measurement (whole or half) or the reason there is none."""

    target: str
    precision: str
    model: ModelKey
    folder: str | None = None
    latency: dict | None = None
    accuracy: dict | None = None
    not_measured: str | None = None
    flags: list[str] = field(default_factory=list)
    previous: dict | None = None

    @property
    def measured(self) -> bool:
        return self.latency is not None or self.accuracy is not None

    @property
    def label(self) -> str:
        return f"{self.target} {self.precision}"

    def _record(self) -> dict:
        return self.latency if self.latency is not None else self.accuracy or {}

    @property
    def provenance(self) -> dict:
        return as_dict(self._record().get("provenance"))

    @property
    def tvm(self) -> dict:
        return as_dict(as_dict(as_dict(self.latency).get("backends")).get("tvm"))

    @property
    def metrics(self) -> dict:
        return as_dict(as_dict(self.accuracy).get("metrics"))

    @property
    def median_ms(self) -> float | None:
        return as_number(self.tvm.get("median_ms"))

    def speedup(self, backend: str) -> float | None:
        return as_number(as_dict(as_dict(self.latency).get("tvm_speedup")).get(f"vs_{backend}"))

    def fastest_pytorch(self) -> tuple[str, float] | None:
        """(backend name, median ms) of the fastest PyTorch configuration measured beside TVM
        (eager, channels_last, torch.compile, CUDA graphs...), or None."""
        backends = as_dict(as_dict(self.latency).get("backends"))
        timed = [(median, name == "pytorch", name) for name, stats in backends.items()
                 if name.startswith(("pytorch", "torch_")) and (median := as_number(as_dict(stats).get("median_ms")))]
        # "pytorch" can alias a named configuration of the same time: the named one says more.
        return (min(timed)[2], min(timed)[0]) if timed else None

    @property
    def top1(self) -> float | None:
        return as_number(self.metrics.get("top1"))

    @property
    def agreement(self) -> float | None:
        return as_number(self.metrics.get("top1_agreement"))

    @property
    def samples_ms(self) -> tuple[float, ...]:
        """Raw per-call latencies, when bench recorded them (optional `samples_ms`)."""
        samples = self.tvm.get("samples_ms")
        if not isinstance(samples, list):
            return ()
        values = [as_number(v) for v in samples]
        return tuple(v for v in values if v is not None)

    @property
    def tuning(self) -> str:
        """Tuning used, from model.tuning (see reports.target_report.describe_tuning)."""
        from reports.target_report import describe_tuning

        return describe_tuning(as_dict(self._record().get("model")).get("tuning"))

    @property
    def tuning_database(self) -> str | None:
        """The tuning database compile applied, as the report recorded it."""
        database = as_dict(as_dict(self._record().get("model")).get("tuning")).get("database")
        return database if isinstance(database, str) else None

    @property
    def records(self) -> str:
        """The tuning records the artifact was compiled with: database and content hash, or "none"."""
        records = as_dict(as_dict(self._record().get("model")).get("tuning_records"))
        if not records.get("database"):
            return "none"
        return f"{records['database']}@{str(records.get('sha256'))[:12]}"

    def history_entry(self) -> dict[str, Any]:
        origin = self.provenance
        host = as_dict(origin.get("host"))
        return {
            "target": self.target,
            "precision": self.precision,
            "model": self.model.text(),
            "device": origin.get("device"),
            "cpu": host.get("cpu"),
            "mcpu": host.get("mcpu"),
            "cores": host.get("cores"),
            "records": self.records,
            "commit": origin.get("commit"),
            "date": origin.get("date"),
            "median_ms": self.median_ms,
            "p99_ms": as_number(self.tvm.get("p99_ms")),
            "top1_agreement": self.agreement,
            "top1": self.top1,
        }
