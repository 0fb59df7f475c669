"""Artifacts for other machines: cross toolchains, what a library really contains, and
running an aarch64 artifact here under qemu.

Nothing here imports TVM's compiler. Three jobs:

* ``require_tool``: a missing cross compiler (or nvcc, or qemu) is a PipelineError that
  names the Debian package to install, raised before any compile work starts.
* ``cuda_device_code``: the GPU code a library carries, read from the fatbin headers in
  its bytes; the compile step uses it to prove an artifact has kernels for its sm_XX.
* ``aarch64_runtime`` / ``run_under_qemu``: a cached aarch64 TVM runtime (the
  ``libtvm_runtime.so`` and ``libtvm_ffi.so`` of the aarch64 wheels of the TVM version
  we compile with) plus a small C++ runner (``cross_runner.cc``) cross-compiled against
  them; qemu-user runs it on an input and the output is compared with the x86 result.

    python -m pipeline.cross runtime                       # build the cache, print its path
    python -m pipeline.cross run model.so --input x.npy --output y.npy [--reference r.npy]
    python -m pipeline.cross verify --target arm-a72 [model options of `pipeline compile`]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

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


def require_tool(executable: str, package: str, purpose: str) -> str:
    """The path of `executable`, or a PipelineError naming the Debian package that has it."""
    path = shutil.which(executable)
    if path is None:
        raise PipelineError(
            f"{executable} is not installed; it is needed to {purpose}: apt-get install {package}"
        )
    return path


def require_cross_compiler(target) -> None:
    """Fail early when the target's cross compiler is missing (before any compile work)."""
    if target.cross_compiler is not None:
        require_tool(
            target.cross_compiler, target.cross_compiler_package or target.cross_compiler,
            f"link artifacts for target '{target.name}'",
        )


# ---------------------------------------------------------------------------
# GPU code inside a library

FATBIN_MAGIC = 0xBA55ED50
_FATBIN_KINDS = {1: "ptx", 2: "sass"}


@dataclass(frozen=True)
class DeviceCode:
    """One entry of a CUDA fatbin: SASS (a cubin, runs as is) or PTX (JIT-compiled)."""

    kind: str  # "sass" or "ptx"
    arch: str  # "sm_87" for SASS, "compute_87" for PTX

    def __str__(self) -> str:
        return f"{self.kind}:{self.arch}"


def fatbin_entries(data: bytes) -> list[DeviceCode]:
    """Every fatbin entry in `data`, found by magic number and parsed from its headers.

    Fatbin layout (CUDA 10 .. 13): a 16-byte header (u32 magic, u16 version, u16 header
    size, u64 size of the entries), then entries, each with a header of u16 kind
    (1 PTX, 2 ELF), u16 version, u32 header size, u64 payload size, and the sm number
    as u32 at offset 28.
    """
    entries: list[DeviceCode] = []
    magic = struct.pack("<I", FATBIN_MAGIC)
    start = data.find(magic)
    while start != -1:
        if start + 16 <= len(data):
            _, version, header_size, body_size = struct.unpack_from("<IHHQ", data, start)
            end = start + header_size + body_size
            if version == 1 and header_size == 16 and end <= len(data):
                offset = start + header_size
                while offset + 32 <= end:
                    kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, offset)
                    (sm,) = struct.unpack_from("<I", data, offset + 28)
                    if kind in _FATBIN_KINDS and entry_header >= 32:
                        prefix = "sm" if kind == 2 else "compute"
                        entries.append(DeviceCode(_FATBIN_KINDS[kind], f"{prefix}_{sm}"))
                    if entry_header == 0:
                        break
                    offset += entry_header + payload
                start = end - 1
        start = data.find(magic, start + 1)
    return entries


def cuda_device_code(library: Path) -> list[DeviceCode]:
    """The GPU code a compiled library carries (empty: none, e.g. CUDA source only)."""
    return fatbin_entries(Path(library).read_bytes())


# ---------------------------------------------------------------------------
# A cached aarch64 TVM runtime and runner


