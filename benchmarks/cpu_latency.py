"""CPU latency of ConvNeXt: PyTorch eager vs ONNX Runtime vs the TVM artifact, one table.

    .venv/bin/python benchmarks/cpu_latency.py                       # ConvNeXt-Tiny, 224, batch 1 and 8
    .venv/bin/python benchmarks/cpu_latency.py --variants tiny,small,base
    .venv/bin/python benchmarks/cpu_latency.py --variants atto --batches 1 --repeats 5

For each model and batch size it builds (or reuses from the artifacts cache) the model, its
ONNX export and the x86 artifacts, then times the backends on the same input, each in a
process of its own (pipeline/runtime/isolated.py says why). TVM has up to two rows: "tvm
defaults", compiled with the default schedules only (`--no-tuning-records`: what a user gets
without tuning), and "tvm records", with the tuning records compile finds for the model
(artifacts/tune/x86/<model>/, else tuning/x86/<model>/<cpu>/, else other models' records for
the same kernels) where there are any; the table says how many kernels had records. Effective GFLOP/s = the model's FLOPs (counted from the TVM kernels, multiply-add
= 2) / median latency, next to a NumPy SGEMM rate on this machine as the practical ceiling.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def sgemm_gflops(n: int = 1024, seconds: float = 2.0) -> float:
    """NumPy float32 matmul rate (its BLAS, all cores): a practical ceiling for this CPU."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    return 2 * n**3 * runs / (time.perf_counter() - start) / 1e9


def fused_model(onnx_path: Path, target, shape: tuple[int, ...]):
    """The model's kernels before scheduling (compile's phases up to it) and the TVM target."""
    from pipeline.compiler.tuning import tasks

    return tasks.fused_module(onnx_path, target, shape)


def model_flops(mod, tvm_target) -> float:
    """FLOPs of one forward pass: every TVM kernel's FLOPs times how often it runs."""
    from pipeline.compiler.tuning import tasks

    return sum(task.flops * task.weight for task in tasks.extract_tasks(mod, tvm_target))


def tvm_artifacts(config, target, schedules: tuple[str, ...], kernels) -> tuple[dict, dict[str, tuple[Path, dict]]]:
    """The pipeline's results up to compile (with default schedules only), and the TVM
    artifact of each of ``schedules`` that applies: "defaults" always, "records" where
    tuning records are found for some of the model's kernels (its own, or other models').
    ``kernels`` (``fused_model``) are looked up in the records before a build with them:
    other models' records often hold none of a model's kernels."""
    from pipeline.compiler.schedules import apply as schedule_apply
    from pipeline.engine import run_pipeline
    from pipeline.stages import STAGES
    from pipeline.stages.compile import tuning_database

    artifacts = {}
    results = run_pipeline(STAGES, config.replace(tuning_records=False), target, "compile")
    if "defaults" in schedules:
        artifacts["defaults"] = (results["compile"].outputs["library"], results["compile"].manifest["info"].get("tuning", {}))
    database = tuning_database(config, target) if "records" in schedules else None
    if database is not None:
        mod, tvm_target = kernels
        with tvm_target:
            found = schedule_apply.kernels_scheduled(schedule_apply.apply_tuning_records(mod, target, database)[0])
        if not found:
            print(f"  no tuning records for any kernel of {config.variant} batch {config.batch_size} in {database}: "
                  f"no 'tvm records' build", file=sys.stderr, flush=True)
            database = None
    if database is not None:
        tuned = run_pipeline(STAGES, config, target, "compile")
        tuning = tuned["compile"].manifest["info"].get("tuning", {})
        if tuning.get("tasks_from_records"):  # else the same kernels as the defaults
            artifacts["records"] = (tuned["compile"].outputs["library"], tuning)
    return results, artifacts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", "--variant", default="tiny", help="comma-separated ConvNeXt variants")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--schedules", default="defaults,records",
                        help="TVM rows: 'defaults' (no tuning records), 'records' (where a database has them)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--artifacts", type=Path, default=REPO / "artifacts")
    parser.add_argument("--json", type=Path, help="also write the rows here (and the table beside it, .txt); a file "
                        "of other settings is kept, and this run written to <its folder>/<what differs>/")
    parser.add_argument("--replace-report", action="store_true",
                        help="replace the --json file even where it measured other settings")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def settings(args: argparse.Namespace) -> dict:
    """What a run measures: the record of one is replaced only by a run of the same
    (reports/committed.py)."""
    from reports.committed import listed

    return {
        "variants": listed(args.variants), "input-size": args.input_size, "classes": args.num_classes,
        "batches": listed(args.batches), "schedules": listed(args.schedules), "warmup": args.warmup,
        "repeats": args.repeats,
    }


def recorded_settings(record: dict) -> dict:
    """settings() of a written record; of a record from before it kept them, its command line's."""
    import contextlib
    import io
    import shlex

    from pipeline.errors import PipelineError

    if isinstance(record.get("settings"), dict):
        return record["settings"]
    command = record.get("provenance", {}).get("command", "")
    try:
        # argparse prints its usage before it gives up: the one line below says it instead.
        with contextlib.redirect_stderr(io.StringIO()):
            return settings(build_parser().parse_known_args(shlex.split(command)[1:])[0])
    except (SystemExit, ValueError):
        raise PipelineError(f"the record's command line '{command}' does not say what it measured; pass "
                            f"--replace-report to replace it") from None


