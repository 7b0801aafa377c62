"""What every training-data source is: random access to images, and the error it raises when unusable."""

from PIL import Image


class DataError(ValueError):
    """The training data cannot be used; the message says what was seen and what to do."""


class ImageSource:
    """Random access to a list of images: len(), get(i) -> PIL image of any mode, describe(i) for reports."""

    description: str  # e.g. "imagefolder /data/cats: 123 images", printed by train.py

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, i: int) -> Image.Image:
        raise NotImplementedError

    def describe(self, i: int) -> str:
        raise NotImplementedError
