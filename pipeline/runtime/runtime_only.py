"""Run a compiled artifact with nothing but NumPy and the TVM runtime.

This file is copied alone into device bundles as ``run.py``, so it imports no
``pipeline`` module and nothing of TVM's compiler. An artifact is three files
side by side, written by ``pipeline.compiler.backend.compile_onnx``:

    model.so            the VM executable and its kernels (and weights, if embedded)
    model.so.json       metadata: target, input/output shape and dtype, params order
    model.params.npz    weights, only when compiled with params_mode="separate"

    python run.py model.so --input x.npy --output y.npy [--repeat 20] [--device cuda]

It runs the artifact on the device it was compiled for unless ``--device`` says otherwise,
and prints the latency and each image's top class (named from ``labels.txt`` beside the
library, when there is one). In a bundle, ``manifest.json`` beside the library lists every
file's sha256: a file it loads that differs is refused.

CUDA artifacts (x86-64 GPUs and Jetson) need the NVIDIA driver (libcuda.so.1) and the
CUDA runtime (libcudart.so.13: from a CUDA toolkit, or ``pip install nvidia-cuda-runtime``
as PyTorch's CUDA wheels bring it); the loader finds both where those install them.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import hashlib
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

if __name__ == "__main__" and "tvm" not in sys.modules:
    # TVM 0.27: `import tvm` loads libtvm_compiler and imports tvm.relax with all its
    # frontends (about 1900 modules) unless TVM_USE_RUNTIME_LIB=1 is set before the
    # first import. Only a process that just runs artifacts may opt in (compiling later
    # in the same process would fail), hence only here, in the command-line entry.
    # A runtime-only TVM build (no compiler library) gets the same mode by itself.
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")

import numpy as np  # noqa: E402
import tvm  # noqa: E402

# TVM 0.27: the Relax VM lives in tvm.runtime.vm; tvm.relax.VirtualMachine is a re-export
# that needs the compiler-side tvm.relax package.
from tvm.runtime.vm import VirtualMachine  # noqa: E402


def physical_cores() -> int:
    """Physical cores this process may run on (SMT siblings counted once)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((
                (topology / "physical_package_id").read_text().strip(),
                (topology / "core_id").read_text().strip(),
            ))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def configure_cpu_threads() -> int:
    """Size TVM's CPU thread pool to the physical cores, unless TVM_NUM_THREADS says otherwise.

    TVM 0.27 starts max(1, logical CPUs / 2) threads on x86, assuming 2-way SMT; on a
    machine without SMT (most cloud VMs, this 2-core one) that is half the cores, and every
    TVM number would be measured on fewer cores than ONNX Runtime and PyTorch use (they
    default to the physical cores). The pool reads the variable once, when it starts, so
    this must run before the first TVM kernel in the process. Returns the thread count.
    """
    os.environ.setdefault("TVM_NUM_THREADS", str(physical_cores()))
    return int(os.environ["TVM_NUM_THREADS"])


class ArtifactError(Exception):
    """An artifact that cannot be loaded or run as asked; the message says what to do."""


# The machine architecture of a host triple, as platform.machine() names it on Linux.
_MACHINE_ALIASES = {"arm64": "aarch64", "amd64": "x86_64"}


def machine_arch() -> str:
    """This machine's architecture as a host triple starts: "x86_64", "aarch64", ..."""
    machine = platform.machine().lower()
    return _MACHINE_ALIASES.get(machine, machine)


def _cudart_candidates(soname: str) -> list[str]:
    """Where a CUDA runtime library may be when the dynamic linker does not find it: a
    CUDA toolkit (CUDA_HOME, /usr/local/cuda, JetPack's) or NVIDIA's pip wheels (PyTorch's
    CUDA builds install nvidia/cu13/lib/ into site-packages)."""
    roots = [os.environ.get(name) for name in ("CUDA_HOME", "CUDA_PATH")] + ["/usr/local/cuda"]
    folders = [os.path.join(root, sub) for root in roots if root for sub in ("lib64", "lib")]
    folders += sorted(glob.glob("/usr/local/cuda-*/lib*")) + sorted(glob.glob("/usr/local/cuda-*/targets/*/lib"))
    for entry in sys.path:
        folders += sorted(glob.glob(os.path.join(entry, "nvidia", "*", "lib")))
    return [os.path.join(folder, soname) for folder in folders if os.path.isfile(os.path.join(folder, soname))]


