"""`pipeline package --target T`: compile (cached) and write a device bundle .tar.gz."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.errors import PipelineError


def package(
    target: Annotated[str, typer.Option(help="Target name; `pipeline targets` lists them.")] = "x86",
    variant: Annotated[str, typer.Option(help="ConvNeXt variant; `pipeline variants` lists them.")] = "micro",
    weights: Annotated[str, typer.Option(help="Checkpoint .pth, or 'none' for random init.")] = "none",
    num_classes: Annotated[int, typer.Option(help="Classifier outputs.")] = 1000,
    in_chans: Annotated[int, typer.Option(help="Input channels.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed for random init.")] = 0,
    input_size: Annotated[int, typer.Option(help="Input height and width.")] = 224,
    batch_size: Annotated[int, typer.Option(help="Batch size compiled into the artifact.")] = 1,
    opset: Annotated[int, typer.Option(help="ONNX opset (17 or higher).")] = 17,
    precision: Annotated[str, typer.Option(help="fp32, fp16 or int8.")] = "fp32",
    params: Annotated[str, typer.Option(help="'embedded' weights in the .so, or 'separate' .params.npz file.")] = "embedded",
    onnx: Annotated[Optional[Path], typer.Option(help="Use this ONNX file instead of exporting one.")] = None,
    library: Annotated[Optional[Path], typer.Option(help="Bundle this compiled model.so instead of compiling.")] = None,
    artifacts: Annotated[Path, typer.Option(help="Artifacts directory (content-keyed cache).")] = Path("artifacts"),
    output: Annotated[Optional[Path], typer.Option(help="The bundle to write. Default: dist/convnext-VARIANT-SIZE-TARGET.tar.gz")] = None,
) -> None:
    """Write a .tar.gz with the compiled model, its metadata, a manifest and run.py (needs only the TVM runtime and NumPy)."""
    from pipeline.engine import log
    from pipeline.package import write_bundle
    from targets import get_target

    resolved = get_target(target)
    resolved.check_available()
    model = {"variant": variant, "input_size": input_size, "batch_size": batch_size,
             "num_classes": num_classes, "precision": precision, "params_mode": params}
    if library is None:
        library = _compile(resolved, model, weights, in_chans, seed, opset, onnx, artifacts)
    else:
        model = {"library": str(library)}
    output = output or Path("dist") / f"convnext-{variant}-{input_size}-{resolved.name}.tar.gz"
    manifest = write_bundle(library, resolved, output, model)
    log(f"[package] {output}: {', '.join(manifest['files'])}; on the device: {manifest['run']}")
    print(f"bundle: {output}")


def _compile(target, model: dict, weights: str, in_chans: int, seed: int, opset: int,
             onnx: Optional[Path], artifacts: Path) -> Path:
    """Run the pipeline up to `compile` (cached) and return the library path."""
    from pipeline.cli import run_stages
    from pipeline.config import PipelineConfig

    config = PipelineConfig(
        variant=model["variant"], weights=None if weights.lower() == "none" else Path(weights),
        num_classes=model["num_classes"], in_chans=in_chans, seed=seed, input_size=model["input_size"],
        batch_size=model["batch_size"], opset=opset, precision=model["precision"],
        params_mode=model["params_mode"], artifacts=artifacts,
    )
    results = run_stages("compile", config, target, onnx)
    compiled = results["compile"].outputs.get("library")
    if compiled is None:
        raise PipelineError("the compile stage produced no library")
    return compiled


def register(app: typer.Typer) -> None:
    """Add the `package` command to the `pipeline` CLI."""
    app.command(name="package")(package)