def destination(args: argparse.Namespace) -> Path | None:
    """Where --json goes: there, or beside a record of other settings (printing so)."""
    from reports.committed import json_destination

    if args.json is None:
        return None
    return json_destination(args.json, settings(args), recorded_settings, args.replace_report,
                            lambda note: print(note, file=sys.stderr, flush=True))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Before any measuring: the line saying where the record goes is the first one printed.
    json_path = destination(args)

    from pipeline.runtime.runtime_only import configure_cpu_threads

    # Before compile's constant folding starts TVM's thread pool (see configure_cpu_threads).
    configure_cpu_threads()
    from pipeline.config import PipelineConfig
    from pipeline.engine import run_pipeline
    from pipeline.provenance import cpu_description
    from pipeline.stages import STAGES
    from pipeline.runtime.isolated import measure_isolated
    from targets import get_target

    target = get_target("x86")
    schedules = tuple(s for s in args.schedules.split(",") if s)
    sgemm = sgemm_gflops()
    rows = []
    for variant in args.variants.split(","):
        for batch_size in (int(b) for b in args.batches.split(",")):
            config = PipelineConfig(
                variant=variant, input_size=args.input_size, num_classes=args.num_classes,
                batch_size=batch_size, artifacts=args.artifacts,
            )
            shape = (batch_size, 3, args.input_size, args.input_size)
            onnx_path = run_pipeline(STAGES, config, target, "simplify")["simplify"].outputs["onnx_simplified"]
            kernels = fused_model(onnx_path, target, shape)
            results, tvm_builds = tvm_artifacts(config, target, schedules, kernels)
            flops = model_flops(*kernels)
            batch = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
            models = {"pytorch": ("pytorch", results["build"].outputs["checkpoint"], None),
                      "onnxruntime": ("onnxruntime", onnx_path, None)}
            for origin, (library, tuning) in tvm_builds.items():
                models[f"tvm {origin}"] = ("tvm", library, tuning)
            ort_median = None
            for name, (backend, model, tuning) in models.items():
                # The bench stage's own timing loop and statistics, each backend alone in a process.
                stats = measure_isolated(backend, model, batch, args.warmup, args.repeats)
                median = stats["median_ms"] / 1e3
                row = {
                    "variant": variant, "backend": name, "batch": batch_size, "threads": stats["threads"],
                    "median_ms": stats["median_ms"], "p90_ms": stats["p90_ms"],
                    "images_per_s": stats["throughput_ips"], "gflops": flops / median / 1e9,
                }
                if backend == "onnxruntime":
                    ort_median = median
                if tuning is not None:
                    row["tvm_over_ort"] = median / ort_median
                    row["tuning"] = (f"{tuning.get('tasks_from_records', 0)}/{tuning.get('tasks_total', '?')} kernels "
                                     f"from records ({tuning.get('database') or 'none'})")
                    row["tuning_cost"] = tuning.get("cost")
                rows.append(row)
                print(f"  measured {variant} {name} batch {batch_size}: {median * 1e3:.2f} ms", file=sys.stderr, flush=True)

    lines = [
        f"ConvNeXt {args.input_size}x{args.input_size} on {cpu_description()}, TVM target {target.target_json()}; "
        f"NumPy SGEMM {sgemm:.0f} GFLOP/s",
        f"{'model':<6} {'backend':<13} {'batch':>5} {'threads':>7} {'median ms':>10} {'p90 ms':>9} {'img/s':>8} "
        f"{'GFLOP/s':>8}  notes",
    ]
    for row in rows:
        notes = ""
        if "tvm_over_ort" in row:
            notes = f"TVM/ORT {row['tvm_over_ort']:.2f}x; {row['tuning']}"
        lines.append(f"{row['variant']:<6} {row['backend']:<13} {row['batch']:>5} {row['threads'] or '-':>7} "
                     f"{row['median_ms']:>10.2f} {row['p90_ms']:>9.2f} {row['images_per_s']:>8.1f} "
                     f"{row['gflops']:>8.1f}  {notes}")
    for row in rows:
        cost = row.get("tuning_cost")
        if cost:
            lines.append(
                f"tuning cost, {row['variant']} batch {row['batch']}: {cost['trials']} trials in "
                f"{cost['seconds'] / 60:.1f} min; within {100 * cost['within']:.0f}% of the final estimate "
                f"({cost['final_estimate_ms']:.2f} ms) after {cost['trials_to_within']} trials, "
                f"{cost['seconds_to_within'] / 60:.1f} min"
            )
    print("\n" + "\n".join(lines))
    if json_path:
        from pipeline.provenance import provenance, write_measurement

        record = {"models": [f"convnext-{v} {args.input_size}x{args.input_size}" for v in args.variants.split(",")],
                  "settings": settings(args), "target": target.tvm_target, "sgemm_gflops": sgemm, "rows": rows,
                  "provenance": provenance()}
        write_measurement(json_path, record, lines)
        print(f"json: {json_path}")


if __name__ == "__main__":
    from pipeline.errors import EXIT_USER_ERROR, PipelineError

    try:
        main()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted; finished stages are kept in the artifacts cache", file=sys.stderr)
        sys.exit(130)