def _missing_library(error: OSError) -> str | None:
    found = re.search(r"(lib[\w.+-]+\.so[\w.]*): cannot open shared object file", str(error))
    return found.group(1) if found else None


def load_cuda_runtime() -> None:
    """Register TVM's CUDA device and module loader in this process (idempotent).

    TVM 0.27 loads tvm/lib/libtvm_runtime_cuda.so only together with its compiler library;
    in runtime-only mode (run.py, bundles, a TVM without the compiler) "cuda" stays an
    unknown device until the library is loaded by hand. Raises ArtifactError naming what
    is missing: TVM's CUDA runtime, the NVIDIA driver or the CUDA runtime library.
    """
    import tvm_ffi

    if tvm_ffi.get_global_func("device_api.cuda", allow_missing=True) is not None:
        return
    library = os.path.join(os.path.dirname(tvm.__file__), "lib", "libtvm_runtime_cuda.so")
    if not os.path.isfile(library):
        raise ArtifactError(
            f"this TVM {tvm.__version__} has no CUDA runtime ({library} is missing); "
            f"install the apache-tvm wheel for Linux, which includes it"
        )
    preloaded: set[str] = set()
    while True:
        try:
            ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
            return
        except OSError as exc:
            missing = _missing_library(exc) or str(exc)
        if missing.startswith("libcuda.so"):
            raise ArtifactError(
                f"the NVIDIA driver library {missing} is not installed on this machine, so CUDA "
                f"artifacts cannot run here; install the NVIDIA driver (JetPack on a Jetson)"
            )
        candidates = [path for path in _cudart_candidates(missing) if path not in preloaded]
        if not missing.startswith("libcudart") or not candidates:
            raise ArtifactError(
                f"the CUDA runtime library {missing} is not found; install the CUDA 13 runtime "
                f"(the CUDA toolkit, or pip install nvidia-cuda-runtime) or add its folder to "
                f"LD_LIBRARY_PATH"
            )
        # Loaded by path, the library satisfies the runtime's dependency by its soname.
        ctypes.CDLL(candidates[0], mode=ctypes.RTLD_GLOBAL)
        preloaded.add(candidates[0])


def metadata_path(library_path: Path) -> Path:
    """The metadata file of a library: ``model.so`` -> ``model.so.json``."""
    library_path = Path(library_path)
    return library_path.with_name(library_path.name + ".json")


