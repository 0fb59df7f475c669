"""`pipeline` command line. Every stage is a subcommand that runs the stages it
depends on first (cached, so only what changed does work)."""

from __future__ import annotations

import inspect
import sys
from importlib import metadata
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.errors import EXIT_USER_ERROR, PipelineError
from pipeline.cli.options import MEASUREMENT_OPTIONS, config_from_options, model_parameters, run_stages
from pipeline.cli.compile_matrix import register as register_compile_matrix
from pipeline.cli.package import register as register_package
from pipeline.cli.quantize import register as register_quantize
from pipeline.cli.reports import register as register_reports
from pipeline.cli.train import register as register_train
from pipeline.cli.tune import register as register_tune

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


def _run_until(until: str, config, target_name: str, onnx: Optional[Path], force: bool) -> None:
    from targets import get_target

    results = run_stages(until, config, get_target(target_name), onnx, force)
    for name, path in results[until].outputs.items():
        print(f"{name}: {path}")
    if "evaluate" in results:
        import json

        from pipeline.stages.evaluate import data_warnings, summary_lines

        # From the record, so that a cached evaluation says the same as a fresh one.
        accuracy = json.loads(results["evaluate"].outputs["accuracy"].read_text())
        for line in summary_lines(accuracy):
            print(line)
        for warning in data_warnings(accuracy):
            print(f"warning: {warning}", file=sys.stderr)


def _make_stage_command(until: str):
    def command(**options) -> None:
        config = config_from_options(options)
        _run_until("report" if until == "run" else until, config, options["target"], options["onnx"], options["force"])

    # The stages before bench measure nothing, so they take no measuring options.
    measures = until in ("bench", "evaluate", "report", "run")
    command.__signature__ = inspect.Signature(model_parameters(exclude=() if measures else MEASUREMENT_OPTIONS))
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
    """List the targets and what each needs, then the aliases a target may be named by."""
    from pipeline.config import PRECISIONS
    from targets import ALIASES, get_target, known_targets

    for name in known_targets():
        target = get_target(name)
        print(f"{name:<18} {target.description}")
        needs = f"; needs {', '.join(target.needs)}" if target.needs else ""
        print(f"{'':<18} tvm target {target.target_json()}; precisions {', '.join(target.precisions)}; "
              f"measured {target.runner}{needs}")
        # Why it lacks a precision, where the precision plan gives a reason (int8 on GPU targets).
        for precision in PRECISIONS:
            note = target.precision_note(precision)
            if note:
                print(f"{'':<18} {note}")
    print("aliases:")
    for alias, (name, means) in ALIASES.items():
        print(f"{alias:<18} = {name}: {means}")


@app.command()
def variants() -> None:
    """List the ConvNeXt variants."""
    from pipeline.model import VARIANTS

    for name, spec in VARIANTS.items():
        note = "" if spec.paper else "  (not in the paper: for tests and small demos)"
        print(f"{name:<8} depths {spec.depths}  dims {spec.dims}{note}")


def _print_version(value: bool) -> None:
    if value:
        print(f"pipeline (convnext-edge) {metadata.version('convnext-edge')}")
        raise typer.Exit()


@app.callback()
def _before_any_command(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """ConvNeXt from PyTorch to verified, measured TVM artifacts."""


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        # typer 0.29 vendors click; older releases use the click package itself.
        from typer._click.exceptions import ClickException
    except ImportError:  # pragma: no cover
        from click.exceptions import ClickException
    if len(sys.argv) > 1 and not {"--help", "--version"} & set(sys.argv[1:]):
        # Before any TVM kernel runs (constant folding in compile starts the thread pool).
        # Not for help and version: runtime_only imports TVM, which takes seconds.
        from pipeline.runtime.runtime_only import configure_cpu_threads

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
