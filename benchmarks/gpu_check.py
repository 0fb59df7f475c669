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

It writes OUT/reports/<folder>/{latency,accuracy,kernels}.json and report.md in the layout of the
repository's reports/ (folders cuda-sm90, cuda-sm90-fp16, cuda-sm90-fp16-b8, ...),
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
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# In the bundle the pipeline's modules sit in lib/; in the repository, one folder up.
sys.path.insert(0, str(HERE / "lib") if (HERE / "lib" / "pipeline").is_dir() else str(HERE.parent))

import numpy as np  # noqa: E402

FP32_MAX_ABS_ERROR = 1e-4
FP16_MIN_AGREEMENT = 0.99
MIN_REPEATS = 200
# PyTorch rows, by name: (dtype, channels_last, torch.compile mode or None).
TORCH_MODES = {
    "pytorch_fp32": ("float32", False, None),
    "pytorch_fp16": ("float16", False, None),
    "pytorch_fp16_channels_last": ("float16", True, None),
    "torch_compile_fp16": ("float16", False, "default"),
    "torch_compile_cudagraphs_fp16": ("float16", False, "reduce-overhead"),
}
# What each precision is compared with; the first is the report's "pytorch" baseline.
BASELINES = {
    "fp32": ("pytorch_fp32",),
    "fp16": ("pytorch_fp16", "pytorch_fp16_channels_last", "torch_compile_fp16", "torch_compile_cudagraphs_fp16"),
    # Bundles for x86 only: GPU targets do not offer int8 (targets.GPU_INT8_REASON).
    "int8": ("pytorch_fp16", "pytorch_fp32"),
}


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
                     kernel_costs: list[dict] | None = None) -> dict:
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
        "accuracy": compare_logits(reference[:count], outputs),
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


def gemm_sweep_markdown(sweep: dict) -> str:
    """Per GEMM: its time in each tile and split, the defaults' choice marked, and the
    fastest tile of the whole GEMM (a split's partial GEMM lacks its sum kernel's time, so
    it is not a rival here)."""
    lines = ["# GEMM sweep", "",
             "Each tensor-core GEMM of the bundled fp16 models timed alone in every block tile, and its split-K "
             "partial GEMMs (without the kernel that adds them: see the kernel tables). * marks what the default "
             "schedules choose; steps are gpu_cost_model.modeled_steps.", ""]
    if sweep.get("error"):
        lines += [f"Stopped: {sweep['error']}.", ""]
    groups: dict[tuple, list[dict]] = {}
    for row in sweep["rows"]:
        groups.setdefault((row["batch"], row["gemm"], row["m"], row["n"], row["k"]), []).append(row)
    lines += ["| batch | GEMM (M x N x K) | variant | us | modeled steps |", "|---|---|---|---|---|"]
    for (batch, gemm, m, n, k), rows in groups.items():
        best = min((r["us"] for r in rows if r["splits"] == 1), default=None)
        for row in sorted(rows, key=lambda r: r["us"]):
            variant = (f"{row['tile'][0]}x{row['tile'][1]}" + (f", {row['splits']} slices" if row["splits"] > 1 else "")
                       + (" *" if row["default"] else ""))
            mark = " (best)" if row["splits"] == 1 and row["us"] == best else ""
            lines.append(f"| {batch} | {gemm} ({m} x {n} x {k}) | {variant} | {row['us']:.1f}{mark} | "
                         f"{row['modeled_steps']:.0f} |")
    return "\n".join(lines) + "\n"


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
# Judging and writing


def report_folder(target: str, precision: str, batch: int) -> str:
    """reports/ folder of one configuration: cuda-sm90, cuda-sm90-fp16, cuda-sm90-fp16-b8, ..."""
    return target + ("" if precision == "fp32" else f"-{precision}") + ("" if batch == 1 else f"-b{batch}")


def config_variant(config: dict) -> str:
    """How a bundle configuration differs from the default compile ("" where it does not):
    "no-split-k" for one compiled with --no-gpu-split-k, to compare with."""
    return "" if config.get("gpu_split_k", True) else "no-split-k"


def row_label(row: dict, batch: str = "b") -> str:
    """"fp16 b8", "fp16 b8 no-split-k" (``batch="batch "``: "fp16 batch 8 ...")."""
    return f"{row['precision']} {batch}{row['batch_size']}" + (f" {row['variant']}" if row.get("variant") else "")


def failed_criteria(rows: list[dict]) -> list[str]:
    """What keeps the check from passing, one line each (empty: it passes)."""
    failures = []
    for row in rows:
        accuracy = row["accuracy"]
        name = row_label(row, batch="batch ")
        if accuracy["nan_count"]:
            failures.append(f"{name}: {accuracy['nan_count']} NaN outputs")
        if row["precision"] == "fp32" and not accuracy["max_abs_error"] <= FP32_MAX_ABS_ERROR:
            failures.append(f"{name}: max abs error {accuracy['max_abs_error']:.3g} > {FP32_MAX_ABS_ERROR:g}")
        if row["precision"] == "fp16" and not accuracy["top1_agreement"] >= FP16_MIN_AGREEMENT:
            failures.append(f"{name}: top-1 agreement {accuracy['top1_agreement']:.2%} < {FP16_MIN_AGREEMENT:.0%}")
    return failures