def _cache_root() -> Path:
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
    final = _cache_root() / "aarch64-runtime" / key
    if (final / "tvm_runner").is_file() and not rebuild:
        return final

    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".build-") as temp:
        work = Path(temp)
        lib = work / "out" / "lib"
        lib.mkdir(parents=True)
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


def run_under_qemu(library: Path, x: np.ndarray, repeat: int = 1) -> tuple[np.ndarray, dict]:
    """Run an aarch64 artifact on `x` under qemu-user: (output, runner's timing JSON).

    Weights of a params_mode="separate" artifact are passed after the input, in the
    order its metadata lists them.
    """
    library = Path(library).resolve()
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
    qemu = _qemu()
    runtime = aarch64_runtime()
    with tempfile.TemporaryDirectory(prefix="qemu-run-") as temp:
        work = Path(temp)
        inputs = [work / "input.npy"]
        np.save(inputs[0], np.ascontiguousarray(x))
        if meta.get("params_file"):
            with np.load(library.with_name(meta["params_file"])) as weights:
                for index, name in enumerate(meta["params_order"]):
                    inputs.append(work / f"param{index}.npy")
                    np.save(inputs[-1], np.ascontiguousarray(weights[name]))
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
            raise PipelineError(
                f"{library.name} failed under qemu: {(result.stderr.strip() or result.stdout.strip())[-500:]}"
            )
        timing = json.loads(result.stdout.strip().splitlines()[-1])
        return np.load(output), timing


def check_close(output: np.ndarray, reference: np.ndarray, atol: float, what: str) -> dict:
    """Compare through the one comparator; raises when the outputs differ by more than atol."""
    from pipeline.compare import compare_logits

    comparison = compare_logits(
        reference.reshape(reference.shape[0], -1), output.reshape(output.shape[0], -1)
    )
    if comparison["max_abs_error"] > atol:
        raise PipelineError(
            f"{what} differs from the reference by {comparison['max_abs_error']:.3g} (tolerance {atol:g})"
        )
    return comparison


def verify_under_qemu(library: Path, x: np.ndarray, reference: np.ndarray, atol: float = 1e-4) -> dict:
    """Run under qemu and compare with `reference` (e.g. the x86 artifact's output)."""
    output, timing = run_under_qemu(library, x)
    comparison = check_close(output, reference, atol, f"{Path(library).name} under qemu")
    return {**comparison, "qemu_median_ms": timing["median_ms"]}


def _runs_under_qemu(target) -> bool:
    return target.host_triple.startswith("aarch64") and target.cuda_arch is None


def check_qemu_target(target) -> None:
    """Refuse, before any work, a target whose artifact qemu cannot run: qemu checks aarch64
    CPU code (ARM boards, the CPU of a Jetson), not x86 or GPU code."""
    from targets import get_target, known_targets

    if _runs_under_qemu(target):
        return
    if target.host_triple.startswith("aarch64"):
        hint = f"try '{target.name}-cpu'"
    else:
        choices = [name for name in known_targets() if name != "cuda" and _runs_under_qemu(get_target(name))]
        hint = f"use one of: {', '.join(choices)}; e.g. make verify-arm TARGET=arm-a72"
    raise PipelineError(f"qemu checks aarch64 CPU targets; '{target.name}' is not one ({hint})")


def verify_inputs(config, shape: list[int]) -> tuple[np.ndarray, str]:
    """One input batch of the compiled shape: the first images of --data (a seeded sample,
    repeated to fill the batch), or random normal values without --data."""
    if config.data is None:
        rng = np.random.default_rng(config.seed)
        return rng.standard_normal(shape, dtype=np.float32), "random normal input"
    from calibration import load_dataset

    dataset = load_dataset(config.data, input_size=shape[2], preprocessing=config.preprocessing,
                           in_chans=shape[1], limit=shape[0], seed=config.seed)
    images = dataset.images[np.arange(shape[0]) % len(dataset)]
    return np.ascontiguousarray(images), f"{len(dataset)} image(s) of {dataset.source}"


