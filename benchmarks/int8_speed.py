"""INT8 against FP32 on this CPU: the two x86 artifacts of one model, timed and compared in one run.

    .venv/bin/python benchmarks/int8_speed.py                        # ConvNeXt-Tiny, 224, batch 1
    .venv/bin/python benchmarks/int8_speed.py --variant atto --input-size 64 --repeats 5

Issue #3's goal: the INT8 artifact is faster than the FP32 artifact on the same target in the
same run (on this CPU at least 1.3x once both are tuned), about 4x smaller, and its top-1
agrees with FP32. For each batch size this builds (or reuses from the artifacts cache) the
FP32 artifact and the INT8 one through the pipeline's own stages, as `pipeline run` does
(INT8: quantize on `--data`'s calibration images -> compile with the integer rewrites); each
uses the tuning records of its model key (artifacts/tune/x86/<key>/, else tuning/x86/<key>/<cpu>/)
and default schedules elsewhere, and the table says how many kernels had records. INT8 records
fit the calibration they were tuned with (zero points are part of the kernels): tune with the
same --data, --calib-size and --calib-method for them to apply.

TVM FP32, TVM INT8, and ONNX Runtime on the float model and on the QDQ model the INT8 artifact
was compiled from are each timed alone in a process of their own (pipeline/runtime/isolated.py says
why) on the same input. Accuracy compares the two TVM artifacts' logits on held-out images of
the same data source (never the calibration images). Without --weights the model has random
(seeded) weights, so agreement is informational: the trained demo model's INT8 accuracy is in
reports/x86-int8/.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Issue #3: INT8 at least this much faster than FP32 on this CPU, once both are tuned.
SPEEDUP_GOAL = 1.3
# ... and about this much smaller.
SIZE_GOAL = 4.0


def log(message: str) -> None:
    print(f"[int8_speed] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batches", default="1", help="comma-separated batch sizes")
    parser.add_argument("--weights", type=Path, help="a .pth checkpoint; default: random init with --seed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="fashion-mnist",
                        help="calibration and evaluation images, any source `pipeline run --data` takes; default "
                             "Fashion-MNIST made RGB (calibrated on its train split, evaluated on its test split)")
    parser.add_argument("--preprocessing", default="imagenet")
    parser.add_argument("--calib-size", type=int, default=32)
    parser.add_argument("--calib-method", default="percentile", help="minmax, percentile, entropy or mse")
    parser.add_argument("--eval-images", type=int, default=32, help="held-out images for the accuracy comparison")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--artifacts", type=Path, default=REPO / "artifacts")
    parser.add_argument("--json", type=Path, help="also write the results here, and the table beside it (.txt); a "
                        "file of other settings is kept, and this run written to <its folder>/<what differs>/")
    parser.add_argument("--replace-report", action="store_true",
                        help="replace the --json file even where it measured other settings")
    return parser.parse_args(argv)


def model_record(args: argparse.Namespace) -> dict:
    """The record's "model": what was built, quantized and compared."""
    return {
        "variant": args.variant, "input_size": args.input_size, "num_classes": args.num_classes,
        "weights": str(args.weights) if args.weights else f"random init (seed {args.seed})",
        "data": args.data, "preprocessing": args.preprocessing,
        "calib_size": args.calib_size, "calib_method": args.calib_method,
    }


def settings(args: argparse.Namespace) -> dict:
    """What a run measures: the record of one is replaced only by a run of the same
    (reports/committed.py)."""
    from pipeline.provenance import portable
    from reports.committed import listed

    model = portable(model_record(args))
    return {**{key.replace("_", "-"): value for key, value in model.items()}, "warmup": args.warmup,
            "repeats": args.repeats, "eval-images": args.eval_images, "batches": listed(args.batches)}


def recorded_settings(record: dict) -> dict:
    """settings() of a written record; of a record from before it kept them, read from its fields."""
    if isinstance(record.get("settings"), dict):
        return record["settings"]
    model = record.get("model", {})
    return {**{key.replace("_", "-"): value for key, value in model.items()}, "warmup": record.get("warmup"),
            "repeats": record.get("repeats"), "eval-images": record.get("evaluation", {}).get("count"),
            "batches": ",".join(str(result.get("batch")) for result in record.get("batches", []))}


