"""`pipeline package --target T`: compile (cached) and write a device bundle .tar.gz.

It takes the model options of the stage commands (`pipeline.cli.options`), so the
Makefile's MODEL_ARGS work with `make package` as with `make compile`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.errors import PipelineError
from pipeline.cli.options import MEASUREMENT_OPTIONS, config_from_options, model_parameters


def _package_options(
    library: Annotated[Optional[Path], typer.Option(help="Bundle this compiled model.so instead of compiling.")] = None,
    output: Annotated[Optional[Path], typer.Option(help="The bundle to write. Default: dist/convnext-VARIANT-SIZE-TARGET.tar.gz")] = None,
) -> None:
    """Signature holder: its parameters follow the model options."""


def package(**options) -> None:
    """Write a .tar.gz with the compiled model, its metadata, a README, a manifest and run.py (needs only the TVM runtime and NumPy)."""
    from pipeline.engine import log
    from pipeline.runtime.package import bundle_model, write_bundle
    from targets import get_target

    config = config_from_options(options)
    target = get_target(options["target"])
    target.check_available()
    library = options["library"]
    model = bundle_model(config, library_given=library is not None)
    if library is None:
        library = _compile(config, target, options["onnx"], options["force"])
    output = options["output"] or Path("dist") / f"convnext-{config.variant}-{config.input_size}-{target.name}.tar.gz"
    manifest = write_bundle(library, target, output, model)
    log(f"[package] {output}: {', '.join(manifest['files'])}; on the device: {manifest['run']}")
    print(f"bundle: {output}")


def _compile(config, target, onnx: Optional[Path], force: bool) -> Path:
    """Run the pipeline up to `compile` (cached) and return the library path."""
    from pipeline.cli.options import run_stages

    results = run_stages("compile", config, target, onnx, force)
    compiled = results["compile"].outputs.get("library")
    if compiled is None:
        raise PipelineError("the compile stage produced no library")
    return compiled


def register(app: typer.Typer) -> None:
    """Add the `package` command to the `pipeline` CLI."""
    extra = list(inspect.signature(_package_options, eval_str=True).parameters.values())
    package.__signature__ = inspect.Signature(
        model_parameters(exclude=MEASUREMENT_OPTIONS) + extra
    )
    app.command(name="package")(package)
