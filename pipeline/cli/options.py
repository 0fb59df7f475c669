"""The model options every model command takes, the config they resolve to, and the one
way to run stages from that config.

The stage commands (`compile`, `run`, ...), `package`, `quantize` and
`python -m pipeline.cli.cross verify` take these options, each the ones it uses: the
measuring options (MEASUREMENT_OPTIONS) only the commands that measure (bench, evaluate,
report, run). The Makefile keeps them apart the same way (MODEL_ARGS, MEASURE_ARGS).

Nothing here imports torch, TVM or ONNX at import time: `pipeline --help` must stay fast.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pipeline import precisions
from pipeline.config import PARAMS_MODES, PipelineConfig
from pipeline.errors import PipelineError

# Options that only matter when the artifact is measured (bench, evaluate, report, run).
MEASUREMENT_OPTIONS = ("warmup", "repeats", "eval_limit", "rpc_tracker", "rpc_key", "emulate", "reports_dir",
                       "replace_report")


def _options(
    target: Annotated[str, typer.Option(help="Target name; `pipeline targets` lists them.")] = "x86",
    variant: Annotated[str, typer.Option(help="ConvNeXt variant; `pipeline variants` lists them.")] = "micro",
    weights: Annotated[str, typer.Option(help="Checkpoint .pth (official, timm or torchvision layout), or 'none' for random init.")] = "none",
    num_classes: Annotated[int, typer.Option(help="Classifier outputs.")] = 1000,
    in_chans: Annotated[int, typer.Option(help="Input channels.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed for random init, inputs and sampling.")] = 0,
    input_size: Annotated[int, typer.Option(help="Input height and width: a multiple of 32, at least 32.")] = 224,
    batch_size: Annotated[int, typer.Option(help="Batch size compiled into the artifact.")] = 1,
    opset: Annotated[int, typer.Option(help="ONNX opset (17 or higher).")] = 17,
    dynamic_batch: Annotated[bool, typer.Option(help="Export the ONNX model with a dynamic batch dimension.")] = False,
    precision: Annotated[str, typer.Option(help=f"One of {', '.join(precisions.PLAN)} (pipeline/precisions.py); `pipeline targets` lists the ones each target offers.")] = "fp32",
    params: Annotated[str, typer.Option(help="'embedded' weights in the .so, or 'separate' .params.npz file.")] = "embedded",
    tuning_records: Annotated[bool, typer.Option(help="Compile with tuning records where there are (this model's, else other models' with the same kernels); --no-tuning-records: default schedules only.")] = True,
    gpu_split_k: Annotated[bool, typer.Option(help="GPU targets: split GEMMs of few rows and deep K into partial GEMMs where the default schedules' model says it pays; --no-gpu-split-k: never (to compare).")] = True,
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
    emulate: Annotated[bool, typer.Option(help="aarch64 CPU targets (arm-*, jetson-*-cpu): evaluate the board's binary under qemu-aarch64 here; accuracy only, the latency needs the board (RPC).")] = False,
    artifacts: Annotated[Path, typer.Option(help="Artifacts directory (content-keyed cache).")] = Path("artifacts"),
    reports_dir: Annotated[Path, typer.Option(help="Where `report` writes <target>/report.md.")] = Path("reports"),
    replace_report: Annotated[bool, typer.Option(help="Replace the report in --reports-dir even where it measured other settings (model, data, images, repeats, calibration); without it such a run is written beside it, in <target>/<what differs>/.")] = False,
    force: Annotated[bool, typer.Option(help="Re-run this stage even if a cached result exists.")] = False,
) -> None:
    """Signature holder: the options, their types, defaults and help."""


def model_parameters(names: tuple[str, ...] | None = None, exclude: tuple[str, ...] = (),
                     defaults: dict[str, Any] | None = None) -> list[inspect.Parameter]:
    """The options (all, or `names` in this order, less `exclude`) as parameters for a
    command's signature, with the command's own `defaults` where it has them."""
    parameters = inspect.signature(_options, eval_str=True).parameters
    defaults = defaults or {}
    return [parameters[name].replace(default=defaults.get(name, parameters[name].default))
            for name in (names or parameters) if name not in exclude]


def option_help(name: str) -> tuple[Any, Any, str]:
    """(type, default, help) of one option, for command lines that are not typer's (argparse)."""
    parameter = inspect.signature(_options, eval_str=True).parameters[name]
    base, info = typing.get_args(parameter.annotation)
    optional = [arg for arg in typing.get_args(base) if arg is not type(None)]
    return (optional[0] if optional else base), parameter.default, info.help


def parse_weights(text: str | Path) -> Path | None:
    """--weights: a checkpoint path, or None for 'none' (random init)."""
    return None if str(text).lower() == "none" else Path(text)


