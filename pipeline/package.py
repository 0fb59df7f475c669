"""A device bundle: one .tar.gz with everything needed to run an artifact on its target
with only the TVM runtime and NumPy installed there.

    <bundle>/model.so             the library (kernels; weights too, if embedded)
    <bundle>/model.so.json        its metadata: target, input/output, params order
    <bundle>/model.params.npz     weights, only for params_mode="separate"
    <bundle>/run.py               pipeline/runtime_only.py, unchanged: no pipeline import
    <bundle>/manifest.json        target, versions, sha256 of every file, the run command

On the device: ``tar xzf bundle.tar.gz && cd <bundle> && python run.py model.so
--input x.npy --output y.npy`` (``--device cuda`` for a GPU target).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.runtime_only import metadata_path
from targets import Target

RUNNER_SOURCE = Path(__file__).with_name("runtime_only.py")
BUNDLE_FORMAT = 1


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bundle_files(library: Path, target: Target) -> dict[str, bytes]:
    """Name in the bundle -> content, after checking the artifact is whole and for `target`."""
    library = Path(library)
    meta_file = metadata_path(library)
    if not library.is_file() or not meta_file.is_file():
        raise PipelineError(
            f"artifact {library} (with {meta_file.name} beside it) does not exist; run `pipeline compile` first"
        )
    metadata = json.loads(meta_file.read_text())
    if metadata.get("target") != target.name:
        raise PipelineError(
            f"{library} was built for target '{metadata.get('target')}', not '{target.name}'; "
            f"pass --target {metadata.get('target')} or compile it for '{target.name}'"
        )
    # Inside the bundle the library is always model.so; its metadata says so too.
    metadata["library"] = "model.so"
    files = {
        "model.so": library.read_bytes(),
        "model.so.json": (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode(),
        "run.py": RUNNER_SOURCE.read_bytes(),
    }
    if metadata.get("params_file"):
        weights = library.with_name(metadata["params_file"])
        if not weights.is_file():
            raise PipelineError(f"weights file {weights} is missing; it must sit beside {library.name}")
        files[metadata["params_file"]] = weights.read_bytes()
    return files


def write_bundle(library: Path, target: Target, output: Path, model: dict | None = None) -> dict:
    """Write the bundle of `library` (built for `target`) to `output` (.tar.gz); returns
    its manifest. `model` describes what was compiled (variant, input size, ...)."""
    output = Path(output)
    if not output.name.endswith(".tar.gz"):
        raise PipelineError(f"--output {output} must end in .tar.gz")
    files = bundle_files(library, target)
    metadata = json.loads(files["model.so.json"])
    top = output.name[: -len(".tar.gz")]
    device_flag = "" if target.device == "cpu" else f" --device {target.device}"
    manifest = {
        "format": BUNDLE_FORMAT,
        "target": target.name,
        "target_json": target.tvm_target,
        "host_triple": target.host_triple,
        "device": target.device,
        "device_code": metadata.get("device_code", []),
        "model": model or {},
        "input": metadata["input"],
        "output": metadata["output"],
        "params_mode": metadata.get("params_mode"),
        "requires": [f"apache-tvm=={metadata.get('tvm_version')} (runtime only)", "numpy"],
        "run": f"python run.py model.so --input x.npy --output y.npy{device_flag}",
        "files": {name: {"bytes": len(data), "sha256": _sha256(data)} for name, data in sorted(files.items())},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    files["manifest.json"] = (json.dumps(manifest, indent=2) + "\n").encode()

    output.parent.mkdir(parents=True, exist_ok=True)
    temp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        with tarfile.open(temp, "w:gz") as archive:
            for name, data in sorted(files.items()):
                info = tarfile.TarInfo(f"{top}/{name}")
                info.size = len(data)
                info.mode = 0o755 if name == "run.py" else 0o644
                info.mtime = int(time.time())
                archive.addfile(info, io.BytesIO(data))
        os.replace(temp, output)
    finally:
        temp.unlink(missing_ok=True)
    return manifest
