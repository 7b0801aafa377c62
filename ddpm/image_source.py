"""What every training-data source is: random access to images, their classes where they have them, and the error
it raises when unusable."""

import numpy as np
import torch
from PIL import Image


class DataError(ValueError):
    """The training data cannot be used; the message says what was seen and what to do."""


class ImageSource:
    """Random access to a list of images: len(), get(i) -> PIL image of any mode, describe(i) for reports, and
    classes() for class-conditional training."""

    description: str  # e.g. "imagefolder /data/cats: 123 images", printed by train.py

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, i: int) -> Image.Image:
        raise NotImplementedError

    def describe(self, i: int) -> str:
        raise NotImplementedError

    def classes(self) -> tuple[list[str], torch.Tensor]:
        """The class names (label k's at k) and each image's label, int64 (len,); DataError if there are none."""
        raise DataError(f"{self.description}: these images have no class labels")


def checked_labels(source: ImageSource, names: list[str], labels) -> tuple[list[str], torch.Tensor]:
    """(names, labels as int64) if there is one label per image, each in [0, len(names)); else a DataError naming
    the first label out of range and its image."""
    labels = np.asarray(labels)
    if len(labels) != len(source):
        raise DataError(f"{source.description}: {len(labels)} class labels for {len(source)} images")
    if len(labels) and not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{source.description}: class labels must be integers, got {labels.dtype} values "
                        f"such as {labels[0]!r}")
    outside = np.flatnonzero((labels < 0) | (labels >= len(names)))
    if len(outside):
        i = int(outside[0])
        raise DataError(f"{source.description}: class label {labels[i]} of {source.describe(i)} is outside "
                        f"[0, {len(names) - 1}] ({len(names)} classes); {len(outside)} label(s) out of range")
    return names, torch.from_numpy(labels.astype(np.int64))
