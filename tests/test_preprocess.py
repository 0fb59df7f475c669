import dataclasses
import time

import numpy as np
import pytest
from PIL import Image

from calibration.preprocess import (
    LUMINANCE,
    PREPROCESSING,
    Preprocessing,
    get_preprocessing,
    preprocess_array,
    preprocess_image,
    resize_geometry,
)
from pipeline.errors import PipelineError


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def constant_image(spec: Preprocessing, size=(64, 48)) -> tuple[Image.Image, np.ndarray]:
    """An image of one color in the row's channels, and that color in [0, 1]."""
    if spec.channels == 3:
        color = (200, 100, 50)
        return Image.new("RGB", size, color), np.asarray(color, np.float32) / 255
    return Image.new("L", size, 180), np.asarray([180], np.float32) / 255


# --- the table ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PREPROCESSING))
def test_table_rows_are_found_by_name(name):
    spec = get_preprocessing(name)
    assert spec.name == name
    assert len(spec.mean) == len(spec.std) == spec.channels


def test_table_values():
    imagenet = get_preprocessing("imagenet")
    assert imagenet.mean == (0.485, 0.456, 0.406) and imagenet.std == (0.229, 0.224, 0.225)
    assert imagenet.crop_pct == 0.875 and imagenet.channels == 3 and imagenet.interpolation == "bilinear"
    fashion = get_preprocessing("fashion-mnist")
    assert fashion.mean == (0.2860,) and fashion.std == (0.3530,)
    assert fashion.crop_pct == 1.0 and fashion.channels == 1


def test_unknown_preprocessing_lists_known_ones():
    with pytest.raises(PipelineError) as excinfo:
        get_preprocessing("cifar")
    message = one_line_error(excinfo)
    assert "cifar" in message and "imagenet" in message and "fashion-mnist" in message


@pytest.mark.parametrize(
    "changes",
    [
        {"channels": 2, "mean": (0.5, 0.5), "std": (0.5, 0.5)},
        {"mean": (0.5,)},
        {"std": (0.2, 0.0, 0.2)},
        {"crop_pct": 1.5},
        {"crop_pct": 0.0},
        {"interpolation": "lanczos7"},
    ],
)
def test_invalid_rows_are_rejected(changes):
    with pytest.raises(PipelineError) as excinfo:
        dataclasses.replace(get_preprocessing("imagenet"), **changes)
    one_line_error(excinfo)


# --- numerics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PREPROCESSING))
def test_constant_image_normalizes_to_expected_value(name):
    spec = get_preprocessing(name)
    image, color = constant_image(spec)
    out = preprocess_image(image, 32, spec, spec.channels)
    assert out.dtype == np.float32 and out.shape == (spec.channels, 32, 32)
    expected = (color - np.asarray(spec.mean)) / np.asarray(spec.std)
    np.testing.assert_allclose(out, np.broadcast_to(expected[:, None, None], out.shape), atol=1e-5)


def test_resize_geometry_matches_torchvision_arithmetic():
    # 640x480 (W x H) for 224 at crop_pct 0.875: shorter side to 256, long side int(256 * 640 / 480) = 341.
    assert resize_geometry(480, 640, 224, 0.875) == (256, 341, 16, 58)
    assert resize_geometry(640, 480, 224, 0.875) == (341, 256, 58, 16)
    assert resize_geometry(28, 28, 28, 1.0) == (28, 28, 0, 0)
    assert resize_geometry(28, 28, 64, 1.0) == (64, 64, 0, 0)


def test_center_crop_takes_the_middle():
    # 100 wide, 60 high; input 60 at crop_pct 1.0: no resize, crop columns 20..79.
    columns = np.tile(np.arange(100, dtype=np.uint8), (60, 1))
    spec = dataclasses.replace(get_preprocessing("fashion-mnist"), mean=(0.0,), std=(1.0,))
    out = preprocess_image(Image.fromarray(columns), 60, spec, 1)
    np.testing.assert_allclose(out[0] * 255, np.tile(np.arange(20, 80), (60, 1)), atol=1e-3)


def test_matches_a_straightforward_reference():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    spec = get_preprocessing("imagenet")
    out = preprocess_image(Image.fromarray(pixels), 64, spec, 3)
    # Reference: shorter side 90 -> int(64 / 0.875) = 73, long side int(73 * 120 / 90) = 97,
    # crop 64 from the middle, scale, normalize.
    resized = Image.fromarray(pixels).resize((97, 73), Image.Resampling.BILINEAR)
    top, left = round((73 - 64) / 2), round((97 - 64) / 2)
    crop = np.asarray(resized, np.float64)[top : top + 64, left : left + 64] / 255
    reference = ((crop - spec.mean) / spec.std).transpose(2, 0, 1)
    np.testing.assert_allclose(out, reference, atol=1e-5)


def test_gray_spec_with_three_channel_model_replicates():
    spec = get_preprocessing("fashion-mnist")
    out = preprocess_image(Image.new("L", (28, 28), 128), 28, spec, 3)
    assert out.shape == (3, 28, 28)
    np.testing.assert_allclose(out, (128 / 255 - 0.2860) / 0.3530, atol=1e-5)


def test_grayscale_image_for_rgb_spec_uses_each_channels_statistics():
    spec = get_preprocessing("imagenet")
    out = preprocess_image(Image.new("L", (40, 40), 100), 32, spec, 3)
    expected = (100 / 255 - np.asarray(spec.mean)) / np.asarray(spec.std)
    np.testing.assert_allclose(out[:, 5, 5], expected, atol=1e-5)


