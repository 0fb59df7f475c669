"""Image datasets for calibration and evaluation, all read through one entry point.

`load_dataset(source, ...)` accepts:

- "fashion-mnist", "fashion-mnist:train", "fashion-mnist:test" (Debian package `dataset-fashion-mnist`);
- "sample-photos": a few real color photos shipped in installed wheels, with ImageNet-1k
  labels and class names (see calibration.sample_photos);
- an ImageFolder directory (one sub-folder per class; class index = sorted folder names);
- a flat directory of images (unlabeled);
- a .npy array (N,C,H,W), (N,H,W,C) or (N,H,W), or a .npz with `images` and optional
  `labels` and `class_names`;
- a .txt list file: one image path per line with an optional integer label.

Every source is preprocessed with the same `Preprocessing` row. Sampling is
deterministic: the candidates are shuffled with numpy's Generator(seed) and the
first `limit` usable ones are kept, in their original order.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from calibration import fashion_mnist, sample_photos
from calibration.preprocess import (
    Preprocessing,
    array_conversions,
    channel_adaptation,
    preprocess_array,
    preprocess_image,
    resolve_preprocessing,
)
from pipeline.errors import PipelineError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")

_SOURCES_HINT = (
    "pass --data PATH to an ImageFolder, a flat image folder, a .npy/.npz file, a list file, or 'fashion-mnist'"
)

# What PIL raises for files that are not (whole) images.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, PipelineError)


@dataclass(frozen=True, eq=False)
class Dataset:
    """Preprocessed images ready to feed a model, with where they came from."""

    images: np.ndarray  # (N, C, H, W) float32, normalized
    labels: np.ndarray | None  # (N,) int64, or None for unlabeled sources
    class_names: list[str] | None
    source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) per unreadable file
    description: str = ""

    def __len__(self) -> int:
        return len(self.images)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def sample_order(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Indices to try, in order: all of them, or a seeded shuffle when sampling."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.random.default_rng(seed).permutation(n)


def check_source(source: str) -> str:
    """What kind of source `source` names ("fashion-mnist", "sample-photos", "folder",
    "array file", "list file"), without reading any image: a source that cannot be read
    at all fails here, before a command starts its work."""
    source = str(source)
    if source == "fashion-mnist" or source.startswith("fashion-mnist:"):
        return "fashion-mnist"
    if source == sample_photos.SOURCE_NAME:
        return sample_photos.SOURCE_NAME
    path = Path(source).expanduser()
    if not path.exists():
        raise PipelineError(f"image folder '{source}' does not exist; {_SOURCES_HINT}")
    if path.is_dir():
        return "folder"
    if path.suffix.lower() in (".npy", ".npz"):
        return "array file"
    if path.suffix.lower() == ".txt":
        return "list file"
    raise PipelineError(f"'{source}' is not a folder, .npy, .npz or .txt list file; {_SOURCES_HINT}")


def class_names(source: str) -> list[str] | None:
    """The class names a source declares (index = label), without decoding any image; None
    when it has none (flat folders, list files, bare arrays)."""
    kind = check_source(source)
    if kind == "fashion-mnist":
        return list(fashion_mnist.CLASS_NAMES)
    if kind == sample_photos.SOURCE_NAME:
        return sample_photos.imagenet_class_names()
    path = Path(source).expanduser()
    if kind == "folder":
        subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        # The same rule as _load_directory: an ImageFolder when any sub-folder holds images.
        if any(_images_under(d, recursive=True) for d in subdirs):
            return [d.name for d in subdirs]
        return None
    if kind == "array file" and path.suffix.lower() == ".npz":
        try:
            with np.load(path, allow_pickle=False) as loaded:
                return [str(n) for n in loaded["class_names"]] if "class_names" in loaded.files else None
        except (OSError, ValueError, EOFError):
            return None  # load_dataset says what is wrong with the file when it is read
    return None


def load_dataset(
    source: str,
    input_size: int,
    preprocessing: str | Preprocessing,
    in_chans: int = 3,
    limit: int | None = None,
    seed: int = 0,
    split: str = "test",
    min_images: int = 1,
    progress: bool = False,
) -> Dataset:
    """Read, sample and preprocess the images at `source` (see the module docstring).

    `limit` caps the image count (more than available is fine: all are used and
    `description` says so); unreadable image files are skipped and listed in
    `skipped`; fewer than `min_images` usable images is an error.
    """
    spec = resolve_preprocessing(preprocessing)
    if limit is not None and limit <= 0:
        raise PipelineError(f"image limit {limit} is not positive; pass a count >= 1 or no limit")
    source = str(source)
    kind = check_source(source)
    if kind != "array file":
        # Array files say this in their own line, with the rest of what was converted.
        adaptation = channel_adaptation(spec, in_chans)
        if adaptation:
            print(f"note: '{source}': {adaptation}", file=sys.stderr)
    if kind == "fashion-mnist":
        _, _, suffix = source.partition(":")
        dataset = _load_fashion_mnist(suffix or split, input_size, spec, in_chans, limit, seed)
    elif kind == sample_photos.SOURCE_NAME:
        dataset = _load_sample_photos(input_size, spec, in_chans, limit, seed, progress)
    else:
        path = Path(source).expanduser()
        if kind == "folder":
            dataset = _load_directory(path, input_size, spec, in_chans, limit, seed, progress)
        elif kind == "array file":
            dataset = _load_array_file(path, input_size, spec, in_chans, limit, seed)
        else:
            dataset = _load_list_file(path, input_size, spec, in_chans, limit, seed, progress)
    if len(dataset) < min_images:
        unreadable = f" ({len(dataset.skipped)} unreadable skipped)" if dataset.skipped else ""
        raise PipelineError(
            f"'{source}' has {len(dataset)} usable images{unreadable}, need at least {min_images}; "
            "add images or ask for fewer"
        )
    return dataset


def _count_note(limit: int | None, available: int, what: str) -> str:
    if limit is not None and limit > available:
        return f"asked for {limit} images, {what} has {available}: using {available}"
    used = available if limit is None else limit
    return f"{what} has {available} images: using {used}"


def _skipped_note(skipped: list[tuple[str, str]]) -> str:
    return f"; skipped {len(skipped)} unreadable" if skipped else ""


# --- Fashion-MNIST ---------------------------------------------------------------------------


def _load_fashion_mnist(
    split: str, input_size: int, spec: Preprocessing, in_chans: int, limit: int | None, seed: int
) -> Dataset:
    raw, labels = fashion_mnist.load_raw(fashion_mnist.check_split(split))
    chosen = np.sort(sample_order(len(raw), limit, seed)[: limit or len(raw)])
    images = fashion_mnist.preprocess(raw[chosen], input_size, in_chans, spec)
    return Dataset(
        images=images,
        labels=labels[chosen].astype(np.int64),
        class_names=list(fashion_mnist.CLASS_NAMES),
        source=f"fashion-mnist:{split}",
        skipped=[],
        description=f"Fashion-MNIST {split} split: " + _count_note(limit, len(raw), "split"),
    )


# --- image files -----------------------------------------------------------------------------


def _decode(path: Path, input_size: int, spec: Preprocessing, in_chans: int) -> np.ndarray:
    with Image.open(path) as image:
        image.load()
        return preprocess_image(image, input_size, spec, in_chans)


def _load_files(
    files: list[Path],
    labels: list[int] | None,
    input_size: int,
    spec: Preprocessing,
    in_chans: int,
    limit: int | None,
    seed: int,
    progress: bool,
    what: str,
) -> tuple[np.ndarray, np.ndarray | None, list[tuple[str, str]]]:
    """Decode up to `limit` files in seeded order, replacing unreadable ones with the next candidates."""
    target = len(files) if limit is None else min(limit, len(files))
    images = np.empty((target, in_chans, input_size, input_size), np.float32)
    kept: list[int] = []
    skipped: list[tuple[str, str]] = []
    step = max(1, target // 10)
    for index in sample_order(len(files), limit, seed):
        if len(kept) == target:
            break
        try:
            images[len(kept)] = _decode(files[index], input_size, spec, in_chans)
        except _DECODE_ERRORS as exc:
            skipped.append((str(files[index]), f"{type(exc).__name__}: {exc}"))
            continue
        kept.append(int(index))
        if progress and (len(kept) % step == 0 or len(kept) == target):
            print(f"{what}: {len(kept)}/{target} images ({100 * len(kept) // target}%)", file=sys.stderr)
    # Back to the files' own order, so a subset reads the same way every run.
    order = np.argsort(kept, kind="stable")
    images = images[: len(kept)][order]
    kept_sorted = np.asarray(kept, np.int64)[order]
    label_array = None if labels is None else np.asarray(labels, np.int64)[kept_sorted]
    return images, label_array, skipped


def _images_under(folder: Path, recursive: bool) -> list[Path]:
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p
        for p in candidates
        if p.is_file() and is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _load_directory(
    path: Path,
    input_size: int,
    spec: Preprocessing,
    in_chans: int,
    limit: int | None,
    seed: int,
    progress: bool,
) -> Dataset:
    # Hidden folders (.ipynb_checkpoints, .git) are never classes.
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = {d.name: _images_under(d, recursive=True) for d in subdirs}
    loose = _images_under(path, recursive=False)
    if any(per_class.values()):
        class_names = [d.name for d in subdirs]
        files = [f for name in class_names for f in per_class[name]]
        labels = [i for i, name in enumerate(class_names) for _ in per_class[name]]
        kind = "ImageFolder"
    elif loose:
        class_names, files, labels, kind = None, loose, None, "flat image folder"
    else:
        raise PipelineError(
            f"image folder '{path}' holds no images ({' '.join(IMAGE_EXTENSIONS)}); "
            "put images in it or in one sub-folder per class"
        )
    images, label_array, skipped = _load_files(
        files, labels, input_size, spec, in_chans, limit, seed, progress, what=str(path)
    )
    if len(images) == 0:
        first_path, first_reason = skipped[0]
        raise PipelineError(
            f"all {len(skipped)} image files in '{path}' are unreadable (e.g. '{first_path}': {first_reason}); "
            "replace them with valid images"
        )
    notes = [_count_note(limit, len(files), "folder")]
    if kind == "ImageFolder":
        notes.insert(0, f"{len(class_names)} classes")
        empty = [name for name in class_names if not per_class[name]]
        if empty:
            notes.append(f"classes without images: {', '.join(empty)}")
        if loose:
            notes.append(f"ignored {len(loose)} images outside class folders")
    return Dataset(
        images=images,
        labels=label_array,
        class_names=class_names,
        source=str(path),
        skipped=skipped,
        description=f"{kind} '{path}': " + ", ".join(notes) + _skipped_note(skipped),
    )


def _load_list_file(
    path: Path,
    input_size: int,
    spec: Preprocessing,
    in_chans: int,
    limit: int | None,
    seed: int,
    progress: bool,
) -> Dataset:
    files: list[Path] = []
    labels: list[int | None] = []
    line_numbers: list[int] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        label = None
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            line, label = parts[0], int(parts[1])
            if label < 0:
                raise PipelineError(f"'{path}' line {number} has label {label}; labels are integers >= 0")
        file = Path(line).expanduser()
        files.append(file if file.is_absolute() else path.parent / file)
        labels.append(label)
        line_numbers.append(number)
    if not files:
        raise PipelineError(f"list file '{path}' names no images; write one image path per line")
    labeled = [label is not None for label in labels]
    if any(labeled) and not all(labeled):
        number = line_numbers[labeled.index(not labeled[0])]
        raise PipelineError(
            f"list file '{path}' mixes labeled and unlabeled lines (line {number} differs from the first); "
            "label every line or none"
        )
    images, label_array, skipped = _load_files(
        files, labels if all(labeled) else None, input_size, spec, in_chans, limit, seed, progress, what=str(path)
    )
    if len(images) == 0:
        first_path, first_reason = skipped[0]
        raise PipelineError(
            f"all {len(skipped)} images listed in '{path}' are missing or unreadable "
            f"(e.g. '{first_path}': {first_reason}); fix the paths or the files"
        )
    return Dataset(
        images=images,
        labels=label_array,
        class_names=None,
        source=str(path),
        skipped=skipped,
        description=f"list file '{path}': " + _count_note(limit, len(files), "list") + _skipped_note(skipped),
    )


# --- sample photos ---------------------------------------------------------------------------


def _load_sample_photos(
    input_size: int, spec: Preprocessing, in_chans: int, limit: int | None, seed: int, progress: bool
) -> Dataset:
    """The packaged color photos (calibration.sample_photos), labeled with ImageNet-1k indices."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sample-photos-") as folder:
        listed = _load_list_file(sample_photos.photo_list(folder), input_size, spec, in_chans, limit, seed, progress)
    return Dataset(
        images=listed.images,
        labels=listed.labels,
        class_names=sample_photos.imagenet_class_names(),
        source=sample_photos.SOURCE_NAME,
        skipped=listed.skipped,
        description=f"{sample_photos.SOURCE_NAME} (real color photos from installed packages, ImageNet-1k labels): "
        + _count_note(limit, len(sample_photos.SAMPLE_PHOTOS), "set")
        + _skipped_note(listed.skipped),
    )


