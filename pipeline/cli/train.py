"""`pipeline train`: train or fine-tune a ConvNeXt (options mirror `pipeline.training.recipe.TrainConfig`).

Registered on the main app by `pipeline.cli` with `register(app)`.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.errors import PipelineError

def train_command(
    output: Annotated[Path, typer.Option(help="Where to write the trained checkpoint (.pth); its record goes to <output>.json.")],
    variant: Annotated[str, typer.Option(help="ConvNeXt variant; `pipeline variants` lists them.")] = "micro",
    num_classes: Annotated[int, typer.Option(help="Classifier outputs.")] = 10,
    in_chans: Annotated[int, typer.Option(help="Input channels (1: grayscale; 3 replicates the gray plane).")] = 1,
    input_size: Annotated[int, typer.Option(help="Input height and width (a multiple of 32).")] = 32,
    epochs: Annotated[int, typer.Option(help="Passes over the training images.")] = 70,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate, reached after the warm-up.")] = 4e-3,
    min_lr: Annotated[float, typer.Option(help="Learning rate at the end of the cosine schedule.")] = 1e-5,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (not applied to norms, biases, gamma).")] = 0.05,
    warmup_epochs: Annotated[float, typer.Option(help="Linear warm-up length in epochs (fractions allowed).")] = 2.0,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the cross-entropy.")] = 0.1,
    drop_path_rate: Annotated[float, typer.Option(help="Stochastic depth rate of the last block.")] = 0.0,
    crop_padding: Annotated[int, typer.Option(help="Random crop from the image padded by this many pixels (0: off).")] = 2,
    hflip: Annotated[bool, typer.Option(help="Random horizontal flips.")] = True,
    random_erasing: Annotated[float, typer.Option(help="Probability of erasing a random rectangle (0: off).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed for initialization, data order and augmentation.")] = 0,
    data: Annotated[str, typer.Option(help="Training images: 'fashion-mnist' or a labeled ImageFolder/.npz/list file.")] = "fashion-mnist",
    test_data: Annotated[Optional[str], typer.Option(help="Held-out labeled images (default for fashion-mnist: its test split).")] = None,
    preprocessing: Annotated[str, typer.Option(help="Preprocessing table entry; evaluation must use the same.")] = "fashion-mnist",
    init_weights: Annotated[Optional[Path], typer.Option(help="Fine-tune from this official/timm/torchvision checkpoint.")] = None,
    reset_head: Annotated[bool, typer.Option(help="Replace the checkpoint's classifier with a new one (other class count).")] = False,
    train_limit: Annotated[int, typer.Option(help="Train on a seeded sample of this many images (0: all).")] = 0,
    test_limit: Annotated[int, typer.Option(help="Test on a seeded sample of this many images (0: all).")] = 0,
    threads: Annotated[int, typer.Option(help="Torch CPU threads (0: torch's default).")] = 0,
    log_every: Annotated[int, typer.Option(help="Progress line every N steps (0: four per long epoch).")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from <output>.resume.pth.")] = False,
) -> None:
    """Train or fine-tune a ConvNeXt; report test accuracy every epoch; write a checkpoint and its record."""
    from pipeline.training.loop import resume_path, train
    from pipeline.training.recipe import TrainConfig

    for name, value in (("train-limit", train_limit), ("test-limit", test_limit), ("threads", threads)):
        if value < 0:
            raise PipelineError(f"--{name} must be >= 0 (0: no limit / default), got {value}")
    if output.suffix != ".pth":
        raise PipelineError(f"--output '{output}' should end in .pth (its record is written beside it as .json)")
    config = TrainConfig(
        variant=variant, num_classes=num_classes, in_chans=in_chans, input_size=input_size,
        epochs=epochs, batch_size=batch_size, lr=lr, min_lr=min_lr, weight_decay=weight_decay,
        warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, drop_path_rate=drop_path_rate,
        crop_padding=crop_padding, hflip=hflip, random_erasing=random_erasing, seed=seed,
        data=data, test_data=test_data, preprocessing=preprocessing,
        init_weights=init_weights, reset_head=reset_head,
        train_limit=train_limit or None, test_limit=test_limit or None, threads=threads or None,
        log_every=log_every,
    )
    state = resume_path(output)
    if not resume and state.exists():
        raise PipelineError(
            f"'{state}' holds an interrupted run for this output; pass --resume to continue it, or delete it to start over"
        )
    command = "pipeline " + shlex.join(sys.argv[1:])
    train(config, output, resume=state if resume else None, progress=lambda line: print(line, flush=True),
          command=command)


def register(app: typer.Typer) -> None:
    """Add the `train` command to `app`."""
    app.command(name="train")(train_command)
