"""`python -m pipeline.cli.cross`: the aarch64 runtime cache, running an artifact under qemu,
and `verify`: the configured model compiled for an aarch64 CPU target and for x86, the first
run under qemu (pipeline/runtime/cross.py) and compared with the second (make verify-arm).

    python -m pipeline.cli.cross runtime                       # build the cache, print its path
    python -m pipeline.cli.cross run model.so --input x.npy --output y.npy [--reference r.npy]
    python -m pipeline.cli.cross verify --target arm-a72 [model options of `pipeline compile`]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.runtime.cross import aarch64_runtime, check_qemu_target, run_under_qemu
from pipeline.verify.qemu import check_close, verify_under_qemu


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
    from pipeline.cli.options import run_stages
    from pipeline.runtime.runtime_only import LoadedArtifact
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


# The model options of `pipeline compile` (pipeline.cli.options) that verify uses.
VERIFY_OPTIONS = ("variant", "weights", "num_classes", "in_chans", "seed", "input_size", "batch_size", "opset",
                  "precision", "params", "data", "preprocessing", "calib_data", "calib_size", "calib_method",
                  "onnx", "artifacts")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    from pipeline.cli.options import option_help

    for name in VERIFY_OPTIONS:
        kind, default, help_text = option_help(name)
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=default, help=help_text)


def main(argv: list[str] | None = None) -> int:
    """Command line: build the aarch64 runtime, or run an artifact under qemu."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.cli.cross", description=__doc__.split("\n\n")[0])
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
            from pipeline.cli.options import config_from_options

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
