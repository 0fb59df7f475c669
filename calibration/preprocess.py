"""Preprocessing as data: one row per normalization a model was trained with.

Calibration (INT8 PTQ) and evaluation must feed the model exactly what it saw in
training, so every image source in this package goes through the same two
functions: `preprocess_image` for decoded files (PIL resize, like timm and
torchvision eval) and `preprocess_array` for tensors such as the raw
Fashion-MNIST arrays (torch antialiased resize, vectorized over the batch).
Both do the same steps in the same order:

    convert to the row's channels -> resize shorter side to int(size / crop_pct)
    -> center crop size x size -> scale to [0, 1] -> normalize -> adapt to in_chans

When the model's input channels differ from the row's, 1 -> 3 replicates the
normalized plane and 3 -> 1 takes the luminance (ITU-R 601-2, what PIL's "L"
uses) before normalizing with the luminance-weighted mean and std.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.errors import PipelineError

# ITU-R 601-2 luma weights: the ones PIL's convert("L") uses.
LUMINANCE = (0.299, 0.587, 0.114)

# interpolation name -> (PIL filter, torch.nn.functional.interpolate mode)
_INTERPOLATIONS = {
    "bilinear": (Image.Resampling.BILINEAR, "bilinear"),
    "bicubic": (Image.Resampling.BICUBIC, "bicubic"),
    "nearest": (Image.Resampling.NEAREST, "nearest-exact"),
}


@dataclass(frozen=True)
class Preprocessing:
    """How a model's inputs were normalized in training.

    Use `dataclasses.replace(get_preprocessing("imagenet"), interpolation="bicubic")`
    for a variant of a row.
    """

    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # Fraction of the resized image kept by the center crop: the shorter side is
    # resized to int(input_size / crop_pct), then input_size is cropped.
    crop_pct: float
    interpolation: str
    # 3: decoded as RGB, 1: decoded as grayscale ("L").
    channels: int

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise PipelineError(
                f"preprocessing '{self.name}' has channels={self.channels}; use 1 (grayscale) or 3 (RGB)"
            )
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise PipelineError(
                f"preprocessing '{self.name}' needs {self.channels} mean and std values, "
                f"got {len(self.mean)} and {len(self.std)}; give one per channel"
            )
        if any(s <= 0 for s in self.std):
            raise PipelineError(f"preprocessing '{self.name}' has std {self.std}; every std must be > 0")
        if not 0 < self.crop_pct <= 1:
            raise PipelineError(
                f"preprocessing '{self.name}' has crop_pct={self.crop_pct}; use a value in (0, 1]"
            )
        if self.interpolation not in _INTERPOLATIONS:
            raise PipelineError(
                f"preprocessing '{self.name}' has interpolation '{self.interpolation}'; "
                f"use one of {', '.join(_INTERPOLATIONS)}"
            )


PREPROCESSING: dict[str, Preprocessing] = {
    # torchvision/timm ImageNet eval: resize 256, center crop 224 (for 224 inputs).
    # Bilinear is torchvision's eval default; timm's ConvNeXt configs say bicubic.
    "imagenet": Preprocessing(
        name="imagenet",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        crop_pct=0.875,
        interpolation="bilinear",
        channels=3,
    ),
    # Fashion-MNIST training-set statistics; 28x28 grayscale, resized to the input size.
    "fashion-mnist": Preprocessing(
        name="fashion-mnist",
        mean=(0.2860,),
        std=(0.3530,),
        crop_pct=1.0,
        interpolation="bilinear",
        channels=1,
    ),
}


def get_preprocessing(name: str) -> Preprocessing:
    """The row of `PREPROCESSING` called `name`."""
    try:
        return PREPROCESSING[name]
    except KeyError:
        raise PipelineError(
            f"unknown preprocessing '{name}'; use one of: {', '.join(sorted(PREPROCESSING))}"
        ) from None


def resolve_preprocessing(preprocessing: str | Preprocessing) -> Preprocessing:
    """Accept a table name or a ready `Preprocessing`."""
    if isinstance(preprocessing, Preprocessing):
        return preprocessing
    return get_preprocessing(preprocessing)


@dataclass(frozen=True)
class _Plan:
    """What to compute for one (row, in_chans) pair."""

    channels: int  # channels the image is converted to before normalizing
    mean: np.ndarray  # (channels, 1, 1) float32
    std: np.ndarray  # (channels, 1, 1) float32
    repeat: int  # times the normalized planes are replicated to reach in_chans


def _plan(spec: Preprocessing, in_chans: int) -> _Plan:
    mean = np.asarray(spec.mean, np.float32)
    std = np.asarray(spec.std, np.float32)
    if in_chans == spec.channels:
        channels, repeat = spec.channels, 1
    elif spec.channels == 1 and in_chans == 3:
        channels, repeat = 1, 3
    elif spec.channels == 3 and in_chans == 1:
        # Luminance of the image, normalized with the luminance of the statistics.
        weights = np.asarray(LUMINANCE, np.float32)
        mean = np.asarray([weights @ mean], np.float32)
        std = np.asarray([weights @ std], np.float32)
        channels, repeat = 1, 1
    else:
        raise PipelineError(
            f"the model takes {in_chans} input channels but preprocessing '{spec.name}' gives "
            f"{spec.channels}; only 1 <-> 3 channels can be adapted, pick a matching preprocessing"
        )
    return _Plan(channels, mean.reshape(-1, 1, 1), std.reshape(-1, 1, 1), repeat)


def input_recipe(spec: Preprocessing, in_chans: int, input_size: int) -> dict:
    """The steps of `preprocess_image` for one model, written out as numbers (for device
    bundles, whose users preprocess without this package): PIL mode, resize of the shorter
    side, crop, and the mean and std per channel after the [0, 1] scaling."""
    plan = _plan(spec, in_chans)
    return {
        "mode": "RGB" if plan.channels == 3 else "L",
        "resize_shorter_side": int(input_size / spec.crop_pct),
        "crop": input_size,
        "interpolation": spec.interpolation,
        "mean": [round(float(v), 6) for v in plan.mean.ravel()],
        "std": [round(float(v), 6) for v in plan.std.ravel()],
        "repeat_channels": plan.repeat,
    }


def _check_size(input_size: int) -> None:
    if not isinstance(input_size, (int, np.integer)) or input_size <= 0:
        raise PipelineError(f"input size {input_size!r} is not a positive integer; pass e.g. 224")


def resize_geometry(height: int, width: int, input_size: int, crop_pct: float) -> tuple[int, int, int, int]:
    """(resized_h, resized_w, crop_top, crop_left) for an image of height x width.

    Same arithmetic as torchvision's Resize(int) and CenterCrop, so crops line up
    with reference evaluations pixel for pixel.
    """
    scale = int(input_size / crop_pct)
    if height <= width:
        new_h, new_w = scale, int(scale * width / height)
    else:
        new_h, new_w = int(scale * height / width), scale
    top = int(round((new_h - input_size) / 2.0))
    left = int(round((new_w - input_size) / 2.0))
    return new_h, new_w, top, left


# 16-bit and float PIL modes: convert("L"/"RGB") would clip them, not scale them.
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _to_8bit(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        # Float images are either [0, 1] or already on the 8-bit scale.
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
    elif image.mode.startswith("I;16") or (values.size and values.max() > 255):
        scale = 255.0 / 65535.0
    else:
        scale = 1.0
    return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), mode="L")


def _convert(image: Image.Image, channels: int) -> Image.Image:
    if image.mode in _WIDE_MODES:
        image = _to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        # PIL warns when a palette image with transparency goes straight to RGB.
        image = image.convert("RGBA")
    target = "RGB" if channels == 3 else "L"
    if image.mode == target:
        return image
    try:
        return image.convert(target)
    except ValueError as exc:
        raise PipelineError(
            f"cannot convert a {image.mode} image to {target} ({exc}); save it as RGB or grayscale"
        ) from None


def preprocess_image(
    image: Image.Image, input_size: int, spec: Preprocessing, in_chans: int
) -> np.ndarray:
    """One decoded image -> float32 (in_chans, input_size, input_size), normalized."""
    _check_size(input_size)
    plan = _plan(spec, in_chans)
    image = _convert(image, plan.channels)
    width, height = image.size
    if width == 0 or height == 0:
        raise PipelineError(f"image is {width}x{height} pixels; it has no content to preprocess")
    new_h, new_w, top, left = resize_geometry(height, width, input_size, spec.crop_pct)
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), resample=_INTERPOLATIONS[spec.interpolation][0])
    image = image.crop((left, top, left + input_size, top + input_size))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)
    pixels = (pixels - plan.mean) / plan.std
    if plan.repeat > 1:
        pixels = np.repeat(pixels, plan.repeat, axis=0)
    return np.ascontiguousarray(pixels, dtype=np.float32)


def _resolve_layout(shape: tuple[int, ...], layout: str) -> str:
    """The layout ("NHW", "NHWC" or "NCHW") of a batch of this shape; "auto" reads it from the shape."""
    if layout == "auto":
        if len(shape) == 3:
            layout = "NHW"
        elif len(shape) == 4:
            # Channel counts that decode: gray, RGB, RGBA. A trailing one wins only
            # when dim 1 does not also look like channels.
            channel_like = (1, 3, 4)
            if shape[1] in channel_like:
                layout = "NCHW"
            elif shape[3] in channel_like:
                layout = "NHWC"
            else:
                raise PipelineError(
                    f"array of shape {shape} has no 1, 3 or 4 channel axis; "
                    "save images as (N,H,W), (N,H,W,C) or (N,C,H,W) with C in 1, 3, 4"
                )
        else:
            raise PipelineError(
                f"array of shape {shape} is not a batch of images; "
                "save images as (N,H,W), (N,H,W,C) or (N,C,H,W)"
            )
    expected_ndim = {"NHW": 3, "NHWC": 4, "NCHW": 4}
    if layout not in expected_ndim:
        raise PipelineError(f"unknown array layout '{layout}'; use auto, NHW, NHWC or NCHW")
    if len(shape) != expected_ndim[layout]:
        raise PipelineError(f"array of shape {shape} does not match layout {layout}; fix the layout")
    return layout


def channel_adaptation(spec: Preprocessing, in_chans: int) -> str | None:
    """In words, how images normalized by `spec` are adapted to a model of `in_chans`
    channels (None when they already match)."""
    plan = _plan(spec, in_chans)
    if plan.repeat > 1:
        return f"gray replicated to {in_chans} channels for the {in_chans}-channel model"
    if plan.channels != spec.channels:
        return (f"gray (luminance) for the {in_chans}-channel model, normalized with the luminance-weighted "
                f"mean and std of preprocessing '{spec.name}'")
    return None


def array_conversions(shape: tuple[int, ...], input_size: int, spec: Preprocessing, in_chans: int,
                      layout: str = "auto") -> tuple[str, list[str]]:
    """In words, how `preprocess_array` reads a batch of this shape ("3 images of 1x5x7, read as
    (N,H,W)") and what it changes besides scaling and normalizing: the channels and the size
    (no steps when it changes neither)."""
    layout = _resolve_layout(tuple(shape), layout)
    if layout == "NHW":
        channels, (height, width) = 1, shape[1:]
    elif layout == "NHWC":
        (height, width, channels) = shape[1:]
    else:
        (channels, height, width) = shape[1:]
    reading = f"{shape[0]} images of {channels}x{height}x{width}, read as ({','.join(layout)})"
    steps = []
    if channels == 4:
        steps.append("alpha channel dropped")
    if min(channels, 3) != spec.channels and channels in (1, 3, 4):
        converted = "RGB to gray (luminance)" if spec.channels == 1 else "gray to RGB"
        steps.append(f"{converted}, as preprocessing '{spec.name}' reads images")
    adaptation = channel_adaptation(spec, in_chans)
    if adaptation:
        steps.append(adaptation)
    if height and width:
        new_h, new_w, _, _ = resize_geometry(height, width, input_size, spec.crop_pct)
        if (new_h, new_w) != (height, width):
            steps.append(f"resized from {height}x{width} to {new_h}x{new_w} ({spec.interpolation})")
        if (new_h, new_w) != (input_size, input_size):
            steps.append(f"center-cropped to {input_size}x{input_size}")
    return reading, steps


def _channels_first(array: np.ndarray, layout: str) -> np.ndarray:
    """Any supported batch layout -> (N, C, H, W)."""
    layout = _resolve_layout(array.shape, layout)
    if layout == "NHW":
        return array[:, None]
    if layout == "NHWC":
        return array.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    return array


def _unit_scale(array: np.ndarray) -> tuple[np.ndarray, float]:
    """Integer or [0, 1] float pixels -> (values, factor to reach [0, 1])."""
    if array.dtype == np.uint8:
        return array, 1.0 / 255.0
    if array.dtype == np.uint16:
        return array, 1.0 / 65535.0
    if array.dtype.kind == "f":
        if array.size and (not np.isfinite(array).all() or array.min() < 0 or array.max() > 1):
            raise PipelineError(
                f"float array with values outside [0, 1] (or NaN) is neither raw pixels nor "
                "preprocessed for this model; save uint8 pixels or float32 (N,C,S,S) already normalized"
            )
        return array, 1.0
    raise PipelineError(f"array dtype {array.dtype} is not image pixels; save uint8, uint16 or float in [0, 1]")


def preprocess_array(
    array: np.ndarray,
    input_size: int,
    spec: Preprocessing,
    in_chans: int,
    layout: str = "auto",
    chunk: int = 1024,
) -> np.ndarray:
    """A batch of raw images -> float32 (N, in_chans, input_size, input_size), normalized.

    `array` is uint8/uint16 pixels or float pixels in [0, 1], shaped (N, H, W),
    (N, H, W, C) or (N, C, H, W) with C in 1, 3, 4 (4 = RGBA: alpha dropped);
    `layout="auto"` reads the layout from the shape. The resize is torch's
    antialiased interpolate, which tracks PIL's filters to within about one gray
    level; batches go through in `chunk`-image pieces to bound memory.
    """
    import torch
    import torch.nn.functional as F

    _check_size(input_size)
    plan = _plan(spec, in_chans)
    array = np.asarray(array)
    values, factor = _unit_scale(array)
    values = _channels_first(values, layout)
    n, src_channels, height, width = values.shape
    if src_channels not in (1, 3, 4):
        raise PipelineError(
            f"array has {src_channels} channels (shape {array.shape}); images need 1, 3 or 4 channels"
        )
    if height == 0 or width == 0:
        raise PipelineError(f"array of shape {array.shape} holds empty images; save real pixels")
    new_h, new_w, top, left = resize_geometry(height, width, input_size, spec.crop_pct)
    mode = _INTERPOLATIONS[spec.interpolation][1]
    mean = torch.from_numpy(plan.mean)
    std = torch.from_numpy(plan.std)
    weights = torch.tensor(LUMINANCE, dtype=torch.float32).view(1, 3, 1, 1)
    out = np.empty((n, in_chans, input_size, input_size), np.float32)
    for start in range(0, n, chunk):
        batch = torch.from_numpy(np.ascontiguousarray(values[start : start + chunk])).float() * factor
        batch = batch[:, :3]  # RGBA -> RGB
        if batch.shape[1] == 3 and plan.channels == 1:
            batch = (batch * weights).sum(dim=1, keepdim=True)
        elif batch.shape[1] == 1 and plan.channels == 3:
            batch = batch.expand(-1, 3, -1, -1)
        if (new_h, new_w) != (height, width):
            antialias = mode != "nearest-exact"
            batch = F.interpolate(batch, size=(new_h, new_w), mode=mode, antialias=antialias)
            # PIL stores the resized image as 8-bit, which clips bicubic overshoot.
            batch = batch.clamp_(0.0, 1.0)
        batch = batch[:, :, top : top + input_size, left : left + input_size]
        batch = (batch - mean) / std
        if plan.repeat > 1:
            batch = batch.repeat(1, plan.repeat, 1, 1)
        out[start : start + chunk] = batch.numpy()
    return out