def config_from_options(options: dict[str, Any]) -> PipelineConfig:
    """The PipelineConfig of a command's options (the names of `_options`; others are ignored)."""
    direct = ("variant", "num_classes", "in_chans", "seed", "input_size", "batch_size", "opset", "dynamic_batch",
              "precision", "tuning_records", "gpu_split_k", "warmup", "repeats", "data", "preprocessing", "calib_data", "calib_size",
              "calib_method", "rpc_tracker", "rpc_key", "emulate", "artifacts", "reports_dir", "replace_report")
    values = {name: options[name] for name in direct if name in options}
    # The three whose command-line form differs from the config's.
    if "weights" in options:
        values["weights"] = parse_weights(options["weights"])
    if "params" in options:
        values["params_mode"] = options["params"]
    if "eval_limit" in options:
        values["eval_limit"] = options["eval_limit"] or None
    return PipelineConfig(**values)


def _check_image_source(option: str, source: str | None) -> None:
    """A --data/--calib-data that cannot be read fails now, not after compiling."""
    if source is None:
        return
    from calibration.datasets import check_source

    try:
        check_source(source)
    except PipelineError as exc:
        raise PipelineError(f"{option}: {exc}") from None


def _check_memory(config: PipelineConfig) -> None:
    """An input size whose build cannot fit in this machine's memory fails now, not by the OOM killer."""
    from pipeline.memory import available_memory_bytes, build_memory_bytes, gigabytes, largest_input_size
    from pipeline.model import VARIANTS

    available = available_memory_bytes()
    if available is None:
        return
    spec = VARIANTS[config.variant]
    needed = build_memory_bytes(spec, config.in_chans, config.num_classes, config.input_size, config.batch_size)
    if needed <= available:
        return
    largest = largest_input_size(spec, config.in_chans, config.num_classes, config.batch_size, available)
    fix = (f"use --input-size {largest} or less" if largest
           else "no input size fits: use a smaller --variant, --num-classes or --batch-size")
    raise PipelineError(
        f"--input-size {config.input_size} at --batch-size {config.batch_size} needs about {gigabytes(needed)} of "
        f"memory to build {config.variant}, more than the {gigabytes(available)} available here; {fix}"
    )


def validate_config(config: PipelineConfig, onnx: Optional[Path]) -> None:
    """Checks that are cheap and should fail before any work starts (and before the settings are printed)."""
    from pipeline.model import VARIANTS

    if config.variant not in VARIANTS:
        raise PipelineError(f"unknown variant '{config.variant}'; known variants: {', '.join(VARIANTS)}")
    if config.weights is not None and not config.weights.is_file():
        raise PipelineError(f"weights file '{config.weights}' does not exist; pass a .pth checkpoint or --weights none")
    if onnx is not None and not onnx.is_file():
        raise PipelineError(f"ONNX file '{onnx}' does not exist; pass an existing file to --onnx")
    precisions.get(config.precision)  # refuses an unknown name in one line that lists the known ones
    if config.params_mode not in PARAMS_MODES:
        raise PipelineError(f"unknown --params '{config.params_mode}'; use one of: {', '.join(PARAMS_MODES)}")
    if config.input_size < 32 or config.input_size % 32:
        raise PipelineError(
            f"--input-size {config.input_size} is not valid: it must be a multiple of 32, at least 32 "
            f"(ConvNeXt downsamples 32x), e.g. 224"
        )
    for name in ("batch_size", "repeats", "num_classes", "in_chans"):
        if getattr(config, name) < 1:
            raise PipelineError(f"--{name.replace('_', '-')} must be at least 1")
    _check_memory(config)
    _check_image_source("--data", config.data)
    _check_image_source("--calib-data", config.calib_data)
    if onnx is not None:
        from pipeline.stages.simplify import check_user_onnx

        check_user_onnx(onnx, (config.batch_size, config.in_chans, config.input_size, config.input_size))


MEASURING_STAGES = ("bench", "evaluate", "report")


def _check_emulation(until: str, config: PipelineConfig, target) -> None:
    """--emulate: an aarch64 CPU target, evaluated (not timed) here, not on a board."""
    from pipeline.runtime.cross import emulated_targets

    choices = emulated_targets()
    if target.name not in choices:
        raise PipelineError(
            f"--emulate runs aarch64 CPU artifacts under qemu; '{target.name}' is not one "
            f"(use one of: {', '.join(choices)}), or drop --emulate"
        )
    if config.rpc_tracker:
        raise PipelineError("--emulate and --rpc-tracker both say where to run; pass one of them")
    if until == "bench":
        raise PipelineError(
            "--emulate measures accuracy only (qemu's timings are not the board's); time it on the board: "
            f"pipeline bench --target {target.name} --rpc-tracker HOST:PORT"
        )


def run_stages(until: str, config: PipelineConfig, target, onnx: Optional[Path] = None,
               force: bool = False) -> dict:
    """Validate the settings, then run every stage `until` needs (cached); every command goes through here."""
    from pipeline.engine import log, run_pipeline
    from pipeline.stages import STAGES

    validate_config(config, onnx)
    target.check_available()
    names = [stage.name for stage in STAGES]
    if names.index(until) >= names.index("compile"):
        # Before export and quantize run: the compile stage would refuse the precision anyway.
        target.check_precision(config.precision)
    if config.emulate:
        _check_emulation(until, config, target)
    elif until in MEASURING_STAGES and target.runner == "rpc" and not config.rpc_tracker:
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