def destination(args: argparse.Namespace) -> Path | None:
    """Where --json goes: there, or beside a record of other settings (printing so)."""
    from reports.committed import json_destination

    if args.json is None:
        return None
    return json_destination(args.json, settings(args), recorded_settings, args.replace_report,
                            log)


def image_key(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def held_out_images(config, count: int) -> tuple[np.ndarray, dict]:
    """`count` images of the run's data source that the quantize stage did not calibrate on."""
    from calibration import load_dataset
    from pipeline.errors import PipelineError
    from pipeline.quantization.calibrate import calibration_source

    calibrated_on, _ = calibration_source(config.calib_data, config.data)
    # Like the evaluate stage: 'fashion-mnist' means its test split (quantize calibrates on train).
    source = "fashion-mnist:test" if config.data == "fashion-mnist" else config.data
    load = dict(input_size=config.input_size, preprocessing=config.preprocessing, in_chans=config.in_chans,
                seed=config.seed)
    if source != calibrated_on:
        dataset = load_dataset(source, limit=count, **load)
        return dataset.images, {"source": dataset.source, "count": len(dataset), "description": dataset.description,
                                "held_out": f"a different split or source than calibration ({calibrated_on})"}
    # The same source: the same seeded sampling quantize used picks its calibration images;
    # a larger sample holds them plus others, and the others are held out.
    calibration = {image_key(image) for image in load_dataset(source, limit=config.calib_size, **load).images}
    dataset = load_dataset(source, limit=config.calib_size + count, **load)
    kept = [image for image in dataset.images if image_key(image) not in calibration][:count]
    if not kept:
        raise PipelineError(
            f"--data {config.data} has no images left after the {config.calib_size} calibration images; "
            "pass a larger source or a smaller --calib-size"
        )
    return np.stack(kept), {"source": dataset.source, "count": len(kept), "description": dataset.description,
                            "held_out": f"the calibration images ({config.calib_size}) removed"}


def artifact_record(results: dict) -> dict:
    """What compile (and for INT8, quantize) said about one artifact."""
    from reports.target_report import describe_tuning

    compiled = results["compile"]
    info = compiled.manifest.get("info", {})
    library = Path(compiled.outputs["library"])
    tuning = info.get("tuning") or {}
    record = {
        "library": str(library),
        # Weights are embedded: the .so is the whole artifact.
        "bytes": library.stat().st_size,
        "compile_s": compiled.manifest.get("seconds"),
        "cached": compiled.cached,
        "kernels": info.get("num_primfuncs"),
        "tuning": tuning,
        "kernels_from_records": tuning.get("tasks_from_records", 0),
        "kernels_default": tuning.get("tasks_default"),
        "kernels_total": tuning.get("tasks_total"),
        "tuning_database": tuning.get("database"),
        "tuning_summary": describe_tuning(tuning),
    }
    if "int8" in info:
        record["int8"] = info["int8"]
        quantized = results["quantize"].manifest.get("info", {})
        record["quantized_layers"] = quantized.get("quantized")
        record["calibration"] = quantized.get("calibration")
    return record


def logits(library: Path, images: np.ndarray, batch_size: int, label: str) -> np.ndarray:
    """The artifact's outputs for every image (the last batch padded, as the evaluate stage does)."""
    from pipeline.runtime.runners import TvmRunner
    from pipeline.stages.evaluate import run_batched

    return run_batched(TvmRunner(library), images, batch_size, label)


def measure_batch(args: argparse.Namespace, base, target, batch_size: int, images: np.ndarray) -> dict:
    """Build both artifacts for one batch size, time four backends, compare the TVM outputs."""
    from pipeline.cli.options import run_stages
    from pipeline.compare import compare_logits
    from pipeline.runtime.isolated import measure_isolated

    log(f"batch {batch_size}: FP32 artifact (build, export, simplify, compile)")
    fp32 = run_stages("compile", base.replace(batch_size=batch_size, precision="fp32"), target)
    log(f"batch {batch_size}: INT8 artifact (quantize on {args.calib_size} images, {args.calib_method}; "
        "compile with the integer rewrites)")
    int8 = run_stages("compile", base.replace(batch_size=batch_size, precision="int8"), target)
    artifacts = {"fp32": artifact_record(fp32), "int8": artifact_record(int8)}

    shape = (batch_size, base.in_chans, base.input_size, base.input_size)
    batch = np.random.default_rng(base.seed).standard_normal(shape, dtype=np.float32)
    models = [
        ("tvm", "fp32", "tvm", Path(artifacts["fp32"]["library"])),
        ("tvm", "int8", "tvm", Path(artifacts["int8"]["library"])),
        ("onnxruntime", "fp32", "onnxruntime", Path(fp32["simplify"].outputs["onnx_simplified"])),
        ("onnxruntime", "int8", "onnxruntime-int8", Path(int8["quantize"].outputs["onnx_quantized"])),
    ]
    rows = []
    for backend, precision, runner, model in models:
        log(f"batch {batch_size}: timing {backend} {precision}: {args.warmup} warm-up + {args.repeats} runs, "
            "alone in its own process")
        stats = measure_isolated(runner, model, batch, args.warmup, args.repeats)
        rows.append({
            "backend": backend, "precision": precision, "model": str(model), "model_bytes": model.stat().st_size,
            "threads": stats["threads"], "median_ms": stats["median_ms"], "p90_ms": stats["p90_ms"],
            "images_per_s": stats["throughput_ips"],
        })
        log(f"batch {batch_size}: {backend} {precision}: median {stats['median_ms']:.2f} ms")
    median = {(row["backend"], row["precision"]): row["median_ms"] for row in rows}

    log(f"batch {batch_size}: accuracy, FP32 and INT8 artifacts on {len(images)} held-out images")
    reference = logits(Path(artifacts["fp32"]["library"]), images, batch_size, "tvm fp32")
    candidate = logits(Path(artifacts["int8"]["library"]), images, batch_size, "tvm int8")
    return {
        "batch": batch_size,
        "artifacts": artifacts,
        "rows": rows,
        # FP32 median / INT8 median: above 1 means INT8 is faster.
        "int8_speedup": {name: median[(name, "fp32")] / median[(name, "int8")] for name in ("tvm", "onnxruntime")},
        "size_ratio": artifacts["fp32"]["bytes"] / artifacts["int8"]["bytes"],
        "accuracy": {"reference": "tvm fp32", "candidate": "tvm int8", **compare_logits(reference, candidate)},
    }


def ops_phrase(counts: dict) -> str:
    return ", ".join(f"{op} {n}" for op, n in counts.items()) or "none"


def table(record: dict) -> list[str]:
    """The printed result: one block per batch size."""
    model = record["model"]
    lines = [
        f"ConvNeXt-{model['variant']} {model['input_size']}x{model['input_size']}, {model['weights']}, on "
        f"{record['target_json']}",
        f"INT8: {model['calib_method']} calibration on {model['calib_size']} images of {model['data']} "
        f"({model['preprocessing']} preprocessing)",
    ]
    for result in record["batches"]:
        fp32, int8 = result["artifacts"]["fp32"], result["artifacts"]["int8"]
        lines += [
            "",
            f"{'backend':<12} {'precision':<9} {'batch':>5} {'threads':>7} {'median ms':>10} {'p90 ms':>9} "
            f"{'img/s':>8} {'size MB':>8}  model",
        ]
        for row in result["rows"]:
            what = "artifact .so" if row["backend"] == "tvm" else "ONNX" + (" QDQ" if row["precision"] == "int8" else "")
            lines.append(
                f"{row['backend']:<12} {row['precision']:<9} {result['batch']:>5} {row['threads'] or '-':>7} "
                f"{row['median_ms']:>10.2f} {row['p90_ms']:>9.2f} {row['images_per_s']:>8.1f} "
                f"{row['model_bytes'] / 1e6:>8.2f}  {what}"
            )
        speedup = result["int8_speedup"]
        both_tuned = fp32["kernels_from_records"] > 0 and int8["kernels_from_records"] > 0
        verdict = "met" if speedup["tvm"] >= SPEEDUP_GOAL else "not met"
        if not both_tuned:
            verdict += "; the goal is for tuned artifacts and " + (
                "neither is" if not (fp32["kernels_from_records"] or int8["kernels_from_records"])
                else ("FP32" if not fp32["kernels_from_records"] else "INT8") + " is not")
        accuracy = result["accuracy"]
        counts = int8["int8"]
        lines += [
            f"INT8 / FP32 speed-up (FP32 median / INT8 median): TVM {speedup['tvm']:.2f}x "
            f"(goal >= {SPEEDUP_GOAL}x: {verdict}), ONNX Runtime {speedup['onnxruntime']:.2f}x",
            f"artifact size: FP32 {fp32['bytes'] / 1e6:.2f} MB, INT8 {int8['bytes'] / 1e6:.2f} MB, "
            f"{result['size_ratio']:.2f}x smaller (goal about {SIZE_GOAL:.0f}x)",
            f"tuning: FP32 {fp32['kernels_from_records']}/{fp32['kernels_total']} kernels from records, "
            f"{fp32['kernels_default']} default ({fp32['tuning_database'] or 'no database'}); "
            f"INT8 {int8['kernels_from_records']}/{int8['kernels_total']} from records, {int8['kernels_default']} "
            f"default ({int8['tuning_database'] or 'no database'})",
            f"INT8 lowering: integer {ops_phrase(counts['integer_ops'])}; of those on AVX-512 VNNI "
            f"{ops_phrase(counts['vnni_ops'])}; conv/matmul left in float: {counts['float_compute_ops']}; "
            f"{int8['quantized_layers']} quantized",
            f"accuracy, INT8 vs FP32 artifact on {record['evaluation']['count']} held-out images "
            f"({record['evaluation']['source']}): top-1 agreement {accuracy['top1_agreement']:.4f}, "
            f"logit cosine min {accuracy['cosine_min']:.4f} mean {accuracy['cosine_mean']:.4f}, "
            f"max abs error {accuracy['max_abs_error']:.4g}",
        ]
    if model["weights"].startswith("random"):
        lines.append("(random weights: the agreement is informational; the trained demo model's INT8 accuracy "
                     "is in reports/x86-int8/)")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from pipeline.runtime.runtime_only import configure_cpu_threads

    # Before compile's constant folding starts TVM's thread pool (see configure_cpu_threads).
    configure_cpu_threads()
    from pipeline.cli.options import validate_config
    from pipeline.cli.compile_matrix import check_calibration
    from pipeline.config import PipelineConfig
    from pipeline.errors import PipelineError
    from targets import get_target

    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise PipelineError(f"--batches '{args.batches}' is not a comma-separated list of integers") from None
    if args.eval_images < 1:
        raise PipelineError("--eval-images must be at least 1")
    target = get_target("x86")
    base = PipelineConfig(
        variant=args.variant, weights=args.weights, num_classes=args.num_classes, seed=args.seed,
        input_size=args.input_size, data=args.data, preprocessing=args.preprocessing,
        calib_size=args.calib_size, calib_method=args.calib_method, artifacts=args.artifacts,
    )
    # Bad settings fail here, before minutes of building.
    for batch_size in batches:
        validate_config(base.replace(batch_size=batch_size, precision="int8"), None)
    check_calibration(base)
    target.check_available()
    json_path = destination(args)

    log(f"held-out images from {args.data} for the accuracy comparison")
    images, evaluation = held_out_images(base, args.eval_images)
    results = [measure_batch(args, base, target, batch_size, images) for batch_size in batches]

    from pipeline.provenance import provenance, write_measurement

    record = {
        "model": model_record(args),
        "settings": settings(args),
        "target": target.tvm_target,
        "target_json": target.target_json(),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "goals": {"int8_speedup_at_least": SPEEDUP_GOAL, "size_ratio_about": SIZE_GOAL},
        "evaluation": evaluation,
        "batches": results,
        "provenance": provenance(),
    }
    lines = table(record)
    print("\n" + "\n".join(lines))
    if json_path:
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
