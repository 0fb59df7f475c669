"""Train (or fine-tune) a ConvNeXt on a labeled image set, on the CPU.

The recipe is the ConvNeXt paper's, cut down to what helps a small model on 28x28 grayscale
images: AdamW with no weight decay on norms, biases and layer-scale `gamma`; a per-step cosine
learning-rate schedule after a linear warm-up; label-smoothing cross-entropy; stochastic depth;
and light augmentation (random crop from a padded image, horizontal flip; random erasing is
there but off by default). RandAugment, mixup and cutmix are left out: a model this small
underfits 28x28 Fashion-MNIST, so they cost more accuracy than they buy in regularization.

Images are read and preprocessed once with `calibration.load_dataset`, the loader evaluation uses,
so training sees exactly the tensors evaluation feeds; augmentation then runs on whole batches of
those tensors. Runs are deterministic for a seed and thread count, and resumable at epoch
boundaries from `<output>.resume.pth`.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.checkpoints import atomic_torch_save
from pipeline.errors import PipelineError
from pipeline.model import VARIANTS, create_model

FASHION_MNIST = "fashion-mnist"
# Top-level keys of the resume file; a file without them was not written by `train`.
_RESUME_KEYS = frozenset({"config", "epoch", "model", "optimizer", "scheduler", "aug_rng", "torch_rng", "history"})
# Settings that may change between a run and its resumption without changing the result.
_RESUME_MAY_CHANGE = frozenset({"threads", "log_every"})


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


def resume_path(output_path: str | os.PathLike[str]) -> Path:
    """Where `train` keeps its per-epoch state for `output_path`: `<output>.resume.pth`."""
    return Path(output_path).with_suffix(".resume.pth")


def record_path(output_path: str | os.PathLike[str]) -> Path:
    """The JSON record written next to a trained checkpoint: `<output>.json`."""
    return Path(output_path).with_suffix(".json")


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


# --- data and evaluation -------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Split:
    images: torch.Tensor  # (N, C, S, S) float32, preprocessed as evaluation does
    labels: torch.Tensor  # (N,) int64
    source: str
    description: str


def _load_split(source: str, config: TrainConfig, limit: int | None) -> _Split:
    from calibration import load_dataset

    dataset = load_dataset(
        source, input_size=config.input_size, preprocessing=config.preprocessing,
        in_chans=config.in_chans, limit=limit, seed=config.seed,
    )
    if dataset.labels is None:
        raise PipelineError(f"'{source}' has no labels; training and testing need labeled images (e.g. an ImageFolder)")
    if dataset.labels.size and int(dataset.labels.max()) >= config.num_classes:
        raise PipelineError(
            f"'{source}' has label {int(dataset.labels.max())} but the model has {config.num_classes} classes; "
            f"pass --num-classes {int(dataset.labels.max()) + 1}"
        )
    return _Split(
        images=torch.from_numpy(dataset.images),
        labels=torch.from_numpy(dataset.labels.astype(np.int64)),
        source=dataset.source,
        description=dataset.description,
    )


def _black_pixel(config: TrainConfig) -> torch.Tensor:
    """The normalized value of a black pixel per channel, (1, C, 1, 1): what crop padding fills with."""
    from calibration import get_preprocessing, preprocess_array

    black = preprocess_array(
        np.zeros((1, config.input_size, config.input_size), np.uint8),
        config.input_size, get_preprocessing(config.preprocessing), config.in_chans, layout="NHW",
    )
    return torch.from_numpy(black[:, :, :1, :1].copy())


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> tuple[float, float]:
    """(top-1, top-5) accuracy in percent of `model` (put in eval mode) on preprocessed images."""
    was_training = model.training
    model.eval()
    top1 = top5 = 0
    k = min(5, model.head.out_features if hasattr(model, "head") else 5)
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size])
        target = labels[start : start + batch_size]
        best = logits.topk(k, dim=1).indices
        top1 += int((best[:, 0] == target).sum())
        top5 += int((best == target[:, None]).any(dim=1).sum())
    model.train(was_training)
    n = max(1, len(images))
    return 100.0 * top1 / n, 100.0 * top5 / n


# --- state on disk -------------------------------------------------------------------------------


def _load_resume(path: Path, config: TrainConfig) -> dict[str, Any]:
    if not path.is_file():
        raise PipelineError(f"resume file '{path}' does not exist; drop --resume to start from scratch")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged or foreign files
        raise PipelineError(
            f"cannot read resume file '{path}' ({type(exc).__name__}); delete it and train from scratch"
        ) from None
    if not isinstance(state, dict) or not _RESUME_KEYS <= state.keys():
        raise PipelineError(f"'{path}' is not a resume file written by `pipeline train`; pass the <output>.resume.pth")
    saved, wanted = state["config"], config.as_dict()
    changed = sorted(k for k in wanted if k not in _RESUME_MAY_CHANGE and saved.get(k) != wanted[k])
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {wanted[k]!r}" for k in changed)
        raise PipelineError(
            f"resume file '{path}' was written with other settings ({diffs}); "
            "pass the same settings to resume, or delete the file to start again"
        )
    return state


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# --- the loop ------------------------------------------------------------------------------------


def train(
    config: TrainConfig,
    output_path: str | os.PathLike[str],
    resume: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] = print,
    command: str | None = None,
) -> dict[str, Any]:
    """Train per `config`, write the checkpoint to `output_path` and its record to `<output>.json`.

    State is saved after every epoch to `<output>.resume.pth` (removed once the checkpoint is
    written); pass that file as `resume` to continue an interrupted run exactly where it stopped.
    `command` is recorded as how the run was started (default: this process's command line).
    Returns the record: settings, data, per-epoch history, final test top-1/top-5, wall time.
    """
    output_path = Path(output_path)
    state = _load_resume(Path(resume), config) if resume is not None else None
    progress(config.describe())

    threads_before = torch.get_num_threads()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        # All CPU kernels the loop uses have deterministic implementations; this makes sure of it.
        torch.use_deterministic_algorithms(True)
        # Layer scale starts at 1e-6, so early gradients are full of denormal floats, which x86
        # CPUs compute several times slower; flushing them to zero changes nothing measurable.
        torch.set_flush_denormal(True)
        # fork_rng: the run seeds and draws from the global generator (stochastic depth) without
        # changing what the caller's later draws are.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            return _train(config, output_path, state, progress, command)
    finally:
        torch.set_num_threads(threads_before)
        torch.use_deterministic_algorithms(deterministic_before)
        torch.set_flush_denormal(False)  # torch's default; there is no getter for the previous state


def _train(
    config: TrainConfig,
    output_path: Path,
    state: dict[str, Any] | None,
    progress: Callable[[str], None],
    command: str | None,
) -> dict[str, Any]:
    from pipeline.checkpoints import load_weights, save_checkpoint

    started = time.perf_counter()
    train_source, test_source = config.sources()
    train_set = _load_split(train_source, config, config.train_limit)
    test_set = _load_split(test_source, config, config.test_limit)
    progress(f"train data: {train_set.description}")
    progress(f"test data: {test_set.description}")
    background = _black_pixel(config)

    model = create_model(
        config.variant, num_classes=config.num_classes, in_chans=config.in_chans,
        drop_path_rate=config.drop_path_rate, layer_scale_init_value=config.layer_scale_init_value,
        seed=config.seed,
    )
    init = None
    if config.init_weights is not None:
        init = load_weights(model, config.init_weights, config.variant, reset_head=config.reset_head)
        head = "a new head" if init["head_reset"] else "its head"
        progress(f"initialized from {config.init_weights} ({init['layout']} layout, {head})")

    # Channels-last makes oneDNN's depthwise 7x7 convolutions (most of the time at these sizes)
    # over twice as fast on CPUs; the checkpoint is written back in the default layout.
    model = model.to(memory_format=torch.channels_last)

    n = len(train_set.images)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr)
    min_ratio = config.min_lr / config.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, min_ratio)
    )
    aug_gen = torch.Generator().manual_seed(config.seed)
    log_every = config.log_every or (math.ceil(steps_per_epoch / 4) if steps_per_epoch >= 200 else 0)

    first_epoch, history, wall_before = 0, [], 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        aug_gen.set_state(state["aug_rng"])
        torch.set_rng_state(state["torch_rng"])
        first_epoch, history = int(state["epoch"]), list(state["history"])
        wall_before = float(state.get("wall_s", 0.0))
        progress(f"resumed after epoch {first_epoch}/{config.epochs}")
    resume_file = resume_path(output_path)
    progress(
        f"{config.variant}: {sum(p.numel() for p in model.parameters()):,} parameters; {n} training images, "
        f"{steps_per_epoch} steps/epoch x {config.epochs} epochs, batch {config.batch_size}, "
        f"{torch.get_num_threads()} threads"
    )

    model.train()
    step_seconds: list[float] = []
    eval_seconds: list[float] = []
    for epoch in range(first_epoch, config.epochs):
        # The data order depends only on (seed, epoch), so a resumed run needs no saved state for it.
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch))
        epoch_start = time.perf_counter()
        loss_sum, seen = 0.0, 0
        for step, index in enumerate(order.split(config.batch_size), start=1):
            tick = time.perf_counter()
            images = augment(train_set.images[index], config, background, aug_gen)
            images = images.contiguous(memory_format=torch.channels_last)
            labels = train_set.labels[index]
            loss = F.cross_entropy(model(images), labels, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            value = loss.item()
            if not math.isfinite(value):
                raise PipelineError(
                    f"loss became {value} at epoch {epoch + 1} step {step}; lower --lr (now {config.lr})"
                )
            loss_sum += value * len(index)
            seen += len(index)
            step_seconds.append(time.perf_counter() - tick)
            if log_every and step % log_every == 0 and step < steps_per_epoch:
                rate = seen / (time.perf_counter() - epoch_start)
                eta = _eta(step_seconds, eval_seconds, total_steps - (epoch * steps_per_epoch + step),
                           config.epochs - epoch)
                progress(
                    f"epoch {epoch + 1}/{config.epochs} step {step}/{steps_per_epoch} "
                    f"loss {loss_sum / seen:.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                    f"{rate:.0f} img/s ETA {_duration(eta)}"
                )
        train_seconds = time.perf_counter() - epoch_start
        tick = time.perf_counter()
        top1, top5 = evaluate(model, test_set.images, test_set.labels)
        eval_seconds.append(time.perf_counter() - tick)
        history.append({
            "epoch": epoch + 1,
            "train_loss": round(loss_sum / seen, 5),
            "lr": scheduler.get_last_lr()[0],
            "test_top1": round(top1, 3),
            "test_top5": round(top5, 3),
            "seconds": round(train_seconds + eval_seconds[-1], 2),
        })
        atomic_torch_save(
            {
                "config": config.as_dict(),
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "aug_rng": aug_gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "history": history,
                "wall_s": wall_before + time.perf_counter() - started,
            },
            resume_file,
        )
        # Printed after the save, so a run stopped at this line resumes from this epoch.
        eta = _eta(step_seconds, eval_seconds, total_steps - (epoch + 1) * steps_per_epoch, config.epochs - epoch - 1)
        progress(
            f"epoch {epoch + 1}/{config.epochs} loss {loss_sum / seen:.4f} test top-1 {top1:.2f}% top-5 {top5:.2f}% "
            f"({train_seconds:.0f}s, {seen / train_seconds:.0f} img/s) ETA {_duration(eta)}"
        )

    # The reported accuracy is the written model's, in the layout evaluation loads it with (the
    # per-epoch figures came from channels-last kernels, which round differently).
    model = model.to(memory_format=torch.contiguous_format).eval()
    top1, top5 = evaluate(model, test_set.images, test_set.labels)
    final = {"test_top1": round(top1, 3), "test_top5": round(top5, 3)}
    wall = wall_before + time.perf_counter() - started
    training = {
        "command": command or "pipeline " + shlex.join(sys.argv[1:]),
        "config": config.as_dict(),
        "seed": config.seed,
        "epochs": config.epochs,
        "test_top1": final["test_top1"],
        "test_top5": final["test_top5"],
        "train_data": {"source": train_set.source, "description": train_set.description, "count": n},
        "test_data": {"source": test_set.source, "description": test_set.description, "count": len(test_set.images)},
        "preprocessing": config.preprocessing,
        "init_weights": None if init is None else {k: init[k] for k in ("path", "sha256", "layout", "head_reset")},
        "history": history,
        "wall_s": round(wall, 1),
        "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),  # TorchVersion would not load weights-only
    }
    save_checkpoint(model, output_path, config.variant, config.num_classes, config.in_chans,
                    extra={"training": training})
    resume_file.unlink(missing_ok=True)
    record = {
        "checkpoint": output_path.name,
        "sha256": sha256_file(output_path),
        "size_bytes": output_path.stat().st_size,
        "variant": config.variant,
        "num_classes": config.num_classes,
        "in_chans": config.in_chans,
        "input_size": config.input_size,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **training,
    }
    record_path(output_path).write_text(json.dumps(record, indent=2) + "\n")
    progress(
        f"wrote {output_path} ({record['size_bytes'] / 1e6:.1f} MB): test top-1 {final['test_top1']:.2f}% "
        f"top-5 {final['test_top5']:.2f}% after {config.epochs} epochs in {_duration(wall)}"
    )
    return record


def _eta(step_seconds: list[float], eval_seconds: list[float], steps_left: int, evals_left: int) -> float:
    """Seconds left, from the mean step and evaluation times of this process so far."""
    per_step = sum(step_seconds[-200:]) / max(1, len(step_seconds[-200:]))
    per_eval = sum(eval_seconds) / len(eval_seconds) if eval_seconds else 0.0
    return steps_left * per_step + evals_left * per_eval


__all__ = [
    "TrainConfig",
    "augment",
    "evaluate",
    "lr_factor",
    "param_groups",
    "record_path",
    "resume_path",
    "train",
]
