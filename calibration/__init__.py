"""Image datasets for INT8 calibration and evaluation, all with one preprocessing.

    from calibration import load_dataset
    data = load_dataset("path/to/imagefolder", input_size=224, preprocessing="imagenet", limit=256)
    data.images  # (N, 3, 224, 224) float32, normalized
"""

from calibration.datasets import IMAGE_EXTENSIONS, Dataset, load_dataset
from calibration.preprocess import (
    PREPROCESSING,
    Preprocessing,
    get_preprocessing,
    preprocess_array,
    preprocess_image,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "PREPROCESSING",
    "Dataset",
    "Preprocessing",
    "get_preprocessing",
    "load_dataset",
    "preprocess_array",
    "preprocess_image",
]