def test_rgb_spec_with_one_channel_model_uses_luminance_before_normalizing():
    spec = get_preprocessing("imagenet")
    out = preprocess_image(Image.new("RGB", (32, 32), (255, 0, 0)), 32, spec, 1)
    weights = np.asarray(LUMINANCE)
    luma = round(255 * 0.299) / 255  # PIL's 8-bit "L" of pure red
    expected = (luma - weights @ spec.mean) / (weights @ spec.std)
    assert out.shape == (1, 32, 32)
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["CMYK", "LA", "RGBA", "P", "1", "YCbCr"])
def test_other_pil_modes_are_converted(mode):
    image = Image.new("RGB", (48, 48), (10, 200, 30)).convert(mode)
    for spec in PREPROCESSING.values():
        out = preprocess_image(image, 32, spec, 3)
        assert out.shape == (3, 32, 32) and np.isfinite(out).all()


def test_sixteen_bit_images_are_scaled_not_clipped():
    image = Image.fromarray(np.full((32, 32), 32768, np.uint16))
    spec = dataclasses.replace(get_preprocessing("fashion-mnist"), mean=(0.0,), std=(1.0,))
    out = preprocess_image(image, 32, spec, 1)
    np.testing.assert_allclose(out, 128 / 255, atol=1e-5)


def test_unconvertible_image_is_a_pipeline_error():
    image = Image.new("LAB", (16, 16))
    with pytest.raises(PipelineError) as excinfo:
        preprocess_image(image, 16, get_preprocessing("fashion-mnist"), 1)
    assert "LAB" in one_line_error(excinfo)


@pytest.mark.parametrize("in_chans", [2, 4])
def test_channel_counts_that_cannot_be_adapted(in_chans):
    with pytest.raises(PipelineError) as excinfo:
        preprocess_image(Image.new("RGB", (16, 16)), 16, get_preprocessing("imagenet"), in_chans)
    assert str(in_chans) in one_line_error(excinfo)


def test_bad_input_size():
    with pytest.raises(PipelineError):
        preprocess_image(Image.new("RGB", (16, 16)), 0, get_preprocessing("imagenet"), 3)


# --- batches -----------------------------------------------------------------------------------


def smooth_batch(n=3, height=70, width=50, channels=3) -> np.ndarray:
    """Images without pixel-level noise, where PIL's and torch's resizes agree closely."""
    y = np.linspace(0, 1, height)[:, None, None]
    x = np.linspace(0, 1, width)[None, :, None]
    c = np.linspace(0.2, 1, channels)[None, None, :]
    base = (y * 0.6 + x * 0.4) * c
    return np.stack([np.clip((base + k * 0.05) * 255, 0, 255) for k in range(n)]).astype(np.uint8)


@pytest.mark.parametrize("name", sorted(PREPROCESSING))
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_batch_path_agrees_with_image_path(name, interpolation):
    spec = dataclasses.replace(get_preprocessing(name), interpolation=interpolation)
    batch = smooth_batch()
    fast = preprocess_array(batch, 32, spec, 3)
    slow = np.stack([preprocess_image(Image.fromarray(image), 32, spec, 3) for image in batch])
    assert fast.shape == slow.shape == (3, 3, 32, 32) and fast.dtype == np.float32
    # Within about two gray levels after normalization.
    assert np.abs(fast - slow).max() < 2.5 / 255 / min(spec.std)


def test_batch_layouts_give_the_same_result():
    spec = get_preprocessing("imagenet")
    nhwc = smooth_batch()
    reference = preprocess_array(nhwc, 24, spec, 3)
    np.testing.assert_array_equal(preprocess_array(nhwc.transpose(0, 3, 1, 2), 24, spec, 3), reference)
    np.testing.assert_array_equal(preprocess_array(nhwc, 24, spec, 3, layout="NHWC"), reference)
    rgba = np.concatenate([nhwc, np.full(nhwc.shape[:3] + (1,), 7, np.uint8)], axis=3)
    np.testing.assert_array_equal(preprocess_array(rgba, 24, spec, 3), reference)
    np.testing.assert_allclose(preprocess_array(nhwc.astype(np.float32) / 255, 24, spec, 3), reference, atol=1e-5)


def test_gray_batch_without_resize_is_exact():
    raw = np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    out = preprocess_array(raw, 28, get_preprocessing("fashion-mnist"), 3)
    expected = (raw.astype(np.float32) / 255 - 0.2860) / 0.3530
    assert out.shape == (5, 3, 28, 28)
    for channel in range(3):
        np.testing.assert_allclose(out[:, channel], expected, atol=1e-6)


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((2, 5, 8, 8), np.uint8),  # no channel axis of size 1, 3 or 4
        np.zeros((2, 8, 8, 2), np.uint8),
        np.zeros((8, 8), np.uint8),
        np.full((2, 8, 8), 3.5, np.float32),  # floats outside [0, 1]
        np.zeros((2, 8, 8), np.int64),
    ],
)
def test_bad_batches_are_pipeline_errors(array):
    with pytest.raises(PipelineError) as excinfo:
        preprocess_array(array, 8, get_preprocessing("fashion-mnist"), 1)
    one_line_error(excinfo)


def test_ten_thousand_images_preprocess_in_seconds():
    raw = np.random.default_rng(2).integers(0, 256, (10_000, 28, 28), dtype=np.uint8)
    start = time.perf_counter()
    out = preprocess_array(raw, 56, get_preprocessing("fashion-mnist"), 1)
    assert out.shape == (10_000, 1, 56, 56)
    # Generous: the machine is shared; the per-image PIL path takes far longer.
    assert time.perf_counter() - start < 20
