"""Time a measure bundle's tuning candidates on the board, with nothing but NumPy, the TVM
runtime and the device.

`pipeline tune --measure-bundle DIR` copies this file into DIR as ``measure.py``, beside
``runtime_only.py`` (pipeline/runtime/runtime_only.py, for the CUDA loader and the CPU thread
count), ``manifest.json`` and ``candidates/*.so``. It imports no ``pipeline`` module and
nothing of TVM's compiler: the board needs only the TVM runtime.

    python DIR/measure.py --out results.json

Each candidate is one kernel, built as MetaSchedule's builder builds it; it is timed as
MetaSchedule's runner times it (time_evaluator with the manifest's number, repeat and
min_repeat_ms, on arguments filled with random numbers), in a worker process, so a
candidate that crashes or hangs costs that candidate only. `results.json` is rewritten after
every candidate, so a Ctrl-C or a reboot keeps what was measured; running the command
again continues where it stopped. Bring `results.json` back to
`pipeline tune ... --measure-results results.json`.

A machine without the bundle's device (no GPU, another GPU model, another CPU
architecture) is refused with one line and exit code 2, before anything is timed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import select
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__" and "tvm" not in sys.modules:
    # TVM 0.27: only the runtime library, without the compiler (see runtime_only.py); only
    # as a script, since a process that compiles later must not opt in.
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")

MANIFEST = "manifest.json"
BUNDLE_FORMAT = 1
RESULTS_FORMAT = 1
EXIT_USER_ERROR = 2


class BundleError(Exception):
    """A bundle or machine this script cannot measure on; said in one line, exit code 2."""


def results_digest(body: dict) -> str:
    """The sha256 a results file carries of everything else in it: `pipeline tune` refuses a
    file whose content does not match (cut short, edited, or not written by this script)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(bundle: Path) -> dict:
    path = bundle / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path} is missing; measure.py runs inside the folder `pipeline tune --measure-bundle` wrote") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read {path} ({exc}); copy the bundle again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT or "candidates" not in manifest:
        raise BundleError(f"{path} is not a measure bundle manifest of format {BUNDLE_FORMAT}; copy the bundle again")
    return manifest


