"""The "sample-photos" source: real color photos from installed wheels, ImageNet-1k labels."""

import json

import numpy as np
import pytest

from calibration import load_dataset
from calibration.sample_photos import (
    LIST_FILE_NAME,
    SAMPLE_PHOTOS,
    imagenet_class_names,
    imagenet_label,
    label_word,
    photo_list,
)
from conftest import output_path, run_cli


def test_imagenet_class_names_come_from_the_package():
    names = imagenet_class_names()
    assert len(names) == 1000 and all(isinstance(n, str) and n for n in names)
    assert names[0].startswith("tench") and names[281] == "tabby, tabby cat" and names[999].startswith("toilet tissue")
    # Looked up by name, preferring the class whose first synonym matches.
    assert imagenet_label("tabby") == 281 and imagenet_label("missile") == 657


def test_photo_list_names_files_by_their_label(tmp_path):
    list_file = photo_list(tmp_path)
    assert list_file == tmp_path / LIST_FILE_NAME
    entries = [line.rsplit(None, 1) for line in list_file.read_text().splitlines() if not line.startswith("#")]
    assert len(entries) == len(SAMPLE_PHOTOS) >= 3
    names = imagenet_class_names()
    for name, label in entries:
        assert (tmp_path / name).is_file()
        synonyms = [s.strip() for s in names[int(label)].split(",")]
        assert label_word(name) in synonyms, (name, names[int(label)])


def test_sample_photos_load_with_imagenet_preprocessing():
    data = load_dataset("sample-photos", 224, "imagenet", in_chans=3)
    assert data.images.shape == (len(SAMPLE_PHOTOS), 3, 224, 224) and data.images.dtype == np.float32
    assert data.source == "sample-photos" and not data.skipped
    channel_means = data.images.mean(axis=(2, 3))
    assert np.all((channel_means > -2.2) & (channel_means < 2.7))
    assert np.all(data.images.std(axis=(2, 3)) > 0.05)  # real pictures, not constant fills
    # Color photos: the three channels differ (a gray image copied to RGB would not).
    assert all(np.abs(image[0] - image[1]).mean() > 0.01 for image in data.images)
    assert data.class_names == imagenet_class_names() and len(data.class_names) == 1000
    labels = [data.class_names[i] for i in data.labels]
    expected = [photo.label_name for photo in SAMPLE_PHOTOS]
    assert all(0 <= i < 1000 for i in data.labels)
    assert all(word in [s.strip() for s in name.split(",")] for word, name in zip(expected, labels))


def test_sample_photos_limit_is_deterministic():
    a = load_dataset("sample-photos", 64, "imagenet", limit=2, seed=3)
    b = load_dataset("sample-photos", 64, "imagenet", limit=2, seed=3)
    assert len(a) == 2 and np.array_equal(a.labels, b.labels) and np.array_equal(a.images, b.images)


@pytest.mark.slow
def test_evaluate_on_sample_photos(tmp_path):
    args = ["--variant", "micro", "--input-size", "64", "--num-classes", "1000"]
    result = run_cli("evaluate", *args, "--data", "sample-photos", "--preprocessing", "imagenet", cwd=tmp_path, check=True)
    accuracy = json.loads(output_path(result, "accuracy").read_text())
    data, metrics = accuracy["data"], accuracy["metrics"]
    assert data["source"] == "sample-photos" and data["count"] == len(SAMPLE_PHOTOS) and data["skipped"] == 0
    assert data["labeled"] is True and len(data["class_names"]) == 1000
    assert metrics["top1_agreement"] == 1.0
    assert metrics["top1"] == metrics["reference_top1"]