def write_metadata(path: Path, metadata: dict) -> None:
    """Write artifact metadata as stable, human-readable JSON."""
    Path(path).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class LoadedArtifact:
    """A compiled library loaded into a Relax VM, ready for ``infer``."""

    # The exception type for every problem; the pipeline swaps in a PipelineError subclass.
    error_type: type[Exception] = ArtifactError

    def __init__(self, library_path: Path | str, device: str | None = None):
        self.library_path = Path(library_path)
        fail = self.error_type
        if not self.library_path.is_file():
            raise fail(f"artifact {self.library_path} does not exist")
        meta_file = metadata_path(self.library_path)
        try:
            self.metadata = json.loads(meta_file.read_text())
        except FileNotFoundError:
            raise fail(
                f"{meta_file} is missing; the compile step writes it beside the library "
                f"and it must travel with it"
            ) from None
        except (OSError, ValueError) as exc:
            raise fail(f"cannot read {meta_file}: {_first_line(exc)}") from None

        meta = self.metadata
        host_arch = str(meta.get("host_triple", "")).split("-", 1)[0]
        if host_arch and host_arch != machine_arch():
            raise fail(
                f"{self.library_path.name} was built for {meta['host_triple']} (target "
                f"'{meta.get('target', '?')}'), but this machine is {machine_arch()}; run it on "
                f"a {host_arch} machine, or compile it for a target of this one"
            )
        self.target = meta["target"]
        # The compiled code fixes the device: a CUDA library's kernels need TVM's CUDA module
        # loader, which a CPU run never registers ("a loader of that name is not registered").
        compiled_for = meta.get("device", "cpu")
        device = device or compiled_for
        if device.split(":")[0] != compiled_for:
            code = {"cuda": "CUDA kernels", "cpu": "CPU code"}.get(compiled_for, f"{compiled_for} code")
            raise fail(
                f"{self.library_path.name} holds {code} (target '{self.target}'), so it cannot run on "
                f"device '{device}'; pass --device {compiled_for}, or leave --device out"
            )
        if compiled_for == "cpu":
            configure_cpu_threads()
        self.input_name = meta["input"]["name"]
        self.input_shape = tuple(meta["input"]["shape"])
        self.input_dtype = np.dtype(meta["input"]["dtype"])
        self.output_shape = tuple(meta["output"]["shape"])

        if device.split(":")[0] == "cuda":
            try:
                load_cuda_runtime()
            except ArtifactError as exc:
                raise fail(str(exc)) from None
        try:
            self.device = tvm.device(device)
        except Exception as exc:
            raise fail(f"unknown device '{device}': {_first_line(exc)}") from None
        if not self.device.exist:
            hint = (
                "; the CUDA driver and runtime loaded, but no GPU is visible (see nvidia-smi and "
                "CUDA_VISIBLE_DEVICES)" if device.split(":")[0] == "cuda" else ""
            )
            raise fail(f"device '{device}' is not available on this machine{hint}")

        try:
            self._module = tvm.runtime.load_module(str(self.library_path))
            self._vm = VirtualMachine(self._module, self.device)
            self._main = self._vm[meta.get("entry", "main")]
        except Exception as exc:
            raise fail(
                f"TVM {tvm.__version__} cannot load {self.library_path} "
                f"(built with TVM {meta.get('tvm_version', '?')} for target '{self.target}'): "
                f"{_first_line(exc)}"
            ) from None

        # Separate weights are copied to the device once, in the order "main" takes them.
        self._params: list = []
        if meta.get("params_file"):
            weights = self.library_path.with_name(meta["params_file"])
            try:
                with np.load(weights) as arrays:
                    self._params = [
                        tvm.runtime.tensor(arrays[name], self.device)
                        for name in meta["params_order"]
                    ]
            except FileNotFoundError:
                raise fail(
                    f"weights file {weights} is missing; "
                    f"it must travel with {self.library_path.name}"
                ) from None
            except (KeyError, ValueError, OSError) as exc:
                raise fail(
                    f"weights file {weights} does not match the artifact: {_first_line(exc)}"
                ) from None

    def check_target(self, expected_target_name: str) -> None:
        """Raise if the artifact was compiled for another target than ``expected_target_name``."""
        if self.target != expected_target_name:
            raise self.error_type(
                f"{self.library_path} was built for target '{self.target}', "
                f"not '{expected_target_name}'; compile it for '{expected_target_name}'"
            )

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Run the model on one input batch of exactly the compiled shape and dtype."""
        x = np.asarray(x)
        if x.shape != self.input_shape or x.dtype != self.input_dtype:
            raise self.error_type(
                f"input is {x.dtype} {list(x.shape)}, but {self.library_path.name} was compiled "
                f"for {self.input_dtype} {list(self.input_shape)}"
            )
        x_device = tvm.runtime.tensor(np.ascontiguousarray(x), self.device)
        return self._main(x_device, *self._params).numpy()

    def time_calls(self, x: np.ndarray, warmup: int, repeats: int) -> list[float]:
        """Seconds of each of ``repeats`` calls on ``x``, after ``warmup`` calls: the input
        stays on the device and every call is synchronized, so this is the device's time
        per call (launches included), not the host copies ``infer`` adds."""
        call = self.device_call(x)
        for _ in range(warmup):
            call()
        self.device.sync()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            self.device.sync()
            seconds.append(time.perf_counter() - start)
        return seconds

    def device_call(self, x: np.ndarray):
        """A function running the model on ``x``, copied to the device once: it launches
        the work and returns without waiting for it or copying anything back."""
        self.infer(x)  # checks the input's shape and dtype
        x_device = tvm.runtime.tensor(np.ascontiguousarray(x), self.device)
        return lambda: self._main(x_device, *self._params)


BUNDLE_MANIFEST = "manifest.json"
LABELS = "labels.txt"


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks (the check and measure bundles use it too)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_bundle_files(library: Path) -> None:
    """Refuse a file this command loads (the library, its metadata and weights, labels.txt)
    whose sha256 differs from the bundle's manifest.json beside it: a truncated copy or an
    edited file must not run as the model the manifest describes. A library outside a
    bundle has no such manifest (the pipeline's own manifest.json lists no "files")."""
    library = Path(library)
    manifest_path = library.with_name(BUNDLE_MANIFEST)
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read {manifest_path}: {_first_line(exc)}; unpack the bundle again") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        return

    def check(path: Path) -> None:
        if not path.is_file():
            return  # loading it says what is missing
        entry = files.get(path.name)
        listed = entry.get("sha256") if isinstance(entry, dict) else None
        if listed is None:
            raise ArtifactError(f"{path} is not listed in {manifest_path}; unpack the bundle again")
        actual = file_sha256(path)
        if actual != listed:
            raise ArtifactError(
                f"{path} does not match {manifest_path} (sha256 {actual[:12]}, listed {listed[:12]}): it was "
                f"damaged or changed since packaging; copy and unpack the bundle again"
            )

    meta_file = metadata_path(library)
    check(meta_file)  # before reading the weights' name from it
    check(library)
    try:
        params_file = json.loads(meta_file.read_text()).get("params_file")
    except (OSError, ValueError, AttributeError):
        params_file = None  # loading the library reports it
    if params_file:
        check(library.with_name(params_file))
    check(library.with_name(LABELS))


def read_labels(library: Path, classes: int) -> list[str] | None:
    """The class names of labels.txt beside the library (line i names output i), or None
    when there is none or it does not name every output."""
    path = Path(library).with_name(LABELS)
    try:
        names = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"cannot read {path}: {_first_line(exc)}") from None
    if len(names) != classes:
        print(f"warning: {path} names {len(names)} classes, but the model has {classes} outputs; "
              f"printing class numbers only", file=sys.stderr)
        return None
    return names


