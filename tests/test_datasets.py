from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calibration.datasets import Dataset, load_dataset
from calibration.preprocess import get_preprocessing, preprocess_array
from pipeline.errors import PipelineError

IMAGENET = get_preprocessing("imagenet")
CLASS_COLORS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "bird": (30, 30, 200)}


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def save(path: Path, color=(120, 60, 30), mode="RGB", size=(64, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image")
    return path


def red_channel_value(color) -> float:
    return (color[0] / 255 - IMAGENET.mean[0]) / IMAGENET.std[0]


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """3 classes x 3 images, one corrupt file, a non-image file and a hidden folder."""
    root = tmp_path / "folder"
    for name, color in CLASS_COLORS.items():
        for i in range(3):
            save(root / name / f"{i}.png", color)
    corrupt(root / "dog" / "broken.jpg")
    (root / "cat" / "notes.txt").write_text("not an image")
    save(root / ".ipynb_checkpoints" / "x.png")
    return root


@pytest.fixture
def numbered_folder(tmp_path) -> Path:
    """20 gray images whose value encodes their index, in file-name order."""
    root = tmp_path / "numbered"
    for i in range(20):
        save(root / f"{i:02d}.png", 10 * i, mode="L", size=(16, 16))
    return root


def gray_values(dataset: Dataset) -> list[int]:
    spec = get_preprocessing("fashion-mnist")
    return [round((float(img[0, 0, 0]) * spec.std[0] + spec.mean[0]) * 255) for img in dataset.images]


# --- folders -----------------------------------------------------------------------------------


def test_image_folder_is_labeled_by_sorted_class_names(image_folder):
    data = load_dataset(str(image_folder), 32, "imagenet")
    assert len(data) == 9 and data.images.shape == (9, 3, 32, 32) and data.images.dtype == np.float32
    assert data.class_names == ["bird", "cat", "dog"]
    assert data.labels.dtype == np.int64 and data.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for image, label in zip(data.images, data.labels):
        color = CLASS_COLORS[data.class_names[label]]
        assert image[0, 0, 0] == pytest.approx(red_channel_value(color), abs=1e-5)
    assert [Path(p).name for p, _ in data.skipped] == ["broken.jpg"]
    assert "UnidentifiedImageError" in data.skipped[0][1]
    assert "3 classes" in data.description and "skipped 1 unreadable" in data.description


def test_flat_folder_is_unlabeled(numbered_folder):
    data = load_dataset(str(numbered_folder), 16, "fashion-mnist", in_chans=1)
    assert len(data) == 20 and data.labels is None and data.class_names is None
    assert gray_values(data) == [10 * i for i in range(20)]


def test_extensions_are_case_insensitive(tmp_path):
    save(tmp_path / "flat" / "A.PNG")
    save(tmp_path / "flat" / "b.JpEg")
    save(tmp_path / "flat" / "c.bmp")
    (tmp_path / "flat" / "d.gif").write_bytes(b"GIF89a")  # not in the list: ignored
    assert len(load_dataset(str(tmp_path / "flat"), 16, "imagenet")) == 3


def test_missing_folder_names_every_kind_of_source(tmp_path):
    with pytest.raises(PipelineError) as excinfo:
        load_dataset(str(tmp_path / "nope"), 32, "imagenet")
    assert one_line_error(excinfo) == (
        f"image folder '{tmp_path / 'nope'}' does not exist; pass --data PATH to an ImageFolder, "
        "a flat image folder, a .npy/.npz file, a list file, or 'fashion-mnist'"
    )


def test_empty_folder(tmp_path):
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    with pytest.raises(PipelineError) as excinfo:
        load_dataset(str(tmp_path / "empty"), 32, "imagenet")
    assert "no images" in one_line_error(excinfo)


def test_all_unreadable(tmp_path):
    corrupt(tmp_path / "bad" / "a.jpg")
    corrupt(tmp_path / "bad" / "b.png")
    with pytest.raises(PipelineError) as excinfo:
        load_dataset(str(tmp_path / "bad"), 32, "imagenet")
    assert "all 2 image files" in one_line_error(excinfo)


def test_truncated_image_is_skipped(tmp_path):
    good = save(tmp_path / "flat" / "good.png")
    save(tmp_path / "flat" / "cut.jpg")
    cut = tmp_path / "flat" / "cut.jpg"
    cut.write_bytes(cut.read_bytes()[:200])
    data = load_dataset(str(tmp_path / "flat"), 16, "imagenet")
    assert len(data) == 1 and data.skipped[0][0] == str(cut) and good.exists()


def test_min_images(image_folder):
    with pytest.raises(PipelineError) as excinfo:
        load_dataset(str(image_folder), 32, "imagenet", min_images=10)
    message = one_line_error(excinfo)
    assert "9 usable images" in message and "at least 10" in message


def test_limit_larger_than_available_uses_what_there_is(numbered_folder):
    data = load_dataset(str(numbered_folder), 16, "imagenet", limit=256)
    assert len(data) == 20
    assert "asked for 256 images, folder has 20: using 20" in data.description


def test_sampling_is_deterministic_and_sorted(numbered_folder):
    def subset(seed):
        return gray_values(load_dataset(str(numbered_folder), 16, "fashion-mnist", in_chans=1, limit=5, seed=seed))

    first = subset(0)
    assert len(first) == 5 and first == sorted(first)
    assert subset(0) == first
    assert subset(1) != first


def test_unreadable_files_are_replaced_when_sampling(numbered_folder):
    for i in range(5):
        corrupt(numbered_folder / f"x{i}.jpg")
    data = load_dataset(str(numbered_folder), 16, "imagenet", limit=18, seed=3)
    assert len(data) == 18 and len(data.skipped) >= 3


def test_mixed_modes_in_one_folder(tmp_path):
    root = tmp_path / "modes"
    save(root / "gray.png", 90, mode="L")
    save(root / "la.png", (90, 128), mode="LA")
    save(root / "cmyk.jpg", (0, 50, 100, 0), mode="CMYK")
    save(root / "rgba.png", (1, 2, 3, 4), mode="RGBA")
    Image.new("RGB", (64, 64), (5, 6, 7)).convert("P").save(root / "palette.png", transparency=0)
    Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(root / "deep.png")
    Image.new("RGB", (64, 64), (5, 6, 7)).save(root / "photo.webp")
    Image.new("RGB", (64, 64), (5, 6, 7)).save(root / "photo.tiff")
    data = load_dataset(str(root), 32, "imagenet", in_chans=3)
    assert len(data) == 8 and not data.skipped
    assert data.images.shape == (8, 3, 32, 32) and np.isfinite(data.images).all()
    gray = load_dataset(str(root), 32, "fashion-mnist", in_chans=1)
    assert gray.images.shape == (8, 1, 32, 32)


def test_gray_image_for_three_channel_model(tmp_path):
    save(tmp_path / "g" / "gray.png", 128, mode="L")
    data = load_dataset(str(tmp_path / "g"), 32, "fashion-mnist", in_chans=3)
    assert data.images.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(data.images[0], (128 / 255 - 0.2860) / 0.3530, atol=1e-5)


def test_progress_goes_to_stderr(numbered_folder, capsys):
    load_dataset(str(numbered_folder), 16, "imagenet", progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert 5 <= len(lines) <= 11 and lines[-1].endswith("20/20 images (100%)")


def test_bad_arguments(numbered_folder):
    with pytest.raises(PipelineError):
        load_dataset(str(numbered_folder), 16, "cifar")
    with pytest.raises(PipelineError):
        load_dataset(str(numbered_folder), 16, "imagenet", limit=0)
    with pytest.raises(PipelineError):
        load_dataset(str(numbered_folder / "00.png"), 16, "imagenet")


# --- arrays ------------------------------------------------------------------------------------


def test_npy_uint8_images_are_preprocessed(tmp_path):
    raw = np.random.default_rng(0).integers(0, 256, (6, 40, 30, 3), dtype=np.uint8)
    np.save(tmp_path / "raw.npy", raw)
    data = load_dataset(str(tmp_path / "raw.npy"), 24, "imagenet")
    np.testing.assert_array_equal(data.images, preprocess_array(raw, 24, IMAGENET, 3))
    assert data.labels is None and "preprocessed with 'imagenet'" in data.description


def test_npy_preprocessed_floats_are_used_as_is(tmp_path):
    ready = np.random.default_rng(0).standard_normal((6, 3, 24, 24)).astype(np.float32)
    np.save(tmp_path / "ready.npy", ready)
    data = load_dataset(str(tmp_path / "ready.npy"), 24, "imagenet")
    np.testing.assert_array_equal(data.images, ready)
    assert "already preprocessed" in data.description


def test_npy_gray_batch(tmp_path):
    raw = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "gray.npy", raw)
    data = load_dataset(str(tmp_path / "gray.npy"), 28, "fashion-mnist", in_chans=1)
    np.testing.assert_allclose(data.images[:, 0], (raw / 255 - 0.2860) / 0.3530, atol=1e-6)


def test_npy_wrong_channel_count(tmp_path):
    np.save(tmp_path / "two.npy", np.zeros((4, 2, 16, 16), np.uint8))
    with pytest.raises(PipelineError) as excinfo:
        load_dataset(str(tmp_path / "two.npy"), 16, "imagenet")
    assert "two.npy" in one_line_error(excinfo)


def test_array_conversions_are_said_in_one_line_on_stderr(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "odd.npz", images=rng.integers(0, 256, (3, 5, 7), dtype=np.uint8))
    data = load_dataset(str(tmp_path / "odd.npz"), 32, "imagenet", in_chans=3)
    assert data.images.shape == (3, 3, 32, 32)
    assert capsys.readouterr().err == (
        f"note: '{tmp_path / 'odd.npz'}': 3 images of 1x5x7, read as (N,H,W), converted to the model's 3x32x32: "
        "gray to RGB, as preprocessing 'imagenet' reads images; resized from 5x7 to 36x50 (bilinear); "
        "center-cropped to 32x32\n"
    )
    assert "resized from 5x7" in data.description
    np.save(tmp_path / "rgb.npy", rng.integers(0, 256, (4, 3, 28, 28), dtype=np.uint8))
    gray = load_dataset(str(tmp_path / "rgb.npy"), 28, "fashion-mnist", in_chans=1)
    assert gray.images.shape == (4, 1, 28, 28)
    assert capsys.readouterr().err == (
        f"note: '{tmp_path / 'rgb.npy'}': 4 images of 3x28x28, read as (N,C,H,W), converted to the model's 1x28x28: "
        "RGB to gray (luminance), as preprocessing 'fashion-mnist' reads images\n"
    )
    # No line when nothing but scaling and normalizing happens.
    np.save(tmp_path / "gray.npy", rng.integers(0, 256, (4, 1, 28, 28), dtype=np.uint8))
    load_dataset(str(tmp_path / "gray.npy"), 28, "fashion-mnist", in_chans=1)
    assert capsys.readouterr().err == ""


def test_a_three_channel_preprocessing_for_a_one_channel_model_is_said(numbered_folder, capsys):
    load_dataset(str(numbered_folder), 16, "imagenet", in_chans=1, limit=2)
    assert capsys.readouterr().err == (
        f"note: '{numbered_folder}': gray (luminance) for the 1-channel model, normalized with the "
        "luminance-weighted mean and std of preprocessing 'imagenet'\n"
    )


def test_normalized_floats_of_another_shape_are_refused_not_converted(tmp_path):
    normalized = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "ready.npy", normalized)
    with pytest.raises(PipelineError) as excinfo:
        load_dataset(str(tmp_path / "ready.npy"), 32, "fashion-mnist", in_chans=1)
    assert one_line_error(excinfo) == (
        f"'{tmp_path / 'ready.npy'}' holds normalized float images of shape (3, 32, 32), not the model's "
        "(1, 32, 32); preprocessed images are not converted: save them at (1, 32, 32), or save raw uint8 "
        "pixels to preprocess with 'fashion-mnist'"
    )


def test_npz_with_labels_and_sampling(tmp_path):
    raw = np.arange(30, dtype=np.uint8).repeat(64).reshape(30, 8, 8)
    labels = np.arange(30) % 4
    np.savez(tmp_path / "d.npz", images=raw, labels=labels, class_names=np.array(["a", "b", "c", "d"]))
    data = load_dataset(str(tmp_path / "d.npz"), 8, "fashion-mnist", in_chans=1, limit=7, seed=5)
    values = gray_values(data)
    assert len(values) == 7 and values == sorted(values)
    assert data.labels.tolist() == [v % 4 for v in values] and data.labels.dtype == np.int64
    assert data.class_names == ["a", "b", "c", "d"]
    again = load_dataset(str(tmp_path / "d.npz"), 8, "fashion-mnist", in_chans=1, limit=7, seed=5)
    assert gray_values(again) == values


def test_npz_problems(tmp_path):
    np.savez(tmp_path / "noimages.npz", pixels=np.zeros((2, 8, 8), np.uint8))
    np.savez(tmp_path / "badlabels.npz", images=np.zeros((2, 8, 8), np.uint8), labels=np.zeros(3, np.int64))
    (tmp_path / "garbage.npy").write_bytes(b"not numpy")
    for name, needle in [("noimages.npz", "'images'"), ("badlabels.npz", "labels"), ("garbage.npy", "numpy")]:
        with pytest.raises(PipelineError) as excinfo:
            load_dataset(str(tmp_path / name), 8, "fashion-mnist", in_chans=1)
        assert needle in one_line_error(excinfo)


# --- list files --------------------------------------------------------------------------------


def test_list_file_with_labels_relative_and_absolute_paths(tmp_path):
    save(tmp_path / "imgs" / "a.png", (255, 0, 0))
    save(tmp_path / "imgs" / "b c.png", (0, 255, 0))
    absolute = save(tmp_path / "elsewhere" / "d.png", (0, 0, 255))
    listing = tmp_path / "lists" / "val.txt"
    listing.parent.mkdir()
    listing.write_text(f"# calibration set\n../imgs/a.png 2\n\n../imgs/b c.png 0\n{absolute} 1\n../imgs/gone.png 1\n")
    data = load_dataset(str(listing), 16, "imagenet")
    assert len(data) == 3 and data.labels.tolist() == [2, 0, 1]
    assert data.images[0, 0, 0, 0] == pytest.approx(red_channel_value((255, 0, 0)), abs=1e-5)
    assert [Path(p).name for p, _ in data.skipped] == ["gone.png"]


def test_list_file_without_labels(tmp_path):
    save(tmp_path / "a.png")
    (tmp_path / "l.txt").write_text("a.png\n")
    data = load_dataset(str(tmp_path / "l.txt"), 16, "imagenet")
    assert len(data) == 1 and data.labels is None


def test_list_file_mixing_labeled_and_unlabeled_lines(tmp_path):
    save(tmp_path / "a.png")
    (tmp_path / "l.txt").write_text("a.png 1\na.png\n")
    with pytest.raises(PipelineError) as excinfo:
        load_dataset(str(tmp_path / "l.txt"), 16, "imagenet")
    assert "line 2" in one_line_error(excinfo)


def test_empty_list_file(tmp_path):
    (tmp_path / "l.txt").write_text("# nothing\n")
    with pytest.raises(PipelineError):
        load_dataset(str(tmp_path / "l.txt"), 16, "imagenet")
