"""`pipeline compile-matrix`: compile one model for every target and precision, and write
what each build gave to <output>/matrix.json and <output>/README.md.

The nightly check of issue #4 ("every target compiles ConvNeXt-Tiny FP32 and INT8"):
too slow for CI on two cores, so `make compile-matrix` runs it. Every cell goes through
the ordinary stages (cached like any other run). A cell that fails is recorded and the
matrix goes on; the command exits 1 at the end, after writing the report, when any cell
a target offers failed. Cells a target does not offer, and targets that cannot be built
on this machine (the detected `cuda` without a GPU), are listed with the reason.

INT8 calibrates by default on Fashion-MNIST's train split, made RGB by the ImageNet
preprocessing: the built-in `sample-photos` are four photos, fewer than calibration's
minimum of eight, and what the images show changes no size or compile time.
"""

from __future__ import annotations

import inspect
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.errors import PipelineError
from pipeline.precisions import PLAN as PRECISION_PLAN

MATRIX_FILE = "matrix.json"
README = "README.md"
# Cell statuses; only "failed" makes the command exit 1.
COMPILED, FAILED, NOT_OFFERED, UNAVAILABLE = "compiled", "failed", "not offered", "unavailable"
# The matrix shows these for every target, even where a target lacks them (issue #4 asks for both).
ALWAYS_SHOWN = ("fp32", "int8")
# A failure reason is one line; TVM's can run to pages.
MAX_REASON = 300


@dataclass
class Cell:
    """One target x precision: what compiling it gave, or why it was not compiled."""

    target: str
    precision: str
    status: str
    reason: str = ""
    target_json: str = ""
    # Seconds of the compile stage itself, from its manifest (also when this run found it cached).
    compile_s: float | None = None
    # Seconds this cell took in this run: every stage it ran (export, quantize, compile) or found cached.
    cell_s: float | None = None
    cached: bool = False
    library_bytes: int | None = None
    params_bytes: int | None = None
    kernels: int | None = None
    tuning: dict[str, Any] | None = None
    tuning_summary: str = ""
    artifact: str | None = None
    # INT8 cells: which convolutions and matmuls became integer kernels (pipeline/compiler/int8.py).
    int8: dict[str, Any] | None = None

    @property
    def artifact_bytes(self) -> int:
        return (self.library_bytes or 0) + (self.params_bytes or 0)

    def summary(self) -> str:
        """The cell as one phrase, for the README table."""
        if self.status == COMPILED:
            cached = ", cached" if self.cached else ""
            return f"ok {self.artifact_bytes / 1e6:.1f} MB, {_seconds(self.compile_s, 0)} s{cached}"
        if self.status == NOT_OFFERED:
            return NOT_OFFERED  # the precisions the target offers are in matrix.json
        if self.status == UNAVAILABLE:
            # The first clause says why; the whole reason (with the fix) is in matrix.json.
            return f"{UNAVAILABLE}: {self.reason.split(';')[0]}"
        return f"{self.status}: {self.reason}" if self.reason else self.status


