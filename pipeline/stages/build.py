"""build: model variant + weights -> a checkpoint in the official layout."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.engine import Stage
from targets import Target


def settings(config: PipelineConfig, target: Target) -> dict:
    # The weights file enters the key through its hash (it is an input), not its path.
    return {
        "variant": config.variant,
        "num_classes": config.num_classes,
        "in_chans": config.in_chans,
        "seed": config.seed if config.weights is None else None,
    }


def run(config: PipelineConfig, target: Target, inputs: dict[str, Path], out_dir: Path) -> dict:
    from pipeline.checkpoints import load_weights, save_checkpoint
    from pipeline.model import count_parameters, create_model

    model = create_model(
        config.variant, num_classes=config.num_classes, in_chans=config.in_chans, seed=config.seed
    )
    info: dict = {"weights": "random init (seed %d)" % config.seed}
    if "weights" in inputs:
        info = {"weights": str(inputs["weights"]), **load_weights(model, inputs["weights"], config.variant)}
    model.eval()
    save_checkpoint(
        model, out_dir / "model.pth", variant=config.variant,
        num_classes=config.num_classes, in_chans=config.in_chans,
    )
    info["parameters"] = count_parameters(model)
    return {"outputs": {"checkpoint": "model.pth"}, "info": info}


STAGE = Stage(
    name="build",
    inputs=("weights",),
    optional_inputs=("weights",),
    outputs=("checkpoint",),
    settings=settings,
    run=run,
)