# --- arrays ----------------------------------------------------------------------------------


def _read_arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    try:
        # A memory-mapped .npy lets a sample of a large file read only the sampled images.
        loaded = np.load(path, allow_pickle=False, mmap_mode="r" if path.suffix.lower() == ".npy" else None)
    except (OSError, ValueError, EOFError) as exc:
        raise PipelineError(f"cannot read '{path}' as a numpy file ({exc}); save it with numpy.save/savez") from None
    if isinstance(loaded, np.ndarray):
        return loaded, None, None
    with loaded:
        if "images" not in loaded.files:
            raise PipelineError(
                f"'{path}' has arrays {', '.join(loaded.files) or '(none)'} but no 'images'; "
                "save it with numpy.savez(path, images=..., labels=...)"
            )
        images = loaded["images"]
        labels = loaded["labels"] if "labels" in loaded.files else None
        names = [str(n) for n in loaded["class_names"]] if "class_names" in loaded.files else None
    return images, labels, names


def _load_array_file(
    path: Path, input_size: int, spec: Preprocessing, in_chans: int, limit: int | None, seed: int
) -> Dataset:
    images, labels, class_names = _read_arrays(path)
    if images.ndim not in (3, 4) or len(images) == 0:
        raise PipelineError(
            f"'{path}' holds an array of shape {images.shape}; save a non-empty (N,C,H,W), (N,H,W,C) or (N,H,W) batch"
        )
    if labels is not None:
        if labels.shape != (len(images),) or labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):
            raise PipelineError(
                f"'{path}' labels have shape {labels.shape} and dtype {labels.dtype}; "
                f"save {len(images)} integer labels >= 0"
            )
    chosen = np.sort(sample_order(len(images), limit, seed)[: limit or len(images)])
    subset = images[chosen]
    model_shape = (in_chans, input_size, input_size)
    preprocessed = subset.dtype.kind == "f" and subset.shape[1:] == model_shape
    conversions: list[str] = []
    if preprocessed:
        if not np.isfinite(subset).all():
            raise PipelineError(f"'{path}' holds NaN or infinite values; save finite preprocessed images")
        result = subset.astype(np.float32, copy=False)
    else:
        if subset.dtype.kind == "f" and np.isfinite(subset).all() and (subset.min() < 0 or subset.max() > 1):
            # Normalized already, for some other model: the table converts raw pixels only.
            raise PipelineError(
                f"'{path}' holds normalized float images of shape {tuple(subset.shape[1:])}, not the model's "
                f"{model_shape}; preprocessed images are not converted: save them at {model_shape}, "
                f"or save raw uint8 pixels to preprocess with '{spec.name}'"
            )
        try:
            reading, conversions = array_conversions(subset.shape, input_size, spec, in_chans)
            result = preprocess_array(subset, input_size, spec, in_chans)
        except PipelineError as exc:
            raise PipelineError(f"'{path}': {exc}") from None
        if conversions:
            print(f"note: '{path}': {reading}, converted to the model's {'x'.join(map(str, model_shape))}: "
                  f"{'; '.join(conversions)}", file=sys.stderr)
    how = "already preprocessed" if preprocessed else f"preprocessed with '{spec.name}'"
    if conversions:
        how += ": " + "; ".join(conversions)
    return Dataset(
        images=np.ascontiguousarray(result),
        labels=None if labels is None else labels[chosen].astype(np.int64),
        class_names=class_names,
        source=str(path),
        skipped=[],
        description=f"array file '{path}' ({how}): " + _count_note(limit, len(images), "file"),
    )


def data_fingerprint(source: str | None) -> str | None:
    """A cheap content fingerprint of the evaluation data (names, sizes, mtimes)."""
    if source is None:
        return None
    if source.startswith("fashion-mnist"):
        from calibration import fashion_mnist

        root = Path(fashion_mnist.dataset_dir())
        entries = sorted(root.glob("*")) if root.is_dir() else []
    else:
        root = Path(source)
        entries = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    digest = hashlib.sha256(source.encode())
    for path in entries:
        try:
            st = path.stat()
        except OSError:
            continue
        digest.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]