def _seconds(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


# ---------------------------------------------------------------- what to compile


def split_list(value: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c'], duplicates dropped, order kept."""
    return list(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))


def resolve_targets(value: str) -> list:
    """The Target records named in --targets (every known target when empty)."""
    from targets import get_target, known_targets

    names = split_list(value) or known_targets()
    # get_target raises the one-line error that names the unknown target and lists the known ones.
    return [get_target(name) for name in names]


def resolve_precisions(value: str) -> tuple[str, ...] | None:
    """The --precisions asked for, in PRECISIONS order; None for 'all' (each target's own)."""
    from pipeline.config import PRECISIONS

    asked = split_list(value)
    if asked == ["all"]:
        return None
    unknown = [p for p in asked if p not in PRECISIONS]
    if unknown or not asked:
        raise PipelineError(
            f"--precisions '{value}' names {', '.join(unknown) or 'nothing'}, which is not a precision; "
            f"pass 'all' or a comma-separated list of: {', '.join(PRECISIONS)}"
        )
    return tuple(p for p in PRECISIONS if p in asked)


def precisions_for(target, asked: tuple[str, ...] | None) -> tuple[str, ...]:
    """The columns of one target's row: those asked, or all it offers plus fp32 and int8."""
    from pipeline.config import PRECISIONS

    wanted = set(asked) if asked is not None else {*target.precisions, *ALWAYS_SHOWN}
    return tuple(p for p in PRECISIONS if p in wanted)


def plan_cells(targets: list, asked: tuple[str, ...] | None) -> list[tuple[Any, str]]:
    """(target, precision) for every cell, in row order."""
    return [(target, precision) for target in targets for precision in precisions_for(target, asked)]


def check_calibration(config) -> None:
    """INT8 cells calibrate on --data: a source or setting that cannot work would fail each of
    them the same way after their float builds, so it is an error before any work starts."""
    from calibration import fashion_mnist, sample_photos
    from calibration.preprocess import resolve_preprocessing
    from pipeline.quantization.calibrate import MIN_CALIBRATION_IMAGES
    from pipeline.quantization.settings import QuantizeSettings

    resolve_preprocessing(config.preprocessing)
    QuantizeSettings.from_config(config)
    if config.calib_size < MIN_CALIBRATION_IMAGES:
        raise PipelineError(f"--calib-size {config.calib_size} is too small; calibrate on at least "
                            f"{MIN_CALIBRATION_IMAGES} images")
    source = config.data
    if source == sample_photos.SOURCE_NAME:
        if len(sample_photos.SAMPLE_PHOTOS) < MIN_CALIBRATION_IMAGES:
            raise PipelineError(
                f"--data {source} has {len(sample_photos.SAMPLE_PHOTOS)} photos and INT8 calibration needs at least "
                f"{MIN_CALIBRATION_IMAGES}; pass --data fashion-mnist, an image folder, a .npy/.npz or a list file"
            )
    elif source.startswith("fashion-mnist"):
        if not fashion_mnist.available():
            raise PipelineError(
                f"--data {source}: the Fashion-MNIST files are not installed; install them with "
                f"`apt-get install {fashion_mnist.APT_PACKAGE}`, or pass --data PATH to your own images"
            )
    # A path that does not exist: validate_config, which runs first, says so.


# ---------------------------------------------------------------- one cell


def one_line(exc: BaseException) -> str:
    """The first line of an error; for a TVM error that starts with its traceback, the last."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    if not isinstance(exc, PipelineError) and not line.startswith(type(exc).__name__):
        line = f"{type(exc).__name__}: {line}"
    return line if len(line) <= MAX_REASON else line[:MAX_REASON - 3] + "..."


def compile_cell(config, target, precision: str) -> Cell:
    """Run the stages up to `compile` for one target and precision; never raises for a
    failed build (KeyboardInterrupt still stops the matrix)."""
    from pipeline.cli.options import run_stages
    from pipeline.stages.report import curve_with_runs
    from reports.target_report import describe_tuning

    cell = Cell(target.name, precision, COMPILED, target_json=target.target_json())
    if precision not in target.precisions:
        note = target.precision_note(precision)
        cell.status, cell.reason = NOT_OFFERED, (
            f"{target.name} offers precisions {', '.join(target.precisions)}" + (f": {note}" if note else ""))
        return cell
    if target.unavailable is not None:
        cell.status, cell.reason = UNAVAILABLE, target.unavailable
        return cell
    started = time.perf_counter()
    try:
        results = run_stages("compile", config.replace(precision=precision), target, None, False)
    except Exception as exc:  # noqa: BLE001 -- any failure is this cell's result, not the matrix's end
        cell.status, cell.reason = FAILED, one_line(exc)
        cell.cell_s = round(time.perf_counter() - started, 1)
        return cell
    compiled = results["compile"]
    info = compiled.manifest.get("info", {})
    cell.cell_s = round(time.perf_counter() - started, 1)
    cell.compile_s = compiled.manifest.get("seconds")
    cell.cached = compiled.cached
    cell.library_bytes = info.get("library_bytes")
    cell.params_bytes = info.get("params_bytes")
    cell.kernels = info.get("num_primfuncs")
    cell.tuning = info.get("tuning")
    curve_with_runs(cell.tuning)
    cell.tuning_summary = describe_tuning(cell.tuning)
    cell.artifact = str(compiled.outputs.get("library"))
    cell.int8 = info.get("int8")
    return cell


def run_matrix(config, plan: list[tuple[Any, str]]) -> list[Cell]:
    """Every cell of the plan, in order, with progress on stderr."""
    from pipeline.engine import log

    cells = []
    for index, (target, precision) in enumerate(plan, start=1):
        log(f"[matrix] cell {index} of {len(plan)}: {target.name} {precision}")
        cell = compile_cell(config, target, precision)
        took = f" in {cell.cell_s:.1f} s" if cell.cell_s is not None else ""
        shown = cell.summary() if cell.status == COMPILED else f"{cell.status}: {cell.reason}"
        log(f"[matrix] cell {index} of {len(plan)}: {target.name} {precision}{took}: {shown}")
        cells.append(cell)
    return cells


# ---------------------------------------------------------------- the report


def model_description(config) -> dict[str, Any]:
    return {
        "variant": config.variant,
        "weights": str(config.weights) if config.weights is not None else "random init",
        "seed": config.seed if config.weights is None else None,
        "num_classes": config.num_classes,
        "in_chans": config.in_chans,
        "input_size": config.input_size,
        "batch_size": config.batch_size,
        "opset": config.opset,
        "params_mode": config.params_mode,
        "calib_data": config.data,
        "calib_size": config.calib_size,
        "calib_method": config.calib_method,
        "preprocessing": config.preprocessing,
    }


def _asked(targets: str, precisions: str) -> dict[str, str]:
    """--targets and --precisions as compared: 'all' for every one, so that a target added
    later still makes the same matrix."""
    asked = resolve_precisions(precisions)
    return {"targets": ",".join(split_list(targets)) or "all",
            "precisions": ",".join(asked) if asked is not None else "all"}


def _flat(model: dict[str, Any]) -> dict[str, Any]:
    return {key.replace("_", "-"): value for key, value in model.items()}


def matrix_settings(config, targets: str, precisions: str) -> dict[str, Any]:
    """What a matrix compiles: the model, and the targets and precisions asked for. A matrix
    replaces one of the same only (reports/committed.py)."""
    from pipeline.provenance import portable

    return _flat(portable(model_description(config))) | _asked(targets, precisions)


def _last_value(command: str, option: str) -> str | None:
    """The value of the last `option` on a recorded command line (the last one wins)."""
    import shlex

    tokens, value = shlex.split(command), None
    for index, token in enumerate(tokens):
        if token == option and index + 1 < len(tokens):
            value = tokens[index + 1]
        elif token.startswith(option + "="):
            value = token.split("=", 1)[1]
    return value


def recorded_settings(record: dict[str, Any]) -> dict[str, Any]:
    """matrix_settings() of a written matrix.json; of one from before it kept them, read from
    its model and its command line."""
    if isinstance(record.get("settings"), dict):
        return record["settings"]
    command = record.get("provenance", {}).get("command", "")
    return _flat(record.get("model", {})) | _asked(_last_value(command, "--targets") or "",
                                                   _last_value(command, "--precisions") or "all")


def matrix_record(cells: list[Cell], config, seconds: float, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything matrix.json holds: the model, what was asked, where and when, and every cell."""
    from pipeline.provenance import provenance

    offered = [cell for cell in cells if cell.status in (COMPILED, FAILED)]
    return {
        "format": 1,
        "model": model_description(config),
        "settings": settings,
        "provenance": provenance(),
        "seconds": round(seconds, 1),
        "counts": {status: sum(cell.status == status for cell in cells)
                   for status in (COMPILED, FAILED, NOT_OFFERED, UNAVAILABLE)},
        "offered": len(offered),
        "cells": [{**asdict(cell), "artifact_bytes": cell.artifact_bytes} for cell in cells],
    }


def _md(value: Any) -> str:
    return str(value).replace("\n", " ").replace("|", "\\|")


def render_readme(record: dict[str, Any]) -> str:
    """The matrix as Markdown: one row per target, one column per precision, then the details."""
    from pipeline.config import PRECISIONS

    cells = [Cell(**{k: v for k, v in cell.items() if k != "artifact_bytes"}) for cell in record["cells"]]
    model, origin, counts = record["model"], record["provenance"], record["counts"]
    targets = list(dict.fromkeys(cell.target for cell in cells))
    columns = [p for p in PRECISIONS if any(cell.precision == p for cell in cells)]
    by_key = {(cell.target, cell.precision): cell for cell in cells}
    host = origin.get("host", {})
    lines = [
        "# Compile matrix",
        "",
        "Generated by `pipeline compile-matrix` (`make compile-matrix`, the nightly check); do not edit by hand. "
        f"Every cell compiles the same model for one target and precision; `{MATRIX_FILE}` has every number.",
        "",
        f"Model: ConvNeXt-{model['variant']}, {model['num_classes']} classes, input "
        f"{model['batch_size']}x{model['in_chans']}x{model['input_size']}x{model['input_size']}, "
        f"weights {model['weights']}, params {model['params_mode']}; INT8 calibrated on {model['calib_data']} "
        f"({model['calib_method']}, up to {model['calib_size']} images, {model['preprocessing']} preprocessing).",
        "",
        f"Built on {origin.get('device', 'n/a')} ({host.get('machine', '?')}), "
        f"{origin.get('date', 'n/a')}, commit {origin.get('commit', 'n/a')}, TVM "
        f"{origin.get('tools', {}).get('apache-tvm', 'n/a')}; {record['seconds']:.0f} s in all. "
        f"{counts[COMPILED]} compiled, {counts[FAILED]} failed of {record['offered']} offered cells; "
        f"{counts[NOT_OFFERED]} not offered, {counts[UNAVAILABLE]} unavailable here.",
        "",
        "Sizes are the library plus any separate params file (MB = 10^6 bytes); times are the compile "
        "stage's own seconds (\"cached\": compiled by an earlier run with identical inputs).",
        "",
        "| target | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for target in targets:
        row = [by_key[(target, p)].summary() if (target, p) in by_key else "" for p in columns]
        lines.append(f"| {target} | " + " | ".join(_md(value) for value in row) + " |")
    built = [cell for cell in cells if cell.status == COMPILED]
    if built:
        lines += [
            "",
            "## Compiled cells",
            "",
            "| target | precision | compile s | library MB | params MB | kernels | tuning | artifact |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {cell.target} | {cell.precision} | {_seconds(cell.compile_s, 1)} | {(cell.library_bytes or 0) / 1e6:.2f} | "
            f"{(cell.params_bytes or 0) / 1e6:.2f} | {cell.kernels if cell.kernels is not None else 'n/a'} | "
            f"{_md(cell.tuning_summary)} | `{_md(cell.artifact)}` |"
            for cell in built
        ]
    failed = [cell for cell in cells if cell.status in (FAILED, UNAVAILABLE)]
    if failed:
        lines += ["", "## Failed and unavailable cells", ""]
        lines += [f"- **{cell.target} {cell.precision}** ({cell.status}): {_md(cell.reason)}" for cell in failed]
    lines += ["", "## TVM targets", ""]
    json_by_target = {cell.target: cell.target_json for cell in cells}
    lines += [f"- `{target}`: `{json_by_target[target]}`" for target in targets]
    return "\n".join(lines) + "\n"


def write_report(output: Path, record: dict[str, Any]) -> tuple[Path, Path]:
    """matrix.json and README.md, each replaced whole (an interrupted write leaves the old one)."""
    from pipeline import artifacts
    from pipeline.provenance import portable

    # Committed, and read on other machines: no paths of this one.
    record = portable(record)
    matrix, readme = Path(output) / MATRIX_FILE, Path(output) / README
    artifacts.atomic_write_json(matrix, record)
    artifacts.atomic_write_text(readme, render_readme(record))
    return matrix, readme


# ---------------------------------------------------------------- the command


# The shared model options the matrix takes, and its defaults: ConvNeXt-T, calibrated on
# Fashion-MNIST (the four sample photos are too few for INT8).
MODEL_OPTIONS = (
    "variant", "input_size", "data", "preprocessing", "calib_size", "calib_method", "weights", "num_classes",
    "in_chans", "seed", "batch_size", "opset", "params", "artifacts",
)
MODEL_DEFAULTS = {"variant": "tiny", "data": "fashion-mnist"}


def _matrix_options(
    targets: Annotated[str, typer.Option(help="Comma-separated target names (default: every target `pipeline targets` lists).")] = "",
    precisions: Annotated[str, typer.Option(help="Comma-separated precisions, or 'all': every precision each target offers, plus fp32 and int8 (shown as 'not offered' where missing).")] = "all",
    output: Annotated[Path, typer.Option(help="Folder for matrix.json and README.md; a matrix of other settings there is kept, and this one written to OUTPUT/<what differs>/.")] = Path("reports/compile-matrix"),
    replace_report: Annotated[bool, typer.Option(help="Replace the matrix in --output even where it compiled other settings (model, targets, precisions).")] = False,
) -> None:
    """Signature holder: the matrix's own options, appended to the model options."""


def compile_matrix(**options) -> None:
    """Compile the model for every target and precision; write OUTPUT/matrix.json and README.md. Exits 1 if an offered cell failed."""
    from pipeline.cli.options import config_from_options, validate_config
    from pipeline.engine import log
    from reports.committed import place, read_record

    config = config_from_options(options)
    targets, precisions, output = options["targets"], options["precisions"], Path(options["output"])
    # Every bad argument is reported before the first (long) build starts.
    validate_config(config, None)
    plan = plan_cells(resolve_targets(targets), resolve_precisions(precisions))
    # Cells of a quantized precision (int8) calibrate (pipeline/precisions.py).
    if any(PRECISION_PLAN[precision].quantized and precision in target.precisions for target, precision in plan):
        check_calibration(config)
    settings = matrix_settings(config, targets, precisions)
    committed = None if options["replace_report"] else read_record(output / MATRIX_FILE)
    output, note = place(output, None if committed is None else recorded_settings(committed), settings)
    if note:
        log(f"[matrix] {note}")

    started = time.perf_counter()
    cells = run_matrix(config, plan)
    record = matrix_record(cells, config, time.perf_counter() - started, settings)
    matrix, readme = write_report(output, record)
    print(f"matrix: {matrix}")
    print(f"readme: {readme}")
    failed = [cell for cell in cells if cell.status == FAILED]
    log(f"[matrix] {record['counts'][COMPILED]} compiled, {len(failed)} failed of {record['offered']} offered "
        f"cells in {record['seconds']:.0f} s")
    if failed:
        for cell in failed:
            log(f"[matrix] failed: {cell.target} {cell.precision}: {cell.reason}")
        sys.exit(1)


def register(app: typer.Typer) -> None:
    """Add the `compile-matrix` command to the `pipeline` CLI."""
    from pipeline.cli.options import model_parameters

    own = list(inspect.signature(_matrix_options, eval_str=True).parameters.values())
    compile_matrix.__signature__ = inspect.Signature(model_parameters(MODEL_OPTIONS, defaults=MODEL_DEFAULTS) + own)
    app.command(name="compile-matrix")(compile_matrix)