def check_files(bundle: Path, manifest: dict) -> None:
    """Every candidate file is there and has the sha256 the manifest lists."""
    import runtime_only  # beside this file in the bundle

    for candidate in manifest["candidates"]:
        path = bundle / candidate["file"]
        if not path.is_file():
            raise BundleError(f"{path} is missing; copy the whole bundle folder again")
        if runtime_only.file_sha256(path) != candidate["sha256"]:
            raise BundleError(f"{path} does not match {bundle / MANIFEST} (sha256 differs): it was damaged "
                              f"or changed since `pipeline tune` wrote it; copy the bundle again")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("model name", "Model", "Hardware"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def open_device(manifest: dict) -> tuple[object, dict]:
    """The device the candidates were built for, and what it is; BundleError on a machine
    that does not have it."""
    import runtime_only  # beside this file in the bundle
    import tvm

    target = f"target '{manifest['target']}'"
    machine = runtime_only.machine_arch()
    if manifest["machine"] != machine:
        raise BundleError(f"this bundle's candidates were built for {manifest['machine']} ({target}), but this "
                          f"machine is {machine}; run measure.py on the board the bundle was written for")
    described = {"machine": machine, "cpu": cpu_model(), "tvm_version": tvm.__version__}
    if manifest["device"] == "cpu":
        described["threads"] = runtime_only.configure_cpu_threads()
        return tvm.cpu(0), described
    if manifest["device"] != "cuda":
        raise BundleError(f"this bundle measures on device '{manifest['device']}', which measure.py does not know")
    wanted = manifest.get("gpu_arch")
    try:
        runtime_only.load_cuda_runtime()
    except runtime_only.ArtifactError as exc:
        raise BundleError(f"{exc}; this bundle ({target}, {wanted}) is measured on that GPU") from None
    device = tvm.cuda(0)
    if not device.exist:
        raise BundleError(f"no CUDA GPU is visible on this machine (see nvidia-smi and CUDA_VISIBLE_DEVICES); "
                          f"this bundle ({target}, {wanted}) is measured on that GPU")
    arch = "sm_" + str(device.compute_version).replace(".", "")
    if wanted and arch != wanted:
        raise BundleError(f"this machine's GPU ({device.device_name}) is {arch}, but the bundle's candidates were "
                          f"built for {wanted} ({target}); run measure.py on a {wanted} GPU")
    described.update(gpu=str(device.device_name), gpu_arch=arch)
    return device, described


def random_arguments(args_info: list, device) -> list:
    """Arguments of the kernel's shapes and dtypes, filled with random numbers as
    MetaSchedule's runner fills them (its values do not matter, only that they are finite)."""
    import numpy as np
    import tvm

    rng = np.random.default_rng(0)
    arguments = []
    for kind, dtype, shape in args_info:
        if kind != "TENSOR":
            raise BundleError(f"argument kind '{kind}' cannot be allocated")
        if dtype.startswith(("int", "uint")):
            data = rng.integers(0, 8, size=shape).astype(dtype)
        elif dtype.startswith("float"):
            data = rng.uniform(-1, 1, size=shape).astype(dtype)
        else:  # bool and other dtypes NumPy may not name: left as allocated
            arguments.append(tvm.runtime.empty(shape, dtype, device))
            continue
        arguments.append(tvm.runtime.tensor(data, device))
    return arguments


def time_candidate(bundle: Path, candidate: dict, manifest: dict, device) -> list[float]:
    """Seconds per run of one candidate: MetaSchedule's evaluator (LocalRunner, alloc_repeat 1)."""
    import tvm

    evaluator = manifest["evaluator"]
    module = tvm.runtime.load_module(str(bundle / candidate["file"]))
    arguments = random_arguments(candidate["args_info"], device)
    timer = module.time_evaluator(
        module.entry_name, device, number=evaluator["number"], repeat=evaluator["repeat"],
        min_repeat_ms=evaluator["min_repeat_ms"],
        f_preproc="cache_flush_cpu_non_first_arg" if evaluator.get("enable_cpu_cache_flush") else "",
    )
    device.sync()
    return [float(s) for s in timer(*arguments).results]


def worker(bundle: Path) -> int:
    """Time the candidates named on stdin, one JSON line each on stdout."""
    manifest = read_manifest(bundle)
    by_id = {c["id"]: c for c in manifest["candidates"]}
    device, _ = open_device(manifest)
    for line in sys.stdin:
        candidate = by_id[line.strip()]
        try:
            reply = {"run_secs": time_candidate(bundle, candidate, manifest, device)}
        except Exception as exc:  # TVMError from the kernel: recorded as that candidate's failure
            text = str(exc).strip()
            reply = {"error": (text.splitlines()[-1] if text else type(exc).__name__)[:300]}
        print(json.dumps(reply), flush=True)
    return 0


class Worker:
    """A worker process; a candidate that crashes it or runs past the timeout costs that
    candidate only (a CUDA fault leaves a process's context unusable)."""

    def __init__(self, bundle: Path):
        # The interpreter as this one was started (-S: a board's Python without site packages).
        flags = ["-S"] if sys.flags.no_site else []
        self.process = subprocess.Popen(
            [sys.executable, *flags, str(Path(__file__).resolve()), "--bundle", str(bundle), "--worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def measure(self, candidate_id: str, timeout: float) -> dict:
        try:
            self.process.stdin.write(candidate_id + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            return {"error": f"the worker process ended (exit code {self.process.wait()})"}
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            self.close()
            return {"error": f"timed out after {timeout:g} s" if not ready
                    else f"the worker process ended (exit code {self.process.returncode})"}
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def write_results(path: Path, body: dict) -> None:
    """Written whole or not at all: a reboot mid-write leaves the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temp.write_text(json.dumps({**body, "digest": results_digest(body)}, indent=1) + "\n")
    os.replace(temp, path)


def earlier_results(path: Path, manifest: dict) -> dict[str, dict]:
    """What an earlier run of this bundle already measured into `path` (continued, not redone)."""
    try:
        data = json.loads(path.read_text())
        body = {k: v for k, v in data.items() if k != "digest"}
        if data.get("bundle_id") != manifest["bundle_id"] or data.get("digest") != results_digest(body):
            return {}
        return {r["id"]: r for r in data["results"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def measure(bundle: Path, out: Path, timeout: float, say=lambda m: print(m, file=sys.stderr, flush=True)) -> int:
    manifest = read_manifest(bundle)
    check_files(bundle, manifest)
    _, described = open_device(manifest)  # refuses a machine without the device, before any work
    candidates = manifest["candidates"]
    done = earlier_results(out, manifest)
    if done:
        say(f"[measure] continuing: {len(done)} of {len(candidates)} candidates are measured in {out} already "
            f"(delete it to measure them all again)")
    body = {
        "format": RESULTS_FORMAT, "bundle_id": manifest["bundle_id"], "round": manifest["round"],
        "target": manifest["target"], "target_json": manifest["target_json"], "cpu_tag": manifest["cpu_tag"],
        "database": manifest["database"], "measured_on": described, "evaluator": manifest["evaluator"],
        "complete": False, "results": [done[c["id"]] for c in candidates if c["id"] in done],
    }
    say(f"[measure] bundle {manifest['bundle_id']} (round {manifest['round']}, target {manifest['target']}): "
        f"{len(candidates)} candidates of {len({c['task'] for c in candidates})} kernels on "
        f"{described.get('gpu') or described['cpu']} -> {out}")
    started = time.monotonic()
    runner = None
    try:
        todo = [c for c in candidates if c["id"] not in done]
        for index, candidate in enumerate(todo, start=1):
            runner = runner or Worker(bundle)
            reply = runner.measure(candidate["id"], timeout)
            if runner.process.poll() is not None:
                runner = None
            body["results"].append({"id": candidate["id"], "sha256": candidate["sha256"], **reply})
            write_results(out, body)
            shown = (f"{sorted(reply['run_secs'])[len(reply['run_secs']) // 2] * 1e3:.4f} ms" if "run_secs" in reply
                     else f"failed: {reply['error'][:120]}")
            say(f"[measure] {len(done) + index}/{len(candidates)} {candidate['task']} ({candidate['kind']}): {shown}; "
                f"{time.monotonic() - started:.0f} s")
    except KeyboardInterrupt:
        write_results(out, body)
        say(f"[measure] interrupted: {len(body['results'])} of {len(candidates)} candidates are measured in {out}; "
            f"bring it back as it is (what was measured counts) or run the same command to continue")
        return 130
    finally:
        if runner is not None:
            runner.close()
    body["complete"] = True
    write_results(out, body)
    failed = sum(1 for r in body["results"] if "error" in r)
    say(f"[measure] done: {len(candidates) - failed} of {len(candidates)} candidates timed"
        f"{f', {failed} failed' if failed else ''}; bring {out} back to "
        f"`pipeline tune --target {manifest['target']} ... --measure-results {out.name}`")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time a measure bundle's tuning candidates on this board.")
    parser.add_argument("--out", type=Path, default=Path("results.json"), help="where to write the timings")
    parser.add_argument("--bundle", type=Path, default=Path(__file__).resolve().parent,
                        help="the bundle folder (default: the folder of this file)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds one candidate may take")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        return worker(args.bundle) if args.worker else measure(args.bundle, args.out, args.timeout)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
