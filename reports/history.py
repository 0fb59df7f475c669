"""reports/history.jsonl: one line per measured report row, appended by each
regeneration, so that a regression is judged against the last measurement of the
same model on the same target and precision, on the same machine (device, CPU model
name, -mcpu, cores) and with the same tuning records. Entries written before those
were recorded compare with nothing newer.

A line is identified by the report it came from (date, commit, target, precision,
model): regenerating with unchanged reports appends nothing.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Iterable

from reports.warn import warn

HISTORY_FILE = "history.jsonl"
FIELDS = (
    "target", "precision", "model", "device", "cpu", "mcpu", "cores", "records", "commit", "date",
    "median_ms", "p99_ms", "top1_agreement", "top1",
)
# What makes two entries comparable: the same thing measured on the same machine with the same records.
GROUP = ("target", "precision", "model", "device", "cpu", "mcpu", "cores", "records")


def entry_key(entry: dict[str, Any]) -> tuple:
    """Which report an entry came from; two entries with the same key are duplicates."""
    return tuple(entry.get(name) for name in ("date", "commit", "target", "precision", "model"))


def group_key(entry: dict[str, Any]) -> tuple:
    """Entries that measure the same thing, and so may be compared."""
    return tuple(entry.get(name) for name in GROUP)


def _when(entry: dict[str, Any]) -> _dt.datetime | None:
    """The entry's date as an aware datetime (naive dates are taken as UTC), or None."""
    try:
        when = _dt.datetime.fromisoformat(str(entry.get("date")))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=_dt.timezone.utc)


def load_history(path: Path, warnings: list[str] | None = None) -> list[dict[str, Any]]:
    """The entries of a history file, in file order; unreadable lines are skipped with a warning."""
    path = Path(path)
    if not path.is_file():
        return []
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            warn(f"{path}:{number}: not valid JSON ({exc.msg}); line skipped", warnings)
            continue
        if not isinstance(entry, dict) or not entry.get("target") or not entry.get("precision"):
            warn(f"{path}:{number}: not a history entry (needs target and precision); line skipped", warnings)
            continue
        entries.append(entry)
    return entries


def previous_entry(history: Iterable[dict[str, Any]], entry: dict[str, Any]) -> dict[str, Any] | None:
    """The latest entry of the same group dated before `entry`, or None.

    Ordering is by date, not by file position, so that regenerating from an older
    checkout compares against what came before that report. Entries without a
    readable date cannot be ordered and are never compared.
    """
    now = _when(entry)
    if now is None:
        return None
    group, key = group_key(entry), entry_key(entry)
    best, best_when = None, None
    for candidate in history:
        if group_key(candidate) != group or entry_key(candidate) == key:
            continue
        when = _when(candidate)
        if when is None or when >= now:
            continue
        if best_when is None or when >= best_when:
            best, best_when = candidate, when
    return best


def append_entries(path: Path, history: list[dict[str, Any]], entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Append the entries not already in `history` (which is updated) to the file; returns them."""
    seen = {entry_key(entry) for entry in history}
    new = []
    for entry in entries:
        key = entry_key(entry)
        if key in seen:
            continue
        seen.add(key)
        new.append({name: entry.get(name) for name in FIELDS})
    if new:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # One write: an interrupted run leaves at most one partial line, which load_history
        # skips; start on a fresh line so that a partial line never swallows a new entry.
        fresh_line = not path.is_file() or path.read_bytes()[-1:] in (b"", b"\n")
        with open(path, "a") as f:
            f.write(("" if fresh_line else "\n") + "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in new))
        history.extend(new)
    return new