def speedups(tvm_ms: float, baselines: dict[str, dict]) -> dict[str, float]:
    """Baseline median / TVM median per measured baseline (above 1: TVM is faster)."""
    return {f"vs_{name}": stats["median_ms"] / tvm_ms for name, stats in baselines.items() if "median_ms" in stats}


def row_reports(row: dict, results: dict) -> tuple[dict, dict]:
    """latency.json and accuracy.json of one configuration, as reports/ holds them."""
    manifest, env = results["manifest"], results["environment"]
    measured = results["pytorch"].get(str(row["batch_size"]), {})
    names = BASELINES[row["precision"]]
    baselines = {name: measured[name] for name in names if name in measured}
    backends = {"tvm": row["latency"], **{n: s for n, s in baselines.items() if "median_ms" in s}}
    if names[0] in backends:
        backends["pytorch"] = backends[names[0]]  # the aggregate report's PyTorch column
    provenance = {
        "device": env["gpu"], "gpu": f"{env['gpu']} ({env['compute_capability']}), driver {env['driver']}, CUDA {env['cuda']}",
        "host": {"cpu": env["cpu"], "cores": env["cores"], "gpu": env["gpu"], "driver": env["driver"], "cuda": env["cuda"]},
        "tools": env["tools"], "date": results["date"], "commit": manifest["commit"],
        "command": results["command"],
    }
    model = {**manifest["model"], "batch_size": row["batch_size"]}
    latency = {
        "target": manifest["target"], "precision": row["precision"], "batch_size": row["batch_size"],
        **({"variant": row["variant"]} if row.get("variant") else {}),
        "input_shape": [row["batch_size"], model["in_chans"], model["input_size"], model["input_size"]],
        "warmup": results["settings"]["warmup"], "model": model, "artifact_bytes": row["artifact_bytes"],
        "timing": f"synchronized calls on the {results['settings']['device']}, input already on the device, "
                  f"host copies excluded",
        "backends": backends,
        "backend_errors": {n: s["error"] for n, s in baselines.items() if "error" in s},
        "tvm_speedup": speedups(row["latency"]["median_ms"], {"pytorch": backends.get("pytorch", {}), **baselines}),
        "provenance": provenance,
    }
    accuracy = {
        "target": manifest["target"], "precision": row["precision"],
        "reference": f"pytorch float32 on the same {results['settings']['device']}, TF32 off",
        "data": {"description": f"{results['settings']['images']} random normal inputs (seed {manifest['model']['seed']})",
                 "count": row["accuracy"]["count"], "labeled": False, "source": "random"},
        "metrics": row["accuracy"], "model": model, "provenance": provenance,
    }
    return latency, accuracy


def _ms(stats: dict | None) -> str:
    if not stats:
        return "n/a"
    return f"{stats['median_ms']:.3f}" if "median_ms" in stats else f"failed: {stats['error']}"


def row_markdown(latency: dict, accuracy: dict) -> str:
    origin = latency["provenance"]
    lines = [
        f"# ConvNeXt-{latency['model']['variant']} on `{latency['target']}` ({latency['precision'].upper()}, "
        f"batch {latency['batch_size']}" + (f", {latency['variant']}" if latency.get("variant") else "") + ")", "",
        f"- device: {origin['gpu']}", f"- host: {origin['host']['cpu']} ({origin['host']['cores']} cores)",
        f"- date: {origin['date']}", f"- bundle built at commit: {origin['commit']}",
        f"- tools: " + ", ".join(f"{k} {v}" for k, v in origin["tools"].items()),
        f"- weights: {latency['model']['weights']}, seed {latency['model']['seed']}",
        f"- artifact: {latency['artifact_bytes'] / 1e6:.2f} MB", "",
        f"## Latency ({latency['warmup']} warm-up calls, {latency['backends']['tvm']['repeats']} timed; "
        f"{latency['timing']})", "",
        "| backend | median ms | p90 ms | p99 ms | throughput img/s | TVM speed-up |", "|---|---|---|---|---|---|",
    ]
    for name, stats in latency["backends"].items():
        if name == "pytorch":
            continue
        speedup = latency["tvm_speedup"].get(f"vs_{name}")
        lines.append(f"| {name} | {stats['median_ms']:.3f} | {stats['p90_ms']:.3f} | {stats['p99_ms']:.3f} | "
                     f"{stats['throughput_ips']:.1f} | {f'{speedup:.2f}x' if speedup else '1.00x'} |")
    for name, error in latency["backend_errors"].items():
        lines.append(f"| {name} | failed: {error} | | | | |")
    metrics = accuracy["metrics"]
    lines += [
        "", f"## Correctness ({accuracy['data']['description']}; reference: {accuracy['reference']})", "",
        "| metric | value |", "|---|---|",
        f"| NaN outputs | {metrics['nan_count']} |", f"| max abs logit error | {metrics['max_abs_error']:.3g} |",
        f"| relative L2 error | {metrics['relative_l2']:.3g} |",
        f"| top-1 agreement | {metrics['top1_agreement']:.2%} |", "",
    ]
    return "\n".join(lines)


