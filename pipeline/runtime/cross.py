"""Running an aarch64 artifact here, under qemu: nothing here imports TVM's compiler.

* ``aarch64_runtime`` / ``run_under_qemu``: a cached aarch64 TVM runtime (the
  ``libtvm_runtime.so`` and ``libtvm_ffi.so`` of the aarch64 wheels of the TVM version
  we compile with) plus a small C++ runner (``cross_runner.cc``) cross-compiled against
  them; qemu-user runs it on an input and the output is compared with the x86 result.
* ``run_images_under_qemu``: the same binary over a whole data set in one qemu process,
  for the evaluate stage's ``--emulate`` (the board's outputs, so its accuracy).

    python -m pipeline.cli.cross runtime                       # build the cache, print its path
    python -m pipeline.cli.cross run model.so --input x.npy --output y.npy [--reference r.npy]
    python -m pipeline.cli.cross verify --target arm-a72 [model options of `pipeline compile`]
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.toolchain import require_tool

QEMU_AARCH64 = ("qemu-aarch64-static", "qemu-aarch64")
QEMU_PACKAGE = "qemu-user-static"
AARCH64_GXX = "aarch64-linux-gnu-g++"
AARCH64_GXX_PACKAGE = "g++-aarch64-linux-gnu"
# Where Debian's libc6-arm64-cross / libstdc++6-arm64-cross put the aarch64 libraries.
AARCH64_SYSROOT = Path("/usr/aarch64-linux-gnu")
RUNNER_SOURCE = Path(__file__).with_name("cross_runner.cc")
# The platform tags the aarch64 TVM wheels are published under.
AARCH64_WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux2014_aarch64")
QEMU_TIMEOUT_S = 600
# Images given to one qemu process at most, in bytes: the demo's 10 000 test images (40 MB) in
# one, ImageNet's 50 000 at 224 (30 GB) in chunks of some 400.
QEMU_CHUNK_BYTES = 256 * 1024 * 1024


# ---------------------------------------------------------------------------
# A cached aarch64 TVM runtime and runner


def cache_root() -> Path:
    """The pipeline's cache of built or downloaded tools (CONVNEXT_EDGE_CACHE, else ~/.cache/convnext-edge)."""
    base = os.environ.get("CONVNEXT_EDGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "convnext-edge"
    )
    return Path(base)


def _versions() -> dict[str, str]:
    return {
        name: importlib_metadata.version(name) for name in ("apache-tvm", "apache-tvm-ffi")
    }


def _download_wheels(versions: dict[str, str], into: Path) -> list[Path]:
    """pip-download the aarch64 wheels of exactly the TVM versions we compile with."""
    wheels_dir = os.environ.get("CONVNEXT_EDGE_AARCH64_WHEELS")
    if wheels_dir:
        found = [p for p in Path(wheels_dir).glob("*.whl") if "aarch64" in p.name]
        if len(found) >= 2:
            return found
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
        "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}", "-d", str(into),
    ]
    for platform_tag in AARCH64_WHEEL_PLATFORMS:
        command += ["--platform", platform_tag]
    command += [f"{name}=={version}" for name, version in versions.items()]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        reason = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
        raise PipelineError(
            f"cannot download the aarch64 wheels of {', '.join(f'{n}=={v}' for n, v in versions.items())} "
            f"({reason[-1] if reason else 'pip failed'}); put them in a folder and set "
            f"CONVNEXT_EDGE_AARCH64_WHEELS to it"
        )
    return sorted(into.glob("*.whl"))


def _extract(wheels: list[Path], member_suffix: str, into: Path) -> Path:
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if member.endswith(member_suffix):
                    target = into / Path(member).name
                    with archive.open(member) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    return target
    raise PipelineError(f"no {member_suffix} in the aarch64 wheels {[w.name for w in wheels]}")


