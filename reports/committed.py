"""A measurement replaces a committed record only when it measures the same thing.

Every writer of a committed record (the report stage, `pipeline compile-matrix`,
benchmarks/cpu_latency.py and int8_speed.py) describes what its record measures as a flat dict
of settings: the model, the data, how many images, repeats, calibration, what was asked. Where
the folder already holds a record of other settings, the new one is written beside it, in a
sub-folder named after what differs (`reports/x86/images-256/`), which `pipeline reports` does
not read; --replace-report replaces the committed one on purpose.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import PipelineError

REPLACE_FLAG = "--replace-report"
# Longer folder names are cut and end in a hash of the whole name.
MAX_NAME = 80


def read_record(path: Path) -> dict | None:
    """A committed JSON record, or None where there is none. One that cannot be read says
    nothing of what it measured, so it is an error, not a record to replace."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineError(
            f"{path} cannot be read ({exc.__class__.__name__}), so it is unknown whether this run measures the "
            f"same thing; fix or delete it, or pass {REPLACE_FLAG} to replace it"
        ) from None
    if not isinstance(record, dict):
        raise PipelineError(f"{path} is not a JSON object; fix or delete it, or pass {REPLACE_FLAG} to replace it")
    return record


def listed(text: str) -> str:
    """A comma-separated option as one value, whatever the spaces: '1, 8' -> '1,8'."""
    return ",".join(part.strip() for part in str(text).split(",") if part.strip())


def differences(committed: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """setting -> (committed value, new value) for every setting that differs. A setting the
    committed record does not name (None: a record written before it was recorded) is not held
    against it."""
    return {key: (value, new.get(key)) for key, value in committed.items()
            if value is not None and new.get(key) != value}


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    return str(value)


def folder_name(changed: dict[str, tuple[Any, Any]]) -> str:
    """'images-256_repeats-20': the settings that differ, with this run's values."""
    name = "_".join(f"{key}-{_text(new)}" for key, (_, new) in changed.items())
    name = re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9_.,+=-]+", "-", name)).strip("-.") or "other-settings"
    if len(name) > MAX_NAME:
        name = name[:MAX_NAME - 9].rstrip("-.") + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return name


def place(folder: Path, committed: dict[str, Any] | None, new: dict[str, Any],
          file: str | None = None) -> tuple[Path, str | None]:
    """The folder a record measuring `new` goes to, and the line to print when that is not
    `folder`: `folder` when it holds no record (`committed` None: callers pass None for
    --replace-report too) or one that measures the same; else beside it, in
    folder/<what differs>/. `file` names the record where the folder holds others too."""
    folder = Path(folder)
    if committed is None:
        return folder, None
    changed = differences(committed, new)
    if not changed:
        return folder, None
    beside = folder / folder_name(changed)
    there, here = (folder / file, beside / file) if file else (f"{folder}/", f"{beside}/")
    shown = "; ".join(f"{key} {_text(old)} there, {_text(value)} here" for key, (old, value) in changed.items())
    return beside, (f"{there} holds a measurement of other settings ({shown}): this run is written beside it, "
                    f"to {here}; pass {REPLACE_FLAG} to replace it instead")


def json_destination(path: Path, new: dict[str, Any], recorded_settings: Callable[[dict], dict[str, Any]],
                     replace: bool, say: Callable[[str], None]) -> Path:
    """Where a JSON record measuring `new` goes: `path`, or beside the record of other
    settings already there (`place`), saying so; `recorded_settings` reads what a committed
    record measured. With `replace`, `path` whatever it holds."""
    path = Path(path)
    committed = None if replace else read_record(path)
    folder, note = place(path.parent, None if committed is None else recorded_settings(committed), new, path.name)
    if note:
        say(note)
    return folder / path.name
