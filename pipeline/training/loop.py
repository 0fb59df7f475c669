"""A training run: read the labeled images, run the recipe (pipeline/training/recipe.py) epoch
by epoch on the CPU, evaluate, and write the checkpoint with its record.

Images are read and preprocessed once with `calibration.load_dataset`, the loader evaluation uses,
so training sees exactly the tensors evaluation feeds; augmentation then runs on whole batches of
those tensors. Runs are deterministic for a seed and thread count, and resumable at epoch
boundaries from `<output>.resume.pth`.
"""

from __future__ import annotations

import datetime
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

from pipeline.artifacts import file_sha256
from pipeline.checkpoints import atomic_torch_save
from pipeline.errors import PipelineError
from pipeline.model import create_model
from pipeline.training.recipe import TrainConfig, augment, lr_factor, param_groups

# Top-level keys of the resume file; a file without them was not written by `train`.
_RESUME_KEYS = frozenset({"config", "epoch", "model", "optimizer", "scheduler", "aug_rng", "torch_rng", "history"})
# Settings that may change between a run and its resumption without changing the result.
_RESUME_MAY_CHANGE = frozenset({"threads", "log_every"})


def resume_path(output_path: str | os.PathLike[str]) -> Path:
    """Where `train` keeps its per-epoch state for `output_path`: `<output>.resume.pth`."""
    return Path(output_path).with_suffix(".resume.pth")


def record_path(output_path: str | os.PathLike[str]) -> Path:
    """The JSON record written next to a trained checkpoint: `<output>.json`."""
    return Path(output_path).with_suffix(".json")


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
        "sha256": file_sha256(output_path),
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
    "evaluate",
    "record_path",
    "resume_path",
    "train",
]