def aarch64_runtime(rebuild: bool = False) -> Path:
    """A directory with ``tvm_runner`` and ``lib/`` for aarch64, built once and cached.

    The cache key is the TVM and tvm-ffi versions plus the runner's source hash, so a
    version bump or a runner change builds a new one.
    """
    require_tool(AARCH64_GXX, AARCH64_GXX_PACKAGE, "build the aarch64 test runner")
    versions = _versions()
    source_hash = hashlib.sha256(RUNNER_SOURCE.read_bytes()).hexdigest()[:12]
    key = f"tvm-{versions['apache-tvm']}-ffi-{versions['apache-tvm-ffi']}-runner-{source_hash}"
    final = cache_root() / "aarch64-runtime" / key
    if (final / "tvm_runner").is_file() and not rebuild:
        return final

    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".build-") as temp:
        work = Path(temp)
        lib = work / "out" / "lib"
        lib.mkdir(parents=True)
        # The libraries depend on the TVM versions only: a runner change reuses those of
        # another entry of the same versions rather than downloading the wheels again.
        sibling = next((entry / "lib" for entry in sorted(final.parent.glob(f"{key.split('-runner-')[0]}-runner-*"))
                        if (entry / "tvm_runner").is_file() and (entry / "lib" / "libtvm_ffi.so").is_file()), None)
        if sibling is not None:
            for library in ("libtvm_runtime.so", "libtvm_ffi.so"):
                shutil.copy2(sibling / library, lib / library)
        else:
            downloads = work / "wheels"
            downloads.mkdir()
            wheels = _download_wheels(versions, downloads)
            _extract(wheels, "tvm/lib/libtvm_runtime.so", lib)
            _extract(wheels, "tvm_ffi/lib/libtvm_ffi.so", lib)

        import tvm_ffi.libinfo

        command = [
            AARCH64_GXX, "-std=c++17", "-O2",
            f"-I{tvm_ffi.libinfo.find_include_path()}",
            f"-I{tvm_ffi.libinfo.find_dlpack_include_path()}",
            str(RUNNER_SOURCE), "-o", str(work / "out" / "tvm_runner"),
            f"-L{lib}", "-ltvm_runtime", "-ltvm_ffi", "-Wl,-rpath,$ORIGIN/lib",
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"building the aarch64 runner failed:\n{result.stderr}")
        (work / "out" / "runtime.json").write_text(
            json.dumps({**versions, "runner_sha256": source_hash}, indent=2) + "\n"
        )
        if final.exists():
            shutil.rmtree(final)  # a half-built or rebuilt entry
        os.replace(work / "out", final)
    return final


def _qemu() -> str:
    for name in QEMU_AARCH64:
        path = shutil.which(name)
        if path:
            return path
    raise PipelineError(
        f"qemu-aarch64-static is not installed; it runs aarch64 artifacts here: "
        f"apt-get install {QEMU_PACKAGE}"
    )


def _aarch64_artifact(library: Path) -> dict:
    """The metadata of an aarch64 CPU artifact; anything qemu cannot run is refused."""
    meta_file = library.with_name(library.name + ".json")
    if not meta_file.is_file():
        raise PipelineError(f"{meta_file} is missing; it must sit beside {library.name}")
    meta = json.loads(meta_file.read_text())
    if meta.get("host_triple", "").split("-")[0] != "aarch64":
        raise PipelineError(
            f"{library} was built for target '{meta.get('target')}' "
            f"({meta.get('host_triple', 'no host triple')}), not for aarch64"
        )
    if meta.get("target_json", {}).get("kind") != "llvm":
        raise PipelineError(f"{library} runs on a GPU; qemu can only check CPU artifacts")
    return meta


def _weight_files(library: Path, meta: dict, work: Path) -> list[Path]:
    """The weights of a params_mode="separate" artifact as .npy files, in the order its
    metadata lists them (none for embedded weights)."""
    files = []
    if meta.get("params_file"):
        with np.load(library.with_name(meta["params_file"])) as weights:
            for index, name in enumerate(meta["params_order"]):
                files.append(work / f"param{index}.npy")
                np.save(files[-1], np.ascontiguousarray(weights[name]))
    return files


def _failure(library: Path, stderr: str, stdout: str = "") -> PipelineError:
    return PipelineError(f"{library.name} failed under qemu: {(stderr.strip() or stdout.strip())[-500:]}")


def run_under_qemu(library: Path, x: np.ndarray, repeat: int = 1) -> tuple[np.ndarray, dict]:
    """Run an aarch64 artifact on `x` under qemu-user: (output, runner's timing JSON).

    Weights of a params_mode="separate" artifact are passed after the input, in the
    order its metadata lists them.
    """
    library = Path(library).resolve()
    meta = _aarch64_artifact(library)
    qemu = _qemu()
    runtime = aarch64_runtime()
    with tempfile.TemporaryDirectory(prefix="qemu-run-") as temp:
        work = Path(temp)
        inputs = [work / "input.npy"]
        np.save(inputs[0], np.ascontiguousarray(x))
        inputs += _weight_files(library, meta, work)
        output = work / "output.npy"
        command = [
            qemu, "-L", str(AARCH64_SYSROOT), str(runtime / "tvm_runner"),
            str(library), str(output), *map(str, inputs), "--repeat", str(repeat),
        ]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=QEMU_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise PipelineError(f"{library.name} did not finish under qemu in {QEMU_TIMEOUT_S} s") from None
        if result.returncode != 0:
            raise _failure(library, result.stderr, result.stdout)
        timing = json.loads(result.stdout.strip().splitlines()[-1])
        return np.load(output), timing


