"""The one module that knows the artifacts tree on disk.

Layout: ``<root>/<stage>/<key>/`` holds a stage's output files and its
``manifest.json``. The key is a hash of everything the output depends on (the
stage's settings, the hashes of its input files, tool versions, the stage's own
code version), so finding a complete directory for a key proves the work was
already done with the same inputs (tinygrad-style content keys).

Outputs are written into a temporary sibling directory and renamed into place
only when the stage finishes, so an interrupted or failed stage leaves nothing
that could later be mistaken for a result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
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


def ensure_writable_root(root: Path) -> Path:
    """Create the artifacts root, or explain why it cannot be used."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=root, prefix=".write-probe-", delete=True)
        probe.close()
    except OSError as exc:
        raise PipelineError(
            f"artifacts directory '{root}' is not writable ({exc.strerror or exc}); "
            "pass --artifacts DIR pointing to a writable directory"
        ) from None
    return root.resolve()


def new_temp_dir(stage_dir: StageDir) -> Path:
    """A fresh scratch directory beside the final one (same filesystem, so rename is atomic)."""
    parent = stage_dir.path.parent
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{stage_dir.key}.tmp-", dir=parent))


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
