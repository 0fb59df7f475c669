"""How the GPU check (gpu_check.py) judges and writes what it measured: the criteria, each
configuration's latency.json, accuracy.json and report.md in the layout of the repository's
reports/, OUT/summary.md and the GEMM sweep's table. It travels in the bundle beside
gpu_check.py and reads only the results dict the check builds (NumPy and JSON, no GPU).
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

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



# ---------------------------------------------------------------------------
# Judging and writing

# The results' key, rows' "model" and report folders' infix of the demo model (the Makefile's
# MODEL_ARGS model): reports/cuda-sm90-demo/, -demo-fp16/, beside ConvNeXt-T's cuda-sm90/, -fp16/.
DEMO = "demo"


def report_folder(target: str, precision: str, batch: int, model: str = "") -> str:
    """reports/ folder of one configuration: cuda-sm90, cuda-sm90-fp16, cuda-sm90-fp16-b8, ...;
    the demo model's: cuda-sm90-demo, cuda-sm90-demo-fp16, ..."""
    return (target + (f"-{model}" if model else "") + ("" if precision == "fp32" else f"-{precision}")
            + ("" if batch == 1 else f"-b{batch}"))


def config_variant(config: dict) -> str:
    """How a bundle configuration differs from the default compile ("" where it does not):
    "no-split-k" for one compiled with --no-gpu-split-k, to compare with."""
    return "" if config.get("gpu_split_k", True) else "no-split-k"


def row_label(row: dict, batch: str = "b") -> str:
    """"fp16 b8", "fp16 b8 no-split-k", "demo fp16 b1" (``batch="batch "``: "fp16 batch 8 ...")."""
    return ((f"{row['model']} " if row.get("model") else "") + f"{row['precision']} {batch}{row['batch_size']}"
            + (f" {row['variant']}" if row.get("variant") else ""))


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
    # The demo's rows stand on its own model, PyTorch rows and labeled images.
    part = results[DEMO] if row.get("model") == DEMO else results
    measured = part["pytorch"].get(str(row["batch_size"]), {})
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
    model = {**(part["model"] if part is not results else manifest["model"]), "batch_size": row["batch_size"]}
    device = results["settings"]["device"]
    if part is results:
        data = {"description": f"{results['settings']['images']} random normal inputs (seed {model['seed']})",
                "count": row["accuracy"]["count"], "labeled": False, "source": "random"}
    else:
        data = part["data"]
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
        "reference": f"pytorch float32 on the same {device}, TF32 off"
                     + ("" if part is results else ", from the same checkpoint"),
        "data": data, "metrics": row["accuracy"], "model": model, "provenance": provenance,
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
        f"- weights: {weights_text(latency['model'])}",
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
        f"| top-1 agreement | {metrics['top1_agreement']:.2%} |",
    ]
    if "top1" in metrics:
        lines += [f"| top-1 (labels) | {metrics['top1']:.2%} |", f"| top-5 (labels) | {metrics['top5']:.2%} |",
                  f"| PyTorch float32 top-1 | {metrics['reference_top1']:.2%} |"]
    return "\n".join(lines + [""])


def weights_text(model: dict) -> str:
    """The weights a report's model ran with: a checkpoint and its digest, or the seed."""
    if model.get("checkpoint_sha256"):
        return f"{model['weights']} (sha256 {model['checkpoint_sha256'][:12]})"
    return f"{model['weights']}, seed {model['seed']}"


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
    demo = results.get(DEMO)
    if demo:
        model, data = demo["model"], demo["data"]
        lines += ["", f"Demo model: ConvNeXt-{model['variant']} ({weights_text(model)}) on {data['description']}; "
                      f"reference PyTorch float32 from the same checkpoint.", "",
                  "| configuration | TVM ms | fastest PyTorch ms | top-1 | top-5 | PyTorch top-1 | top-1 agree | "
                  "max abs err |", "|---|---|---|---|---|---|---|---|"]
        for row in demo["rows"]:
            torch_rows = demo["pytorch"].get(str(row["batch_size"]), {})
            fastest = min((torch_rows[n]["median_ms"] for n in BASELINES[row["precision"]]
                           if "median_ms" in torch_rows.get(n, {})), default=None)
            accuracy = row["accuracy"]
            lines.append(
                f"| {row_label(row)} | {row['latency']['median_ms']:.3f} | "
                f"{'n/a' if fastest is None else f'{fastest:.3f}'} | {accuracy['top1']:.2%} | {accuracy['top5']:.2%} | "
                f"{accuracy['reference_top1']:.2%} | {accuracy['top1_agreement']:.2%} | {accuracy['max_abs_error']:.3g} |")
    failures = results["failures"]
    lines += ["", "Criteria: " + ("all hold." if not failures else "FAILED: " + "; ".join(failures)), ""]
    return "\n".join(lines)


def write_outputs(results: dict, out: Path, pack: bool = False) -> None:
    """OUT/gpu_check.json, OUT/summary.md and OUT/reports/<folder>/ for every configuration
    (with ``pack``, OUT/reports.tar.gz holding those folders instead)."""
    out.mkdir(parents=True, exist_ok=True)
    reports = out / ("reports.tmp" if pack else "reports")
    for row in results["rows"] + results.get(DEMO, {}).get("rows", []):
        latency, accuracy = row_reports(row, results)
        folder = reports / report_folder(results["manifest"]["target"], row["precision"], row["batch_size"],
                                         row.get("model", ""))
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
