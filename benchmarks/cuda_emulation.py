"""Every GPU kernel of a model as compiled for a CUDA target, run on this CPU by the CUDA
emulator (pipeline/compiler/cuda_emulator/) and compared with the same kernel unscheduled,
built by TVM for the CPU: what the GPU check will compute, known before a GPU runs it.

    make check-cuda-kernels                 # ConvNeXt-T, cuda-sm90: fp32 b1, fp16 b1, fp16 b8
    .venv/bin/python benchmarks/cuda_emulation.py --variant micro --input-size 64 --configs fp16:2

Writes reports/cuda-emulation/<target>.md and .json (a folder `pipeline reports` does not
read: these are checks, not measurements). Exit 1 when a kernel does not match.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.compiler.cuda_emulator import kernel_check  # noqa: E402
from pipeline.provenance import cpu_model, git_commit  # noqa: E402


def log(message: str) -> None:
    print(f"[cuda_emulation] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="tiny", help="ConvNeXt variant (pipeline variants)")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--target", default="cuda-sm90", help="a CUDA target (pipeline targets)")
    parser.add_argument("--configs", default="fp32:1,fp16:1,fp16:8",
                        help="comma-separated precision:batch pairs (the GPU bundle's by default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kernels' random arguments")
    parser.add_argument("--output", type=Path, default=REPO / "reports" / "cuda-emulation")
    return parser.parse_args(argv)


def _configs(text: str) -> list[tuple[str, int]]:
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        precision, _, batch = item.partition(":")
        if precision not in ("fp32", "fp16") or not batch.isdigit() or int(batch) < 1:
            raise SystemExit(f"error: --configs item '{item}' is not precision:batch with precision fp32 or fp16; "
                             f"write e.g. fp16:8")
        pairs.append((precision, int(batch)))
    return pairs


def _simplify(onnx_path: Path) -> None:
    import onnx
    import onnxsim

    simplified, ok = onnxsim.simplify(onnx.load(str(onnx_path)), check_n=0)
    if not ok:
        raise SystemExit(f"error: onnxsim could not simplify {onnx_path}")
    onnx.save(simplified, str(onnx_path))


def _gxx_version() -> str:
    done = subprocess.run(["g++", "--version"], capture_output=True, text=True)
    return done.stdout.splitlines()[0] if done.returncode == 0 else "unknown"


def _markdown(record: dict) -> str:
    lines = [
        f"# CUDA kernels of ConvNeXt-{record['variant']} for `{record['target']}`, run by the CUDA emulator",
        "",
        "Each kernel as compile schedules it, run on the CPU by `pipeline/compiler/cuda_emulator/` and "
        "compared with the same kernel unscheduled, built by TVM for the CPU, on random arguments. "
        "Not a GPU run: nvcc's code and timing are not seen here (`benchmarks/gpu_check.py` does that).",
        "",
        f"- date: {record['date']}",
        f"- commit: {record['commit']}",
        f"- host: {record['host']}; {record['gxx']}",
        f"- input: {record['input_size']}x{record['input_size']}, {record['num_classes']} classes",
        "",
    ]
    for config in record["configs"]:
        results = config["kernels"]
        matched = sum(r["status"] == "match" for r in results)
        lines += [
            f"## {config['precision']}, batch {config['batch']}: {matched} of {len(results)} kernels match "
            f"({config['seconds']:.0f} s)",
            "",
            "| kernel | rule | status | largest relative error | launch |",
            "|---|---|---|---|---|",
        ]
        for r in results:
            error = "" if r["error"] != r["error"] else f"{r['error']:.2e}"
            lines.append(f"| `{r['kernel']}` | {r['rule']} | {r['status']} | {error} | {r['detail']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configs = _configs(args.configs)
    from pipeline.model import VARIANTS, create_model
    from pipeline.stages.export import export_onnx
    from targets import get_target

    if args.variant not in VARIANTS:
        raise SystemExit(f"error: unknown variant '{args.variant}'; use one of: {', '.join(VARIANTS)}")
    target = get_target(args.target)
    if target.device != "cuda":
        raise SystemExit(f"error: target '{args.target}' is not a CUDA target; use e.g. cuda-sm90")

    record = {
        "variant": args.variant, "target": target.name, "input_size": args.input_size,
        "num_classes": args.num_classes, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": git_commit(), "host": f"{cpu_model()} ({platform.machine()})", "gxx": _gxx_version(),
        "configs": [],
    }
    failed = 0
    with tempfile.TemporaryDirectory(prefix="cuda-emulation-") as folder:
        model = create_model(args.variant, num_classes=args.num_classes).eval()
        for precision, batch in configs:
            start = time.perf_counter()
            # Exported and simplified as the pipeline does for `pipeline compile` and the GPU
            # bundle (unsimplified, some weights are reshaped on every call).
            shape = (batch, 3, args.input_size, args.input_size)
            onnx_path = Path(folder) / f"model-b{batch}.onnx"
            if not onnx_path.exists():
                export_onnx(model, onnx_path, shape, opset=17, dynamic_batch=False)
                _simplify(onnx_path)
            log(f"{precision} batch {batch}: compiling to the scheduled kernels")
            kernels = kernel_check.model_gpu_kernels(
                onnx_path, target, precision=precision, input_shape=shape)

            def progress(index: int, total: int, name: str) -> None:
                log(f"{precision} batch {batch}: kernel {index + 1}/{total} {name}")

            results = kernel_check.check_kernels(kernels, seed=args.seed, progress=progress)
            failed += sum(r.status != "match" for r in results)
            record["configs"].append({
                "precision": precision, "batch": batch, "seconds": round(time.perf_counter() - start, 1),
                "kernels": [{"kernel": r.kernel, "rule": r.rule, "status": r.status, "error": r.error,
                             "detail": r.detail} for r in results],
            })
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{target.name}.json").write_text(json.dumps(record, indent=1, allow_nan=True) + "\n")
    (args.output / f"{target.name}.md").write_text(_markdown(record))
    log(f"wrote {args.output / (target.name + '.md')}: {failed} kernel(s) do not match")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