def profile_markdown(profile: dict | None) -> str:
    """report.md's kernel section: the table, or why there is none."""
    from pipeline import kernel_profile

    if not profile:
        return ""
    if "error" in profile:
        return f"## Kernels\n\nNo kernel table: {profile['error']}.\n"
    return kernel_profile.markdown(profile["kernels"], profile["summary"], profile["calls"])


def summary_markdown(results: dict) -> str:
    env, manifest = results["environment"], results["manifest"]
    lines = [
        f"# GPU check: ConvNeXt-{manifest['model']['variant']} ({manifest['target']}) on {env['gpu']}", "",
        f"{results['date']}; driver {env['driver']}, CUDA {env['cuda']}, torch {env['tools']['torch']}, "
        f"TVM {env['tools']['apache-tvm']} (runtime only); bundle from commit {manifest['commit']}.", "",
        "| configuration | TVM ms | " + " | ".join(TORCH_MODES) + " | NaN | max abs err | rel L2 | top-1 agree |",
        "|---|---|" + "---|" * len(TORCH_MODES) + "---|---|---|---|",
    ]
    for row in results["rows"]:
        torch_rows = results["pytorch"].get(str(row["batch_size"]), {})
        accuracy = row["accuracy"]
        lines.append(
            f"| {row_label(row)} | {row['latency']['median_ms']:.3f} | "
            + " | ".join(_ms(torch_rows.get(mode)) for mode in TORCH_MODES)
            + f" | {accuracy['nan_count']} | {accuracy['max_abs_error']:.3g} | {accuracy['relative_l2']:.3g} | "
            f"{accuracy['top1_agreement']:.2%} |")
    failures = results["failures"]
    lines += ["", "Criteria: " + ("all hold." if not failures else "FAILED: " + "; ".join(failures)), ""]
    return "\n".join(lines)


def write_outputs(results: dict, out: Path, pack: bool = False) -> None:
    """OUT/gpu_check.json, OUT/summary.md and OUT/reports/<folder>/ for every configuration
    (with ``pack``, OUT/reports.tar.gz holding those folders instead)."""
    out.mkdir(parents=True, exist_ok=True)
    reports = out / ("reports.tmp" if pack else "reports")
    for row in results["rows"]:
        latency, accuracy = row_reports(row, results)
        folder = reports / report_folder(results["manifest"]["target"], row["precision"], row["batch_size"])
        if row.get("variant"):  # beside the configuration it varies, where reports/aggregate.py does not look
            folder = folder / row["variant"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "latency.json").write_text(json.dumps(latency, indent=2, sort_keys=True) + "\n")
        (folder / "accuracy.json").write_text(json.dumps(accuracy, indent=2, sort_keys=True) + "\n")
        profile = row.get("kernel_profile")
        if profile:
            (folder / "kernels.json").write_text(json.dumps(profile, indent=2, sort_keys=True) + "\n")
        (folder / "report.md").write_text(row_markdown(latency, accuracy) + profile_markdown(profile))
    if pack:
        with tarfile.open(out / "reports.tar.gz", "w:gz") as archive:
            archive.add(reports, arcname="reports")
        shutil.rmtree(reports)
    if results.get("gemm_sweep") is not None:
        (out / "gemm_sweep.md").write_text(gemm_sweep_markdown(results["gemm_sweep"]))
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (out / "summary.md").write_text(summary_markdown(results))


# ---------------------------------------------------------------------------


def run_check(args: argparse.Namespace) -> dict:
    import torch

    if args.repeats < MIN_REPEATS and args.device == "cuda":
        raise CheckError(f"--repeats {args.repeats} is below {MIN_REPEATS}; the report's medians need at least that")
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

    batches = sorted({c["batch_size"] for c in manifest["configs"]})
    pytorch: dict[str, dict] = {}
    for batch in batches:
        wanted = {mode for c in manifest["configs"] if c["batch_size"] == batch for mode in BASELINES[c["precision"]]}
        for mode in (m for m in TORCH_MODES if m in wanted):
            if args.skip_compile and TORCH_MODES[mode][2]:
                continue
            print(f"[gpu_check] {mode} batch {batch}", file=sys.stderr, flush=True)
            pytorch.setdefault(str(batch), {})[mode] = measure_torch(
                net, mode, images[:batch], args.device, args.warmup, args.repeats)
    rows = []
    for config in manifest["configs"]:
        print(f"[gpu_check] TVM {config['name']}", file=sys.stderr, flush=True)
        measured = measure_artifact(folder / config["name"], images, reference, config["batch_size"],
                                    args.warmup, args.repeats, args.device, args.profile_calls,
                                    manifest["artifacts"][config["name"]].get("kernels"))
        rows.append({"name": config["name"], "precision": config["precision"],
                     "batch_size": config["batch_size"], "variant": config_variant(config), **measured})
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
        **({"gemm_sweep": sweep} if sweep is not None else {}),
        "failures": failed_criteria(rows),
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
