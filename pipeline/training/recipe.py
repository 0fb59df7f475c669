"""The training recipe: every setting of a run (`TrainConfig`), the learning-rate schedule,
the optimizer's parameter groups and the batch augmentations.

The recipe is the ConvNeXt paper's, cut down to what helps a small model on 28x28 grayscale
images: AdamW with no weight decay on norms, biases and layer-scale `gamma`; a per-step cosine
learning-rate schedule after a linear warm-up; label-smoothing cross-entropy; stochastic depth;
and light augmentation (random crop from a padded image, horizontal flip; random erasing is
there but off by default). RandAugment, mixup and cutmix are left out: a model this small
underfits 28x28 Fashion-MNIST, so they cost more accuracy than they buy in regularization.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.model import VARIANTS

FASHION_MNIST = "fashion-mnist"


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; `describe()` prints them all before work starts."""

    variant: str = "micro"
    num_classes: int = 10
    in_chans: int = 1
    input_size: int = 32
    epochs: int = 70
    batch_size: int = 128
    lr: float = 4e-3  # peak learning rate, reached at the end of the warm-up
    min_lr: float = 1e-5  # where the cosine ends
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.1
    drop_path_rate: float = 0.0
    layer_scale_init_value: float = 1e-6
    # Augmentation, applied to batches of preprocessed tensors. The defaults are what trained the
    # committed micro model: a model this small underfits Fashion-MNIST, and random erasing
    # (timm's 0.25) or 4-pixel crops cost it several points of test accuracy in short runs.
    crop_padding: int = 2  # random crop of input_size from the image padded by this many pixels (0: off)
    hflip: bool = True
    random_erasing: float = 0.0  # probability per image of erasing one rectangle with noise (0: off)
    seed: int = 0
    # Training images: "fashion-mnist" (its train split; the test split is the held-out set) or
    # any labeled source `calibration.load_dataset` reads, with `test_data` then required.
    data: str = FASHION_MNIST
    test_data: str | None = None
    preprocessing: str = FASHION_MNIST
    init_weights: Path | None = None  # official/timm/torchvision checkpoint to fine-tune from
    reset_head: bool = False  # drop the checkpoint's classifier (needed when class counts differ)
    train_limit: int | None = None  # train on a seeded sample of this many images
    test_limit: int | None = None  # evaluate on a seeded sample of this many images
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    log_every: int = 0  # progress line every N steps within an epoch (0: four per epoch of >= 200 steps)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise PipelineError(f"unknown variant '{self.variant}'; known variants: {', '.join(VARIANTS)}")
        if self.input_size < 32 or self.input_size % 32:
            raise PipelineError(
                f"--input-size {self.input_size} is not a positive multiple of 32 (ConvNeXt downsamples 32x)"
            )
        for name in ("num_classes", "in_chans", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise PipelineError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise PipelineError(f"need --lr > 0 and 0 <= --min-lr <= --lr, got {self.lr} and {self.min_lr}")
        if self.weight_decay < 0:
            raise PipelineError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise PipelineError(f"--warmup-epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        if not 0 <= self.label_smoothing < 1:
            raise PipelineError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.drop_path_rate < 1:
            raise PipelineError(f"--drop-path-rate must be in [0, 1), got {self.drop_path_rate}")
        if not 0 <= self.random_erasing <= 1:
            raise PipelineError(f"--random-erasing is a probability in [0, 1], got {self.random_erasing}")
        if not 0 <= self.crop_padding <= self.input_size // 2:
            raise PipelineError(
                f"--crop-padding must be in [0, {self.input_size // 2}] for input size {self.input_size}, "
                f"got {self.crop_padding}"
            )
        for name in ("train_limit", "test_limit", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise PipelineError(f"--{name.replace('_', '-')} must be at least 1, got {value}; omit it for all")
        if self.log_every < 0:
            raise PipelineError(f"--log-every must be >= 0, got {self.log_every}")
        if self.reset_head and self.init_weights is None:
            raise PipelineError("--reset-head needs --init-weights PATH: there is no checkpoint head to reset")
        if self.init_weights is not None and not Path(self.init_weights).is_file():
            raise PipelineError(f"--init-weights file '{self.init_weights}' does not exist; pass a .pth checkpoint")
        if self.data != FASHION_MNIST and self.test_data is None:
            raise PipelineError(
                f"--data '{self.data}' has no held-out test set; pass --test-data PATH "
                f"(only --data {FASHION_MNIST} brings its own test split)"
            )

    def sources(self) -> tuple[str, str]:
        """(training source, test source) as `calibration.load_dataset` names them."""
        if self.data == FASHION_MNIST:
            return f"{FASHION_MNIST}:train", self.test_data or f"{FASHION_MNIST}:test"
        return self.data, str(self.test_data)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (paths as strings), for checkpoints and JSON records."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}

    def describe(self) -> str:
        return "train settings: " + ", ".join(f"{k}={v}" for k, v in self.as_dict().items())


# --- schedule and optimizer --------------------------------------------------------------------


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at `step`: linear warm-up from 1/warmup, then cosine down to min_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on conv and linear weights only; norms, biases and layer-scale gamma
    (every tensor with one dimension) are left alone, as in the official recipe."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# --- augmentation on batches ---------------------------------------------------------------------


def random_crop(images: torch.Tensor, padding: int, background: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per image, crop the original size at a random offset from the image padded with `background`
    (the normalized value of a black pixel, (1, C, 1, 1))."""
    n, c, h, w = images.shape
    padded = background.expand(n, c, h + 2 * padding, w + 2 * padding).clone()
    padded[:, :, padding : padding + h, padding : padding + w] = images
    top = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    rows = (top[:, None] + torch.arange(h))[:, None, :, None]  # (N, 1, H, 1)
    cols = (left[:, None] + torch.arange(w))[:, None, None, :]  # (N, 1, 1, W)
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def random_hflip(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_erase(
    images: torch.Tensor,
    probability: float,
    gen: torch.Generator,
    area: tuple[float, float] = (0.02, 1 / 3),
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> torch.Tensor:
    """timm's RandomErasing in "pixel" mode, batched: with `probability`, fill one rectangle of
    `area` (fraction of the image) and `aspect` ratio with standard-normal noise. Rectangles that
    would not fit are shrunk to fit rather than redrawn."""
    n, c, h, w = images.shape
    apply = torch.rand(n, generator=gen) < probability
    target = (area[0] + (area[1] - area[0]) * torch.rand(n, generator=gen)) * h * w
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, generator=gen))
    eh = torch.sqrt(target * ratio).round().clamp(1, h).long()
    ew = torch.sqrt(target / ratio).round().clamp(1, w).long()
    top = (torch.rand(n, generator=gen) * (h - eh + 1)).long()
    left = (torch.rand(n, generator=gen) * (w - ew + 1)).long()
    rows = torch.arange(h)[None, :]
    cols = torch.arange(w)[None, :]
    inside_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])  # (N, H)
    inside_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])  # (N, W)
    mask = (inside_rows[:, :, None] & inside_cols[:, None, :] & apply[:, None, None])[:, None]  # (N, 1, H, W)
    noise = torch.randn(images.shape, generator=gen)
    return torch.where(mask, noise, images)


def augment(images: torch.Tensor, config: TrainConfig, background: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The training augmentations in order: crop from padded, flip, erase."""
    if config.crop_padding:
        images = random_crop(images, config.crop_padding, background, gen)
    if config.hflip:
        images = random_hflip(images, gen)
    if config.random_erasing:
        images = random_erase(images, config.random_erasing, gen)
    return images
