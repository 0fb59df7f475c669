"""The one module that knows the artifacts tree on disk.

Layout: ``<root>/<stage>/<key>/`` holds a stage's output files and its
``manifest.json``. The key is a hash of everything the output depends on (the
stage's settings, the hashes of its input files, tool versions, the stage's own
code version), so finding a complete directory for a key proves the work was
already done with the same inputs (tinygrad-style content keys).

Outputs are written into a temporary sibling directory and renamed into place
only when the stage finishes, so an interrupted or failed stage leaves nothing
that could later be mistaken for a result. A killed stage does leave its
scratch directory; the next run removes it once its owner is provably gone
(``remove_stale_temp_dirs``).

A cache hit writes nothing, so a read-only artifacts tree (``chmod -R a-w``, a
read-only mount) still serves every stage it holds.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

MANIFEST = "manifest.json"
DEFAULT_ROOT = Path("artifacts")

_hash_memo: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, memoised on (path, size, mtime) within a process."""
    path = Path(path)
    st = path.stat()
    memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo_key not in _hash_memo:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _hash_memo[memo_key] = digest.hexdigest()
    return _hash_memo[memo_key]


def content_key(parts: dict[str, Any]) -> str:
    """Stable short hash of a JSON-able description of a piece of work."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class StageDir:
    """Where one stage's outputs for one key live."""

    root: Path
    stage: str
    key: str

    @property
    def path(self) -> Path:
        return self.root / self.stage / self.key

    def manifest(self) -> dict[str, Any] | None:
        """The manifest of a complete run, or None if there is none."""
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        outputs = manifest.get("outputs", {})
        if not all((self.path / name).exists() for name in outputs.values()):
            return None
        return manifest


def open_root(root: Path) -> Path:
    """The artifacts root, created if missing. Nothing is written to one that exists, so a
    read-only cache still serves its hits; a stage that must run finds out in new_temp_dir."""
    root = Path(root)
    if not root.is_dir():
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PipelineError(
                f"artifacts directory '{root}' cannot be created ({exc.strerror or exc}); "
                "pass --artifacts DIR pointing to a writable directory"
            ) from None
    return root.resolve()


# Who made a scratch directory is in its name, written atomically with it by mkdtemp:
# ".<key>.tmp-<machine>.<pid>.<start>-<random>". Two builds may run at once (a second
# identical compile commits the same result), so a scratch directory is removed only when
# its owner is provably dead: made on this machine (same host, boot and PID namespace),
# and the PID now names no process, or one started at another time (a reused PID). A
# name without that (an owner on another host sharing the cache, another container, an
# older pipeline's random name) says nothing /proc can check; it is removed only once
# untouched for longer than any stage runs (a day; the longest, evaluating 10,000 images
# on a board over RPC, takes well under an hour). No lock is needed: a live owner is
# never touched, and two runs removing the same dead one both ignore what is gone.
STALE_AFTER_SECONDS = 24 * 3600
_SCRATCH = re.compile(r"^\.[0-9a-f]{16}\.tmp-")
_OWNER = re.compile(r"\.tmp-(?P<machine>[0-9a-f]{12})\.(?P<pid>\d+)\.(?P<start>\d+)-")


def _process_start(pid: int) -> str | None:
    """When a process started (clock ticks since boot, /proc/PID/stat field 22), or None
    when no such process runs (or /proc cannot say)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from its end.
    return stat.rsplit(")", 1)[1].split()[19]


def _this_machine() -> str:
    """Host, boot and PID namespace: where a PID names the same process as here."""
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        parts.append("unknown")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def _owner_tag() -> str:
    pid = os.getpid()
    # Start 0: /proc cannot say, so no other run can prove this one dead (age decides).
    return f"{_this_machine()}.{pid}.{_process_start(pid) or 0}"


def is_stale_temp_dir(path: Path, now: float | None = None) -> bool:
    """Whether a scratch directory's owner is provably gone (see _OWNER above)."""
    owner = _OWNER.search(Path(path).name)
    if (owner and owner["start"] != "0" and owner["machine"] == _this_machine()
            and _process_start(os.getpid()) is not None):
        return _process_start(int(owner["pid"])) != owner["start"]
    try:
        age = (time.time() if now is None else now) - Path(path).stat().st_mtime
    except OSError:
        return False
    return age > STALE_AFTER_SECONDS


def remove_stale_temp_dirs(root: Path) -> list[Path]:
    """Remove the scratch directories of stages killed mid-run (kill -9, power loss) from
    ``<root>/<stage>/``; returns what was removed. Reads only, unless one is stale."""
    removed = []
    try:
        stage_dirs = [path for path in Path(root).iterdir() if path.is_dir()]
        candidates = [path for stage in stage_dirs for path in stage.iterdir()
                      if _SCRATCH.match(path.name) and path.is_dir()]
    except OSError:
        return removed
    for path in candidates:
        if is_stale_temp_dir(path):
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append(path)
    return removed


def new_temp_dir(stage_dir: StageDir) -> Path:
    """A fresh scratch directory beside the final one (same filesystem, so rename is atomic),
    named after the process that owns it."""
    parent = stage_dir.path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{stage_dir.key}.tmp-{_owner_tag()}-", dir=parent))
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        raise PipelineError(
            f"artifacts directory '{stage_dir.root}' is not writable ({exc.strerror}) and holds no "
            f"'{stage_dir.stage}' result for these settings; pass --artifacts DIR pointing to a "
            "writable directory"
        ) from None


def commit_temp_dir(temp_dir: Path, stage_dir: StageDir, manifest: dict[str, Any]) -> Path:
    """Write the manifest last, then move the finished directory into place."""
    (temp_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    final = stage_dir.path
    if final.exists():
        # A stale or uncacheable earlier result for the same key is replaced whole.
        shutil.rmtree(final)
    os.replace(temp_dir, final)
    return final


def discard_temp_dir(temp_dir: Path) -> None:
    shutil.rmtree(temp_dir, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file so that readers see the old or the new content, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def manifest_beside(path: Path) -> dict[str, Any]:
    """The manifest of the stage run that produced `path` ({} for a user-supplied file)."""
    manifest_path = Path(path).parent / MANIFEST
    try:
        return json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