def verify_target(target_name: str, config, onnx: Path | None = None, atol: float = 1e-4) -> dict:
    """Compile the configured model for an aarch64 CPU target and for x86 (both cached in
    the artifacts folder), run the first under qemu and compare it with the second."""
    from pipeline.engine import log
    from pipeline.model_options import run_stages
    from pipeline.runtime_only import LoadedArtifact
    from targets import get_target

    target = get_target(target_name)
    check_qemu_target(target)
    libraries = {
        name: run_stages("compile", config, get_target(name), onnx)["compile"].outputs["library"]
        for name in (target.name, "x86")
    }
    shape = json.loads(Path(f"{libraries['x86']}.json").read_text())["input"]["shape"]
    x, source = verify_inputs(config, shape)
    reference = LoadedArtifact(libraries["x86"]).infer(x)
    result = verify_under_qemu(libraries[target.name], x, reference, atol)
    log(f"[verify] {target.name} under qemu matches x86 on {source}: max abs error {result['max_abs_error']:.3g}")
    return {"target": target.name, "library": str(libraries[target.name]), "input": source, **result}


# The model options of `pipeline compile` (pipeline.model_options) that verify uses, and
# the measuring ones it only accepts, so that the Makefile's MODEL_ARGS work here too.
VERIFY_OPTIONS = ("variant", "weights", "num_classes", "in_chans", "seed", "input_size", "batch_size", "opset",
                  "precision", "params", "data", "preprocessing", "calib_data", "calib_size", "calib_method",
                  "onnx", "artifacts")
ACCEPTED_OPTIONS = ("warmup", "repeats", "eval_limit")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    from pipeline.model_options import option_help

    for name in VERIFY_OPTIONS + ACCEPTED_OPTIONS:
        kind, default, help_text = option_help(name)
        if name in ACCEPTED_OPTIONS:
            help_text += " Not used by verify: accepted so that the same model options work with every command."
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=default, help=help_text)


def main(argv: list[str] | None = None) -> int:
    """Command line: build the aarch64 runtime, or run an artifact under qemu."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.cross", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    runtime = commands.add_parser("runtime", help="build (or find) the cached aarch64 runtime; print its path")
    runtime.add_argument("--rebuild", action="store_true")
    run = commands.add_parser("run", help="run an aarch64 artifact under qemu")
    run.add_argument("library", type=Path)
    run.add_argument("--input", type=Path, required=True, help=".npy input of the compiled shape")
    run.add_argument("--output", type=Path, help="where to save the output as .npy")
    run.add_argument("--reference", type=Path, help=".npy output to compare with (tolerance --atol)")
    run.add_argument("--atol", type=float, default=1e-4)
    verify = commands.add_parser(
        "verify", help="compile for an aarch64 target and x86, compare under qemu",
        description="Compile the model for an aarch64 CPU target and for x86 (cached, with the model options "
                    "of `pipeline compile`), run the aarch64 artifact under qemu on one input batch (the first "
                    "images of --data, or random values) and compare its output with the x86 artifact's.",
    )
    verify.add_argument("--target", default="arm-a53",
                        help="an aarch64 CPU target: arm-a53 ... arm-neoverse-v1, jetson-orin-cpu, jetson-thor-cpu")
    verify.add_argument("--atol", type=float, default=1e-4, help="largest absolute logit difference accepted")
    _add_model_options(verify)
    args = parser.parse_args(argv)
    try:
        if args.command == "runtime":
            print(aarch64_runtime(rebuild=args.rebuild))
            return 0
        if args.command == "verify":
            from pipeline.model_options import config_from_options

            config = config_from_options(vars(args))
            print(json.dumps(verify_target(args.target, config, args.onnx, args.atol)))
            return 0
        output, timing = run_under_qemu(args.library, np.load(args.input))
        if args.output is not None:
            np.save(args.output, output)
        if args.reference is not None:
            timing["comparison"] = check_close(output, np.load(args.reference), args.atol, "the output")
        print(json.dumps(timing))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
