"""`pipeline` command line. Every stage is a subcommand that runs the stages it
depends on first (cached, so only what changed does work)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.config import PARAMS_MODES, PRECISIONS, PipelineConfig
from pipeline.engine import StageResult
from pipeline.errors import EXIT_USER_ERROR, PipelineError
from targets import Target
from pipeline.compile_matrix import register as register_compile_matrix
from pipeline.package_command import register as register_package
from pipeline.quantize_command import register as register_quantize
from pipeline.report_command import register as register_reports
from pipeline.train_command import register as register_train
from pipeline.tune_command import register as register_tune

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="ConvNeXt from PyTorch to verified, measured TVM artifacts.",
)

STAGE_HELP = {
    "build": "Build the model and load weights into a checkpoint.",
    "export": "Export the checkpoint to ONNX and check it against PyTorch.",
    "simplify": "Simplify the ONNX model with onnxsim and check outputs are unchanged.",
    "compile": "Compile the simplified ONNX model with TVM for a target.",
    "bench": "Measure latency of the artifact beside PyTorch and ONNX Runtime.",
    "evaluate": "Measure the artifact's accuracy against the PyTorch reference.",
    "report": "Write reports/<target>/ (latency.json, accuracy.json, report.md).",
    "run": "Run the whole pipeline: build, export, simplify, compile, bench, evaluate, report.",
}


MEASURING_STAGES = ("bench", "evaluate", "report")


def validate_config(config: PipelineConfig, onnx: Optional[Path]) -> None:
    """Checks that are cheap and should fail before any work starts."""
    from pipeline.model import VARIANTS

    if config.variant not in VARIANTS:
        raise PipelineError(f"unknown variant '{config.variant}'; known variants: {', '.join(VARIANTS)}")
    if config.weights is not None and not config.weights.is_file():
        raise PipelineError(f"weights file '{config.weights}' does not exist; pass a .pth checkpoint or --weights none")
    if onnx is not None and not onnx.is_file():
        raise PipelineError(f"ONNX file '{onnx}' does not exist; pass an existing file to --onnx")
    if config.precision not in PRECISIONS:
        raise PipelineError(f"unknown precision '{config.precision}'; use one of: {', '.join(PRECISIONS)}")
    if config.params_mode not in PARAMS_MODES:
        raise PipelineError(f"unknown --params '{config.params_mode}'; use one of: {', '.join(PARAMS_MODES)}")
    for name in ("input_size", "batch_size", "repeats", "num_classes", "in_chans"):
        if getattr(config, name) < 1:
            raise PipelineError(f"--{name.replace('_', '-')} must be at least 1")
    if config.input_size % 32:
        raise PipelineError(f"--input-size {config.input_size} is not a multiple of 32 (ConvNeXt downsamples 32x)")


def run_stages(until: str, config: PipelineConfig, target: Target, onnx: Optional[Path] = None,
               force: bool = False) -> dict[str, StageResult]:
    """Validate the settings, then run every stage `until` needs (cached); every command goes through here."""
    from pipeline.engine import log, run_pipeline
    from pipeline.stages import STAGES

    validate_config(config, onnx)
    target.check_available()
    if until in MEASURING_STAGES and target.runner == "rpc" and not config.rpc_tracker:
        # Fail before compiling: the artifact could not be measured anyway.
        raise PipelineError(
            f"target '{target.name}' is measured on its board; pass --rpc-tracker HOST:PORT "
            f"[--rpc-key KEY] (the board runs: python -m tvm.exec.rpc_server --tracker HOST:PORT --key {target.rpc_key})"
        )
    provided: dict[str, Path] = {}
    if config.weights is not None:
        provided["weights"] = config.weights
    if onnx is not None:
        # A user ONNX replaces the export and simplify stages; `simplify` itself simplifies it.
        provided["onnx" if until == "simplify" else "onnx_simplified"] = onnx
    log(f"pipeline {until} for target {target.name}: {target.target_json()}")
    log(config.describe())
    # A user's ONNX file has no PyTorch model behind it: baselines and references use ONNX Runtime.
    unavailable = frozenset({"checkpoint"}) if onnx is not None else frozenset()
    return run_pipeline(
        STAGES, config, target, until, provided, force=(until,) if force else (), unavailable=unavailable
    )


def _run_until(until: str, config: PipelineConfig, target_name: str, onnx: Optional[Path], force: bool) -> None:
    from targets import get_target

    results = run_stages(until, config, get_target(target_name), onnx, force)
    for name, path in results[until].outputs.items():
        print(f"{name}: {path}")


def _make_stage_command(until: str):
    def command(
        target: Annotated[str, typer.Option(help="Target name; `pipeline targets` lists them.")] = "x86",
        variant: Annotated[str, typer.Option(help="ConvNeXt variant; `pipeline variants` lists them.")] = "micro",
        weights: Annotated[str, typer.Option(help="Checkpoint .pth (official, timm or torchvision layout), or 'none' for random init.")] = "none",
        num_classes: Annotated[int, typer.Option(help="Classifier outputs.")] = 1000,
        in_chans: Annotated[int, typer.Option(help="Input channels.")] = 3,
        seed: Annotated[int, typer.Option(help="Seed for random init, inputs and sampling.")] = 0,
        input_size: Annotated[int, typer.Option(help="Input height and width.")] = 224,
        batch_size: Annotated[int, typer.Option(help="Batch size compiled into the artifact.")] = 1,
        opset: Annotated[int, typer.Option(help="ONNX opset (17 or higher).")] = 17,
        dynamic_batch: Annotated[bool, typer.Option(help="Export the ONNX model with a dynamic batch dimension.")] = False,
        precision: Annotated[str, typer.Option(help="fp32, fp16 or int8.")] = "fp32",
        params: Annotated[str, typer.Option(help="'embedded' weights in the .so, or 'separate' .params.npz file.")] = "embedded",
        warmup: Annotated[int, typer.Option(help="Untimed runs before measuring.")] = 5,
        repeats: Annotated[int, typer.Option(help="Timed runs.")] = 50,
        data: Annotated[Optional[str], typer.Option(help="Evaluation images: ImageFolder, flat folder, .npy/.npz, list file or 'fashion-mnist' or 'sample-photos'. Default: random inputs.")] = None,
        preprocessing: Annotated[str, typer.Option(help="Preprocessing table entry (imagenet, fashion-mnist).")] = "imagenet",
        eval_limit: Annotated[int, typer.Option(help="Evaluate at most this many images (0: all).")] = 256,
        calib_data: Annotated[Optional[str], typer.Option(help="INT8 calibration images (default: --data; Fashion-MNIST calibrates on its train split).")] = None,
        calib_size: Annotated[int, typer.Option(help="INT8 calibration images to use.")] = 256,
        calib_method: Annotated[str, typer.Option(help="INT8 calibration: minmax, percentile, entropy or mse.")] = "minmax",
        onnx: Annotated[Optional[Path], typer.Option(help="Use this ONNX file instead of exporting one.")] = None,
        rpc_tracker: Annotated[Optional[str], typer.Option(help="Measure on a board registered with this TVM RPC tracker (HOST:PORT).")] = None,
        rpc_key: Annotated[Optional[str], typer.Option(help="The board's key at the tracker (default: the target's).")] = None,
        artifacts: Annotated[Path, typer.Option(help="Artifacts directory (content-keyed cache).")] = Path("artifacts"),
        reports_dir: Annotated[Path, typer.Option(help="Where `report` writes <target>/report.md.")] = Path("reports"),
        force: Annotated[bool, typer.Option(help="Re-run this stage even if a cached result exists.")] = False,
    ) -> None:
        config = PipelineConfig(
            variant=variant,
            weights=None if weights.lower() == "none" else Path(weights),
            num_classes=num_classes, in_chans=in_chans, seed=seed,
            input_size=input_size, batch_size=batch_size, opset=opset, dynamic_batch=dynamic_batch,
            precision=precision, params_mode=params, warmup=warmup, repeats=repeats,
            data=data, preprocessing=preprocessing, eval_limit=eval_limit or None,
            artifacts=artifacts, reports_dir=reports_dir, rpc_tracker=rpc_tracker, rpc_key=rpc_key,
            calib_data=calib_data, calib_size=calib_size, calib_method=calib_method,
        )
        _run_until("report" if until == "run" else until, config, target, onnx, force)

    command.__doc__ = STAGE_HELP[until]
    return command


for _stage in STAGE_HELP:
    app.command(name=_stage)(_make_stage_command(_stage))

# Commands with options of their own live in their own modules (one file per command).
register_quantize(app)
register_tune(app)
register_train(app)
register_package(app)
register_reports(app)
register_compile_matrix(app)


@app.command()
def targets() -> None:
    """List the targets and what each needs."""
    from targets import get_target, known_targets

    for name in known_targets():
        target = get_target(name)
        print(f"{name:<18} {target.description}")
        needs = f"; needs {', '.join(target.needs)}" if target.needs else ""
        print(f"{'':<18} tvm target {target.target_json()}; precisions {', '.join(target.precisions)}; "
              f"measured {target.runner}{needs}")


@app.command()
def variants() -> None:
    """List the ConvNeXt variants."""
    from pipeline.model import VARIANTS

    for name, spec in VARIANTS.items():
        note = "" if spec.paper else "  (not in the paper: for tests and small demos)"
        print(f"{name:<8} depths {spec.depths}  dims {spec.dims}{note}")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        # typer 0.29 vendors click; older releases use the click package itself.
        from typer._click.exceptions import ClickException
    except ImportError:  # pragma: no cover
        from click.exceptions import ClickException
    from pipeline.runtime_only import configure_cpu_threads

    # Before any TVM kernel runs (constant folding in compile starts the thread pool).
    configure_cpu_threads()
    try:
        app(standalone_mode=False)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except ClickException as exc:  # unknown option, bad option value, missing argument
        exc.show()
        sys.exit(EXIT_USER_ERROR)
    except (KeyboardInterrupt, typer.Abort):
        print("interrupted; finished stages are kept, the unfinished one left nothing behind", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
