import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from calibration import fashion_mnist
from calibration.datasets import load_dataset
from calibration.fashion_mnist import CLASS_NAMES, DEFAULT_DIR, FILES, load_raw
from pipeline.errors import PipelineError

REINSTALL = "apt-get install --reinstall dataset-fashion-mnist"

needs_package = pytest.mark.skipif(
    not fashion_mnist.available(DEFAULT_DIR),
    reason=f"needs the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) in {DEFAULT_DIR}",
)


@pytest.fixture(autouse=True)
def package_dir(monkeypatch):
    # Tests choose the folder themselves; a developer's own setting must not leak in.
    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = (0x0800 | array.ndim) if magic is None else magic
    return struct.pack(">i", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def write_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    images_name, labels_name = FILES[split]
    (folder / images_name).write_bytes(gzip.compress(idx_bytes(images)))
    (folder / labels_name).write_bytes(gzip.compress(idx_bytes(labels)))


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A well-formed 12-image test split in the package's layout."""
    images = np.arange(12 * 28 * 28, dtype=np.int64).reshape(12, 28, 28) % 256
    write_split(tmp_path / "tiny", "test", images, np.arange(12) % 10)
    return tmp_path / "tiny"


# --- the real package --------------------------------------------------------------------------


@needs_package
def test_test_split_loads():
    images, labels = load_raw("test")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,) and labels.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    assert labels[0] == 9 and CLASS_NAMES[labels[0]] == "Ankle boot"


@needs_package
def test_train_split_loads():
    images, labels = load_raw("train")
    assert images.shape == (60_000, 28, 28)
    assert np.bincount(labels).tolist() == [6000] * 10


@needs_package
def test_load_dataset_native_size_is_exact():
    data = load_dataset("fashion-mnist", 28, "fashion-mnist", in_chans=1)
    raw, labels = load_raw("test")
    assert len(data) == 10_000 and data.images.shape == (10_000, 1, 28, 28)
    np.testing.assert_allclose(data.images[:, 0], (raw / 255 - 0.2860) / 0.3530, atol=1e-5)
    assert data.labels.dtype == np.int64 and np.array_equal(data.labels, labels)
    assert data.class_names == CLASS_NAMES and data.source == "fashion-mnist:test"


@needs_package
def test_load_dataset_train_split_sampled_resized_rgb():
    data = load_dataset("fashion-mnist:train", 32, "fashion-mnist", in_chans=3, limit=64, seed=1)
    assert data.images.shape == (64, 3, 32, 32) and data.source == "fashion-mnist:train"
    assert np.array_equal(data.images[:, 0], data.images[:, 2])
    again = load_dataset("fashion-mnist", 32, "fashion-mnist", in_chans=3, limit=64, seed=1, split="train")
    assert np.array_equal(data.images, again.images) and np.array_equal(data.labels, again.labels)
    other = load_dataset("fashion-mnist:train", 32, "fashion-mnist", in_chans=3, limit=64, seed=2)
    assert not np.array_equal(data.labels, other.labels) or not np.array_equal(data.images, other.images)


@needs_package
def test_truncated_copy_names_the_file_and_the_reinstall(tmp_path, monkeypatch):
    for name in FILES["test"]:
        shutil.copy(DEFAULT_DIR / name, tmp_path / name)
    images_file = tmp_path / FILES["test"][0]
    images_file.write_bytes(images_file.read_bytes()[:100_000])  # cut gzip stream
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path))
    with pytest.raises(PipelineError) as excinfo:
        load_dataset("fashion-mnist", 28, "fashion-mnist", in_chans=1)
    message = one_line_error(excinfo)
    assert "truncated" in message and str(images_file) in message and REINSTALL in message


@needs_package
def test_bad_magic_copy(tmp_path, monkeypatch):
    for name in FILES["test"]:
        shutil.copy(DEFAULT_DIR / name, tmp_path / name)
    labels_file = tmp_path / FILES["test"][1]
    data = bytearray(gzip.decompress(labels_file.read_bytes()))
    data[3] = 0x03  # 2049 -> 2051
    labels_file.write_bytes(gzip.compress(bytes(data)))
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path))
    with pytest.raises(PipelineError) as excinfo:
        load_raw("test")
    message = one_line_error(excinfo)
    assert str(labels_file) in message and "2051" in message and "2049" in message and REINSTALL in message


# --- the parser, on small synthetic files ------------------------------------------------------


def test_directory_argument_and_env_var(tiny, monkeypatch):
    images, labels = load_raw("test", directory=tiny)
    assert images.shape == (12, 28, 28) and labels.tolist() == [i % 10 for i in range(12)]
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tiny))
    assert fashion_mnist.dataset_dir() == tiny
    assert fashion_mnist.dataset_dir("/elsewhere") == Path("/elsewhere")
    data = load_dataset("fashion-mnist", 28, "fashion-mnist", in_chans=1, limit=100)
    assert len(data) == 12 and "asked for 100 images, split has 12: using 12" in data.description


def test_other_preprocessing_rows_are_respected(tiny, monkeypatch):
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tiny))
    data = load_dataset("fashion-mnist", 32, "imagenet", in_chans=3)
    # Imagenet statistics per channel on a replicated gray image: the channels differ.
    assert data.images.shape == (12, 3, 32, 32)
    assert not np.allclose(data.images[:, 0], data.images[:, 1])


def test_missing_files_name_the_package_and_the_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path / "absent"))
    with pytest.raises(PipelineError) as excinfo:
        load_dataset("fashion-mnist", 28, "fashion-mnist", in_chans=1)
    message = one_line_error(excinfo)
    assert "apt-get install dataset-fashion-mnist" in message and "--data PATH" in message
    assert str(tmp_path / "absent" / FILES["test"][0]) in message


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda raw: gzip.compress(raw[:-10]), "truncated"),
        (lambda raw: gzip.compress(raw + b"\0"), "longer"),
        (lambda raw: gzip.compress(raw[:6]), "truncated"),
        (lambda raw: gzip.compress(b"\0\0\x08\x01" + raw[4:]), "magic number 2049"),
        (lambda raw: raw, "corrupt"),  # not gzip at all
        (lambda raw: gzip.compress(raw)[:-20], "truncated"),
    ],
)
def test_damaged_images_file(tiny, damage, needle):
    images_file = tiny / FILES["test"][0]
    images_file.write_bytes(damage(gzip.decompress(images_file.read_bytes())))
    with pytest.raises(PipelineError) as excinfo:
        load_raw("test", directory=tiny)
    message = one_line_error(excinfo)
    assert needle in message and str(images_file) in message and REINSTALL in message


def test_count_mismatch_and_bad_labels(tmp_path):
    images = np.zeros((3, 28, 28), np.uint8)
    write_split(tmp_path / "a", "test", images, np.array([0, 1]))
    with pytest.raises(PipelineError) as excinfo:
        load_raw("test", directory=tmp_path / "a")
    assert "3 images" in one_line_error(excinfo)
    write_split(tmp_path / "b", "test", images, np.array([0, 1, 12]))
    with pytest.raises(PipelineError) as excinfo:
        load_raw("test", directory=tmp_path / "b")
    assert "label 12" in one_line_error(excinfo)


def test_unknown_split():
    with pytest.raises(PipelineError) as excinfo:
        load_dataset("fashion-mnist:val", 28, "fashion-mnist", in_chans=1)
    assert "'val'" in one_line_error(excinfo)