def top_classes(logits: np.ndarray, labels: list[str] | None) -> str:
    """The largest output of each image, as "index name (logit x)"."""
    logits = logits.reshape(logits.shape[0], -1) if logits.ndim > 1 else logits[None]
    tops = []
    for row in logits:
        index = int(np.argmax(row))
        name = f" {labels[index]}" if labels is not None else ""
        tops.append(f"{index}{name} (logit {row[index]:.3f})")
    return ("top class: " if len(tops) == 1 else "top class per image: ") + ", ".join(tops)


def main(argv: list[str] | None = None) -> int:
    """Command line: run an artifact on a .npy input, save the output, print latency and top class."""
    parser = argparse.ArgumentParser(description="Run a compiled TVM artifact on a .npy input.")
    parser.add_argument("library", type=Path, help="the compiled .so (its .json must sit beside it)")
    parser.add_argument("--input", type=Path, required=True, help=".npy input of the compiled shape")
    parser.add_argument("--output", type=Path, help="where to save the output as .npy")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs after one warm-up run")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the one it was compiled for)")
    parser.add_argument("--target", help="fail unless the artifact was built for this target")
    args = parser.parse_args(argv)

    try:
        if args.repeat < 1:
            raise ArtifactError(f"--repeat must be at least 1, not {args.repeat}")
        try:
            x = np.load(args.input)
        except (OSError, ValueError, EOFError) as exc:
            raise ArtifactError(f"cannot read input {args.input}: {_first_line(exc)}") from None
        check_bundle_files(args.library)
        artifact = LoadedArtifact(args.library, device=args.device)
        if args.target:
            artifact.check_target(args.target)
        labels = read_labels(args.library, int(np.prod(artifact.output_shape[1:])))
        y = artifact.infer(x)  # warm-up: first-call allocations are not latency
        times_ms = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            y = artifact.infer(x)
            times_ms.append((time.perf_counter() - start) * 1e3)
    except ArtifactError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.output is not None:
        np.save(args.output, y)
    times_ms.sort()
    print(
        f"{args.library.name} on {artifact.device}: input {list(x.shape)} -> output {list(y.shape)}; "
        f"latency median {times_ms[len(times_ms) // 2]:.3f} ms, min {times_ms[0]:.3f} ms "
        f"over {len(times_ms)} runs (host copies included)"
    )
    print(top_classes(y, labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