def run_images_under_qemu(library: Path, images: np.ndarray, progress=None,
                          chunk_bytes: int = QEMU_CHUNK_BYTES) -> np.ndarray:
    """An aarch64 artifact's outputs for every image, in one qemu process per chunk of about
    `chunk_bytes` of images (starting the runtime under qemu costs far more than a small
    image; the chunks bound the memory and the file each process reads): `images` is cut into
    batches of the compiled batch size, the last one padded with copies of its last image.
    `progress(done)` is called with the images done so far as the runner reports them."""
    library = Path(library).resolve()
    meta = _aarch64_artifact(library)
    batch = int(meta["input"]["shape"][0])
    total = int(images.shape[0])
    padded = -total % batch
    if padded:
        images = np.concatenate([images, np.repeat(images[-1:], padded, axis=0)])
    image_bytes = max(1, images[:1].astype(np.float32).nbytes)
    chunk = max(1, chunk_bytes // (image_bytes * batch)) * batch
    qemu = _qemu()
    runtime = aarch64_runtime()
    outputs = []
    with tempfile.TemporaryDirectory(prefix="qemu-run-") as temp:
        work = Path(temp)
        weights = _weight_files(library, meta, work)
        for start in range(0, images.shape[0], chunk):
            np.save(work / "images.npy", np.ascontiguousarray(images[start:start + chunk], dtype=np.float32))
            command = [
                qemu, "-L", str(AARCH64_SYSROOT), str(runtime / "tvm_runner"), str(library),
                str(work / "output.npy"), str(work / "images.npy"), *map(str, weights), "--batch", str(batch),
            ]
            with open(work / "stderr.txt", "w+") as stderr:
                # One runtime thread: under qemu, TVM's thread pool spends its time spinning and
                # syncing emulated threads (10x slower for the demo model on 2 cores, 2026-12-07).
                env = {**os.environ, "TVM_NUM_THREADS": "1"}
                process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
                lines = []
                for line in process.stdout:
                    lines.append(line)
                    if line.startswith("progress ") and progress is not None:
                        progress(min(total, start + int(line.split()[1])))
                process.wait()
                if process.returncode != 0:
                    stderr.seek(0)
                    raise _failure(library, stderr.read(), "".join(lines))
            outputs.append(np.load(work / "output.npy"))
    return np.concatenate(outputs)[:total]


def _runs_under_qemu(target) -> bool:
    return target.host_triple.startswith("aarch64") and target.cuda_arch is None


def emulated_targets() -> list[str]:
    """The targets whose artifacts qemu runs here: aarch64 CPU code (ARM boards, a Jetson's CPU)."""
    from targets import get_target, known_targets

    return [name for name in known_targets() if name != "cuda" and _runs_under_qemu(get_target(name))]


def qemu_version() -> str:
    """'qemu-aarch64 8.2.2': which emulator ran an evaluation, for its record."""
    result = subprocess.run([_qemu(), "--version"], capture_output=True, text=True)
    words = (result.stdout.splitlines() or [""])[0].split()
    version = words[words.index("version") + 1] if "version" in words[:-1] else "unknown version"
    return f"qemu-aarch64 {version}"


def check_qemu_target(target) -> None:
    """Refuse, before any work, a target whose artifact qemu cannot run: qemu checks aarch64
    CPU code (ARM boards, the CPU of a Jetson), not x86 or GPU code."""
    if _runs_under_qemu(target):
        return
    if target.host_triple.startswith("aarch64"):
        hint = f"try '{target.name}-cpu'"
    else:
        choices = emulated_targets()
        hint = f"use one of: {', '.join(choices)}; e.g. make verify-arm TARGET=arm-a72"
    raise PipelineError(f"qemu checks aarch64 CPU targets; '{target.name}' is not one ({hint})")
