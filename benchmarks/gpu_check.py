"""The one-call GPU check: TVM's CUDA artifacts against PyTorch, on the same GPU, in one run.

Runs inside the folder `make gpu-bundle` writes (benchmarks/gpu_bundle.py), on a machine with
an NVIDIA GPU and PyTorch with CUDA; the TVM runtime comes from the bundle (run.sh installs it):

    bash run.sh --out OUT                    # or: python gpu_check.py --out OUT (TVM importable)

For every artifact of the bundle it reports
- correctness against PyTorch float32 on the same GPU with TF32 off, on --images random
  inputs (seeded): NaN count, max abs error, relative L2, top-1 agreement (pipeline/compare.py);
- latency: the median (and p90/p99) of --repeats synchronized calls after --warmup, with the
  input already on the GPU, beside PyTorch eager (fp32, fp16), eager fp16 channels_last,
  torch.compile and torch.compile(mode="reduce-overhead") (CUDA graphs) at the same batch;
- kernels: GPU time per call of each TVM kernel over --profile-calls calls (PyTorch's profiler,
  CUPTI), beside the rule, grid and roofline bound compile recorded (pipeline/kernel_profile.py),
  and the time between kernels.

Where the bundle carries the demo model (gpu_bundle.py --demo-args), its artifacts run on its
labeled test images (all of them, or --demo-images) against PyTorch float32 from the same
checkpoint (sha256-checked) on the same device: top-1, top-5, agreement and the errors, and
the same latency rows.

It writes OUT/reports/<folder>/{latency,accuracy,kernels}.json and report.md in the layout of the
repository's reports/ (folders cuda-sm90, cuda-sm90-fp16, cuda-sm90-fp16-b8, ...; the demo's
cuda-sm90-demo, cuda-sm90-demo-fp16: gpu_check_report.py writes them all),
OUT/gpu_check.json (everything) and OUT/summary.md. Exit 0 when the criteria hold (no NaN;
fp32 max abs error <= 1e-4; fp16 top-1 agreement >= 99%), 1 when one fails, 2 when the check
cannot run (no GPU, a damaged bundle), with one line saying why.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# In the bundle the pipeline's modules sit in lib/; in the repository, one folder up. The
# check's report writer (gpu_check_report.py) sits beside this script in both.
sys.path[:0] = [str(HERE), str(HERE / "lib") if (HERE / "lib" / "pipeline").is_dir() else str(HERE.parent)]

import numpy as np  # noqa: E402
from gpu_check_report import (  # noqa: E402
    BASELINES, DEMO, TORCH_MODES, config_variant, failed_criteria, summary_markdown, write_outputs,
)

MIN_REPEATS = 200
# The demo's PyTorch reference runs this many images a call (any batch gives the same logits
# within float noise; a large one keeps 10 000 images quick).
DEMO_REFERENCE_BATCH = 250
# The GPU machine's torch may resize a few ulp apart from the one that built the bundle.
PREPROCESSING_TOLERANCE = 1e-5

class CheckError(Exception):
    """The check cannot run; the message says why and what to do."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=HERE, help="the bundle folder (default: this script's)")
    parser.add_argument("--out", type=Path, default=Path("gpu-check-out"), help="where the reports go")
    parser.add_argument("--images", type=int, default=256, help="random inputs for the correctness comparison")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=300, help=f"timed calls per backend (at least {MIN_REPEATS})")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile rows")
    parser.add_argument("--profile-calls", type=int, default=20,
                        help="calls of each artifact recorded for its kernel table (0: none; needs a CUDA GPU)")
    parser.add_argument("--sweep-ms", type=int, default=20,
                        help="GPU time each kernel of the bundle's GEMM sweep is run for, per repeat (0: no sweep)")
    parser.add_argument("--pack", action="store_true",
                        help="write the report folders as OUT/reports.tar.gz (three files in all: for a "
                             "machine that hands back only a few files)")
    parser.add_argument("--demo-images", type=int, default=0,
                        help="evaluate the demo model on the first N of its labeled test images (0: all; the "
                             "reports then say how many)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: try the check on a bundle built with --target x86 (no GPU needed)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------
# The bundle


def read_manifest(bundle: Path) -> dict:
    try:
        return json.loads((bundle / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckError(f"{bundle} is not a GPU bundle ({exc}); build one with `make gpu-bundle`") from None


def unpack_artifacts(bundle: Path, manifest: dict) -> Path:
    """bundle/artifacts/<config>/ from artifacts.tar.xz, with derived weights written and
    every weights file checked against the digest taken where it was compiled."""
    folder = bundle / "artifacts"
    if not folder.is_dir():
        temp = bundle / ".artifacts.tmp"
        temp.mkdir(exist_ok=True)
        try:
            with tarfile.open(bundle / "artifacts.tar.xz") as archive:
                archive.extractall(temp, filter="data")
        except (OSError, tarfile.TarError) as exc:
            raise CheckError(f"cannot unpack {bundle / 'artifacts.tar.xz'}: {exc}") from None
        temp.rename(folder)
    for name, entry in manifest["artifacts"].items():
        derived = entry.get("derived_params")
        if derived and not (folder / name / derived["file"]).is_file():
            with np.load(folder / derived["from"]) as base:
                arrays = {n: base[n].astype(dtype) for n, dtype in derived["dtypes"].items()}
            for n, values in derived["values"].items():
                arrays[n] = np.asarray(values, dtype=derived["dtypes"][n])
            np.savez(folder / name / derived["file"], **arrays)
        if entry.get("params_digest"):
            meta = json.loads((folder / name / "model.so.json").read_text())
            with np.load(folder / name / meta["params_file"]) as data:
                arrays = {n: data[n] for n in data.files}
            if params_digest(arrays, meta["params_order"]) != entry["params_digest"]:
                raise CheckError(f"the weights of {name} differ from the ones it was compiled with; rebuild the bundle")
    demo = manifest.get("demo")
    if demo:
        from pipeline.runtime.runtime_only import file_sha256

        checkpoint = folder / demo["model"]["checkpoint"]
        if not checkpoint.is_file() or file_sha256(checkpoint) != demo["model"]["checkpoint_sha256"]:
            raise CheckError(f"the demo checkpoint {demo['model']['checkpoint']} is missing or differs from the one "
                             f"its artifacts were compiled from; rebuild the bundle")
    return folder


def params_digest(arrays: dict[str, np.ndarray], order: list[str]) -> str:
    """sha256 over the arrays' dtype, shape and bytes in the artifact's parameter order: taken
    by benchmarks/gpu_bundle.py where the artifact was compiled, checked here."""
    digest = hashlib.sha256()
    for name in order:
        value = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{value.dtype.str}:{value.shape};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def inputs(manifest: dict, count: int) -> np.ndarray:
    model = manifest["model"]
    shape = (count, model["in_chans"], model["input_size"], model["input_size"])
    return np.random.default_rng(model["seed"]).standard_normal(shape, dtype=np.float32)


# ---------------------------------------------------------------------------
# The demo model: its checkpoint and its labeled test images


def preprocess(raw: np.ndarray, recipe: dict) -> np.ndarray:
    """Raw (N, H, W) uint8 gray images -> the model's float32 (N, C, S, S) input, in the same
    torch operations as calibration/preprocess.py's preprocess_array (the bundle is built only
    where the two agree bit for bit; the check is not given that package)."""
    import torch
    import torch.nn.functional as F

    mean = torch.tensor(recipe["mean"], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(recipe["std"], dtype=torch.float32).view(-1, 1, 1)
    (height, width), (top, left), size = recipe["resize"], recipe["crop_at"], recipe["input_size"]
    out = np.empty((len(raw), len(recipe["mean"]) * recipe["repeat_channels"], size, size), np.float32)
    for start in range(0, len(raw), 1024):
        batch = torch.from_numpy(np.array(raw[start:start + 1024, None])).float() * (1.0 / 255.0)
        if len(recipe["mean"]) == 3:
            batch = batch.expand(-1, 3, -1, -1)
        if (height, width) != tuple(raw.shape[1:]):
            batch = F.interpolate(batch, size=(height, width), mode=recipe["torch_mode"],
                                  antialias=recipe["antialias"]).clamp_(0.0, 1.0)
        batch = (batch[:, :, top:top + size, left:left + size] - mean) / std
        if recipe["repeat_channels"] > 1:
            batch = batch.repeat(1, recipe["repeat_channels"], 1, 1)
        out[start:start + 1024] = batch.numpy()
    return out


def demo_images(folder: Path, demo: dict, limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(preprocessed images, labels) of the demo's evaluation set, the first ``limit`` (0: all),
    checked against the digest taken where the bundle was built and against the pipeline's
    own preprocessing of its first images."""
    data = demo["data"]
    with np.load(folder / data["file"]) as stored:
        arrays = {name: stored[name] for name in stored.files}
    if params_digest(arrays, ["images", "labels"]) != data["digest"]:
        raise CheckError(f"the demo's test images ({data['file']}) differ from the ones the bundle was built with; "
                         f"rebuild the bundle")
    sample = arrays["preprocessed_sample"]
    mine = preprocess(arrays["images"][:len(sample)], data["preprocessing"])
    worst = float(np.abs(mine - sample).max())
    if not worst <= PREPROCESSING_TOLERANCE:
        raise CheckError(f"this machine's torch preprocesses the demo's images up to {worst:.3g} away from the pipeline "
                         f"(tolerance {PREPROCESSING_TOLERANCE:g}); rebuild the bundle with this torch version")
    count = len(arrays["labels"]) if limit == 0 else min(limit, len(arrays["labels"]))
    return preprocess(arrays["images"][:count], data["preprocessing"]), arrays["labels"][:count].astype(np.int64)


def demo_model(folder: Path, demo: dict):
    """The demo model in PyTorch with the checkpoint its artifacts were compiled from."""
    import torch

    from pipeline.model import create_model

    model = demo["model"]
    net = create_model(model["variant"], num_classes=model["num_classes"], in_chans=model["in_chans"]).eval()
    state = torch.load(folder / model["checkpoint"], map_location="cpu", weights_only=True)
    net.load_state_dict(state[model["state_dict_key"]] if model.get("state_dict_key") else state, strict=True)
    return net


def demo_data(demo: dict, count: int) -> dict:
    """accuracy.json's "data" of the demo's rows: the set, how many of its images."""
    data = demo["data"]
    return {"source": data["source"], "count": count, "labeled": True, "class_names": data["class_names"],
            "preprocessing": data["preprocessing"]["name"],
            # The aggregate reads the set's size from "has N images" (reports/aggregate.py SET_SIZE).
            "description": f"{data['name']}: the set has {data['set_size']} images: using "
                           + (f"all {count}" if count == data["set_size"] else f"the first {count}")}


# ---------------------------------------------------------------------------
# Measuring


def torch_model(manifest: dict):
    """The bundle's model in PyTorch with the seeded weights it was compiled with."""
    from pipeline.model import create_model
    from pipeline.seeded_weights import seed_model

    model = manifest["model"]
    net = create_model(model["variant"], num_classes=model["num_classes"], in_chans=model["in_chans"]).eval()
    return seed_model(net, model["seed"])


def reference_logits(net, images: np.ndarray, device: str, batch: int = 8) -> np.ndarray:
    """PyTorch float32 with TF32 off: the numerics every artifact is held to."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    net = net.to(device=device, dtype=torch.float32)
    with torch.inference_mode():
        return np.concatenate([
            net(torch.from_numpy(images[i:i + batch]).to(device)).float().cpu().numpy()
            for i in range(0, len(images), batch)
        ])


def time_torch(call, x, warmup: int, repeats: int) -> list[float]:
    import torch

    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.inference_mode():
        for _ in range(warmup):
            call(x)
        sync()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            call(x)
            sync()
            seconds.append(time.perf_counter() - start)
    return seconds


def measure_torch(net, mode: str, x: np.ndarray, device: str, warmup: int, repeats: int) -> dict:
    """Latency stats of one PyTorch row, or {"error": why} when that mode cannot run here."""
    import copy

    import torch

    from pipeline.latency_stats import latency_stats

    dtype, channels_last, compile_mode = TORCH_MODES[mode]
    try:
        model = copy.deepcopy(net).to(device=device, dtype=getattr(torch, dtype))
        batch = torch.from_numpy(x).to(device=device, dtype=getattr(torch, dtype))
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            batch = batch.contiguous(memory_format=torch.channels_last)
        call = torch.compile(model, mode=compile_mode) if compile_mode else model
        return latency_stats(time_torch(call, batch, warmup, repeats), len(x))
    except Exception as exc:  # noqa: BLE001 -- a row that cannot run is reported, not fatal
        text = str(exc).strip().splitlines()
        return {"error": f"{type(exc).__name__}: {text[0] if text else ''}"}


def profile_kernels(call, calls: int, costs: list[dict], latency_ms: float, trace_path: Path) -> dict:
    """The kernel table of ``calls`` calls of ``call`` (pipeline/kernel_profile.py), from
    the Chrome trace PyTorch's profiler writes; an error is reported, not fatal."""
    from pipeline import kernel_profile

    try:
        import torch
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as recording:
            for _ in range(calls):
                call()
            torch.cuda.synchronize()
        recording.export_chrome_trace(str(trace_path))
        rows = kernel_profile.with_costs(kernel_profile.kernel_times(json.loads(trace_path.read_text()), calls), costs)
        if not rows:
            return {"error": "the profiler recorded no kernels", "calls": calls}
        return {"calls": calls, "summary": kernel_profile.summary(rows, latency_ms), "kernels": rows}
    except Exception as exc:  # noqa: BLE001 -- the check's numbers stand without the table
        text = str(exc).strip().splitlines()
        return {"error": f"{type(exc).__name__}: {text[0] if text else ''}", "calls": calls}
    finally:
        trace_path.unlink(missing_ok=True)


def measure_artifact(folder: Path, x_all: np.ndarray, reference: np.ndarray, batch: int,
                     warmup: int, repeats: int, device: str, profile_calls: int = 0,
                     kernel_costs: list[dict] | None = None, labels: np.ndarray | None = None) -> dict:
    from pipeline.compare import compare_logits
    from pipeline.latency_stats import latency_stats
    from pipeline.runtime.runtime_only import ArtifactError, LoadedArtifact

    try:
        artifact = LoadedArtifact(folder / "model.so", device=device)
    except ArtifactError as exc:
        raise CheckError(str(exc)) from None
    count = len(x_all) - len(x_all) % batch
    outputs = np.concatenate([artifact.infer(x_all[i:i + batch]) for i in range(0, count, batch)])
    measured = {
        "accuracy": compare_logits(reference[:count], outputs, None if labels is None else labels[:count]),
        "latency": latency_stats(artifact.time_calls(x_all[:batch], warmup, repeats), batch),
        "artifact_bytes": sum((folder / f).stat().st_size for f in ("model.so", "model.params.npz")
                              if (folder / f).is_file()),
    }
    if profile_calls > 0 and device == "cuda":
        measured["kernel_profile"] = profile_kernels(
            artifact.device_call(x_all[:batch]), profile_calls, kernel_costs or [],
            measured["latency"]["median_ms"], folder / "trace.json")
    return measured


def measure_gemm_sweep(folder: Path, listing: dict, device: str, min_ms: int) -> dict:
    """Each kernel of the bundle's GEMM sweep (benchmarks/gemm_sweep.py) timed on its own on
    random arguments: the median of 5 repeats, each at least ``min_ms`` of calls. A failure
    is reported, not fatal: the sweep is for the next schedules, not this check."""
    import tvm

    from pipeline.runtime.runtime_only import load_cuda_runtime

    rows = []
    try:
        if device == "cuda":
            load_cuda_runtime()
        module = tvm.runtime.load_module(str(folder / listing["library"]))
        dev = tvm.device(device, 0)
        rng = np.random.default_rng(0)
        for entry in listing["kernels"]:
            args = [tvm.runtime.tensor((rng.standard_normal(a["shape"]) * 0.1).astype(a["dtype"]), dev)
                    for a in entry["args"]]
            timer = module.time_evaluator(entry["kernel"], dev, number=1, repeat=5, min_repeat_ms=min_ms)
            seconds = sorted(timer(*args).results)
            rows.append({**{k: v for k, v in entry.items() if k != "args"}, "us": seconds[len(seconds) // 2] * 1e6})
    except Exception as exc:  # noqa: BLE001 -- reported beside what was measured
        return {"rows": rows, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    return {"rows": rows}


def environment(device: str) -> dict:
    import torch

    import tvm

    def smi(field: str) -> str:
        try:
            result = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30)
            return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else "unknown"
        except (OSError, subprocess.SubprocessError):
            return "unknown"

    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    on_gpu = device == "cuda"
    return {
        "gpu": torch.cuda.get_device_name(0) if on_gpu else "none (run on the CPU)",
        "driver": smi("driver_version") if on_gpu else "none",
        "cuda": torch.version.cuda,
        "compute_capability": "sm_%d%d" % torch.cuda.get_device_capability(0) if on_gpu else "none",
        "cpu": cpu,
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "tools": {"python": platform.python_version(), "torch": torch.__version__, "apache-tvm": tvm.__version__,
                  "numpy": np.__version__},
    }


# ---------------------------------------------------------------------------


def measure_baselines(net, configs: list[dict], images: np.ndarray, args: argparse.Namespace) -> dict[str, dict]:
    """Batch -> PyTorch row name -> latency stats, for the rows the configurations compare with."""
    pytorch: dict[str, dict] = {}
    for batch in sorted({c["batch_size"] for c in configs}):
        wanted = {mode for c in configs if c["batch_size"] == batch for mode in BASELINES[c["precision"]]}
        for mode in (m for m in TORCH_MODES if m in wanted):
            if args.skip_compile and TORCH_MODES[mode][2]:
                continue
            print(f"[gpu_check] {mode} batch {batch}", file=sys.stderr, flush=True)
            pytorch.setdefault(str(batch), {})[mode] = measure_torch(
                net, mode, images[:batch], args.device, args.warmup, args.repeats)
    return pytorch


def measure_configs(folder: Path, manifest: dict, configs: list[dict], images: np.ndarray, reference: np.ndarray,
                    args: argparse.Namespace, labels: np.ndarray | None = None) -> list[dict]:
    """One row per configuration: its artifact against the reference, and timed."""
    rows = []
    for config in configs:
        print(f"[gpu_check] TVM {config['name']}", file=sys.stderr, flush=True)
        measured = measure_artifact(folder / config["name"], images, reference, config["batch_size"],
                                    args.warmup, args.repeats, args.device, args.profile_calls,
                                    manifest["artifacts"][config["name"]].get("kernels"), labels)
        rows.append({"name": config["name"], "precision": config["precision"],
                     "batch_size": config["batch_size"], "variant": config_variant(config), **measured})
    return rows


def run_demo(folder: Path, manifest: dict, args: argparse.Namespace) -> dict:
    """The demo model's rows: its artifacts on its labeled test images against PyTorch float32
    from the same checkpoint on the same device (top-1, top-5, agreement, errors), and timed."""
    demo = manifest["demo"]
    images, labels = demo_images(folder, demo, args.demo_images)
    net = demo_model(folder, demo)
    print(f"[gpu_check] demo: PyTorch float32 reference on {len(images)} labeled images", file=sys.stderr, flush=True)
    reference = reference_logits(net, images, args.device, batch=DEMO_REFERENCE_BATCH)
    pytorch = measure_baselines(net, demo["configs"], images, args)
    rows = measure_configs(folder, manifest, demo["configs"], images, reference, args, labels)
    for row in rows:
        row["model"] = DEMO
    return {"model": demo["model"], "configs": demo["configs"], "data": demo_data(demo, len(images)),
            "pytorch": pytorch, "rows": rows}


def run_check(args: argparse.Namespace) -> dict:
    import torch

    if args.repeats < MIN_REPEATS and args.device == "cuda":
        raise CheckError(f"--repeats {args.repeats} is below {MIN_REPEATS}; the report's medians need at least that")
    if args.demo_images < 0:
        raise CheckError(f"--demo-images {args.demo_images} is negative; give a count of images, or 0 for all of them")
    if args.profile_calls < 0:
        raise CheckError(f"--profile-calls {args.profile_calls} is negative; give a count of calls, or 0 for no kernel table")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CheckError("PyTorch sees no CUDA GPU on this machine; run the check where `nvidia-smi` lists one")
    bundle = args.bundle.resolve()
    manifest = read_manifest(bundle)
    folder = unpack_artifacts(bundle, manifest)
    images = inputs(manifest, args.images)
    net = torch_model(manifest)
    print(f"[gpu_check] PyTorch float32 reference on {len(images)} inputs", file=sys.stderr, flush=True)
    reference = reference_logits(net, images, args.device)

    pytorch = measure_baselines(net, manifest["configs"], images, args)
    rows = measure_configs(folder, manifest, manifest["configs"], images, reference, args)
    demo = run_demo(folder, manifest, args) if manifest.get("demo") else None
    sweep = None
    if manifest.get("gemm_sweep") and args.device == "cuda" and args.sweep_ms > 0:
        print(f"[gpu_check] GEMM sweep: {len(manifest['gemm_sweep']['kernels'])} kernels", file=sys.stderr, flush=True)
        sweep = measure_gemm_sweep(folder / "gemm-sweep", manifest["gemm_sweep"], args.device, args.sweep_ms)
    return {
        "manifest": {k: manifest[k] for k in ("target", "model", "configs", "commit", "created")},
        "environment": environment(args.device),
        "settings": {"images": len(images), "warmup": args.warmup, "repeats": args.repeats, "device": args.device,
                     "profile_calls": args.profile_calls if args.device == "cuda" else 0},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "gpu_check.py " + " ".join(sys.argv[1:]),
        "pytorch": pytorch,
        "rows": rows,
        **({DEMO: demo} if demo is not None else {}),
        **({"gemm_sweep": sweep} if sweep is not None else {}),
        "failures": failed_criteria(rows + (demo["rows"] if demo else [])),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        results = run_check(args)
    except CheckError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_outputs(results, args.out, pack=args.pack)
    print(summary_markdown(results))
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
