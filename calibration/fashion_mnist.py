"""Fashion-MNIST from the Debian package `dataset-fashion-mnist`.

The package installs the four original gzipped IDX files in
/usr/share/datasets/fashion-mnist/. The reader is strict: a wrong magic
number, a header that disagrees with the file size, or a gzip error means the
file is damaged, and the error says how to reinstall it.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from calibration.preprocess import Preprocessing, get_preprocessing, preprocess_array
from pipeline.errors import PipelineError

APT_PACKAGE = "dataset-fashion-mnist"
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "FASHION_MNIST_DIR"

SPLITS = ("train", "test")
# split -> (images file, labels file), as the package (and the original release) names them.
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# Label index -> name, from the dataset's README.
CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

# IDX magic numbers: 0x08 (unsigned byte) in the third byte, number of dimensions in the fourth.
IMAGES_MAGIC = 2051  # 0x00000803: ubyte, 3 dims
LABELS_MAGIC = 2049  # 0x00000801: ubyte, 1 dim

_REINSTALL = f"reinstall it with `apt-get install --reinstall {APT_PACKAGE}`"


def dataset_dir(directory: str | os.PathLike | None = None) -> Path:
    """Where the IDX files are: the argument, else $FASHION_MNIST_DIR, else the package's folder."""
    if directory is not None:
        return Path(directory)
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise PipelineError(f"unknown Fashion-MNIST split '{split}'; use 'train' or 'test'")
    return split


def split_paths(split: str, directory: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(images file, labels file) of a split."""
    root = dataset_dir(directory)
    images, labels = FILES[check_split(split)]
    return root / images, root / labels


def available(directory: str | os.PathLike | None = None) -> bool:
    """Whether all four IDX files exist (they may still be corrupt)."""
    return all(path.is_file() for split in SPLITS for path in split_paths(split, directory))


def read_idx(path: Path, magic: int) -> np.ndarray:
    """A gzipped IDX file of unsigned bytes -> uint8 array shaped by its header."""
    if not path.is_file():
        raise PipelineError(
            f"Fashion-MNIST file '{path}' is missing; install it with `apt-get install {APT_PACKAGE}` "
            f"(or set {ENV_VAR} to a folder holding it), or pass --data PATH to your own images"
        )
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
    except EOFError as exc:
        raise PipelineError(f"Fashion-MNIST file '{path}' is truncated ({exc}); {_REINSTALL}") from None
    except (OSError, zlib.error) as exc:
        raise PipelineError(f"Fashion-MNIST file '{path}' is corrupt ({exc}); {_REINSTALL}") from None
    if len(data) < 4:
        raise PipelineError(f"Fashion-MNIST file '{path}' is truncated (no IDX header); {_REINSTALL}")
    (found,) = struct.unpack(">i", data[:4])
    if found != magic:
        raise PipelineError(
            f"Fashion-MNIST file '{path}' has magic number {found}, expected {magic}; {_REINSTALL}"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise PipelineError(f"Fashion-MNIST file '{path}' is truncated (short IDX header); {_REINSTALL}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise PipelineError(
            f"Fashion-MNIST file '{path}' is {what} ({len(data)} bytes, header says {expected}); {_REINSTALL}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_raw(split: str = "test", directory: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels uint8 (N,)) of a split: train 60 000, test 10 000."""
    images_path, labels_path = split_paths(split, directory)
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if len(images) != len(labels):
        raise PipelineError(
            f"Fashion-MNIST '{images_path}' has {len(images)} images but '{labels_path}' has "
            f"{len(labels)} labels; {_REINSTALL}"
        )
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise PipelineError(
            f"Fashion-MNIST file '{labels_path}' has label {labels.max()}, labels are 0..9; {_REINSTALL}"
        )
    return images, labels


def preprocess(
    images: np.ndarray,
    input_size: int,
    in_chans: int,
    spec: Preprocessing | None = None,
) -> np.ndarray:
    """Raw (N, 28, 28) uint8 images -> float32 (N, in_chans, input_size, input_size).

    `spec` defaults to the "fashion-mnist" row; pass the model's own row when a
    model trained elsewhere (e.g. on ImageNet) is evaluated on these images.
    """
    return preprocess_array(images, input_size, spec or get_preprocessing("fashion-mnist"), in_chans, layout="NHW")
