"""MNIST-format IDX image files: MNIST, Fashion-MNIST and KMNIST ship as these.

An IDX file is a 4-byte magic (0, 0, data type, number of dimensions), one big-endian uint32 per
dimension, then the values in row-major order. Image files are type 0x08 (unsigned byte) with 3
dimensions (images, rows, columns), named `train-images-idx3-ubyte` (the training split) and
`t10k-images-idx3-ubyte` (the test split), often gzipped (`.gz`). http://yann.lecun.com/exdb/mnist/
Some copies (Kaggle's MNIST) name them with a dot, `train-images.idx3-ubyte`: both names are read.
Class labels, for class-conditional training, are in the label files beside them (`train-labels-idx1-ubyte`,
type 0x08 with 1 dimension): classes are named by number, except Fashion-MNIST's, recognised by their files.
"""

import gzip
import hashlib
import re
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddpm.image_source import DataError, ImageSource, checked_labels

UNSIGNED_BYTE = 0x08
SPLIT_PREFIXES = {"train": "train", "test": "t10k"}  # the file-name prefix of each split
IMAGES_SUFFIX = "-images-idx3-ubyte"
IMAGES_FILE = re.compile(r"(?P<prefix>.+)-images[-.]idx3-ubyte(\.gz)?")  # the dot: Kaggle's copies of MNIST
LABELS_FILE = re.compile(r"(?P<prefix>.+)-labels[-.]idx1-ubyte(\.gz)?")
# Fashion-MNIST (Xiao et al. 2017) is recognised by the SHA-256 of its label files (ungzipped), train and t10k, and
# named as its README and torchvision's FashionMNIST name its classes. Other IDX labels are named by number.
FASHION_MNIST_LABELS_SHA256 = {
    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]


def idx_image_files(folder: str | Path) -> list[Path]:
    """The IDX image files directly in `folder` (`*-images-idx3-ubyte` or `*-images.idx3-ubyte`, gzipped or
    not), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if IMAGES_FILE.fullmatch(p.name) and p.is_file())


def split_files(folder: str | Path, split: str) -> list[Path]:
    """The IDX image files of `split` (train or test) in `folder`: raw, gzipped, or both."""
    return [p for p in idx_image_files(folder) if IMAGES_FILE.fullmatch(p.name)["prefix"] == SPLIT_PREFIXES[split]]


def has_split(folder: str | Path, split: str) -> bool:
    """Whether `folder` holds the IDX image file of `split` (train or test)."""
    return bool(split_files(folder, split))


def read_idx_bytes(path: Path) -> bytes:
    """The contents of an IDX file, ungzipped if it is gzipped (whatever it is called)."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # the gzip magic
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # EOFError: a truncated gzip stream
        raise DataError(f"cannot read IDX file {str(path)!r}: {e or type(e).__name__}") from None
    return raw


def parse_idx(raw: bytes, path: Path, ndim: int) -> np.ndarray:
    """The unsigned bytes of an IDX file of `ndim` dimensions (3: images, 1: labels); DataError if malformed."""
    what, values = ("images", "pixels") if ndim == 3 else ("labels", "labels")
    magic = f"00 00 08 {ndim:02x}"
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise DataError(f"{str(path)!r} is not an IDX file: bad magic {raw[:4].hex(' ') or '(empty file)'}, "
                        f"expected {magic}")
    if raw[2] != UNSIGNED_BYTE or raw[3] != ndim:
        raise DataError(f"IDX file {str(path)!r} holds type 0x{raw[2]:02x} with {raw[3]} dimensions; {what} are "
                        f"unsigned bytes (0x08) with {ndim} (magic {magic}); a labels file is not an images file, "
                        "nor the other way round")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {str(path)!r} is truncated: {len(raw)} bytes, shorter than its "
                        f"{header}-byte header")
    shape = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).tolist()
    dimensions = " x ".join(map(str, shape))
    if 0 in shape[1:]:
        raise DataError(f"IDX file {str(path)!r} has empty {what}: dimensions {dimensions}")
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        problem = "truncated" if len(raw) - header < expected else "too long"
        raise DataError(f"IDX file {str(path)!r} is {problem}: {len(raw) - header} bytes of {values}, its header "
                        f"says {dimensions} = {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_idx_images(path: str | Path) -> np.ndarray:
    """All images of an IDX image file as uint8 (images, rows, columns); DataError if it is malformed."""
    return parse_idx(read_idx_bytes(Path(path)), Path(path), 3)


class IdxSource(ImageSource):
    """The images of one split of an IDX folder, as PIL "L" images."""

    def __init__(self, folder: str, split: str = "train"):
        if split not in SPLIT_PREFIXES:
            raise DataError(f"IDX folders have the splits {', '.join(SPLIT_PREFIXES)}; got split {split!r}")
        name = SPLIT_PREFIXES[split] + IMAGES_SUFFIX
        # Both forms present (a gunzipped copy beside the download): they hold the same images; read the raw one.
        candidates = split_files(folder, split)
        if not candidates:
            found = ", ".join(p.name for p in idx_image_files(folder)) or "none"
            dotted = name.replace("-idx3", ".idx3")
            raise DataError(f"no {name} (nor {dotted}, gzipped or not) for the {split} split in {folder!r}; "
                            f"IDX files there: {found}")
        self.path = min(candidates, key=lambda p: p.suffix == ".gz")
        self.images = read_idx_images(self.path)
        if len(self.images) == 0:
            raise DataError(f"IDX file {str(self.path)!r} holds no images")
        _, rows, columns = self.images.shape
        self.description = f"IDX {self.path}: {len(self.images)} images of {columns}x{rows}"

    def __len__(self) -> int:
        return len(self.images)

    def get(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])  # 2-D uint8: mode "L"

    def describe(self, i: int) -> str:
        return f"image {i} of {self.path}"

    def classes(self) -> tuple[list[str], torch.Tensor]:
        """The labels of the label file beside the images (same split prefix, raw or gzipped): Fashion-MNIST's
        classes by name, any other's by number."""
        prefix = IMAGES_FILE.fullmatch(self.path.name)["prefix"]
        candidates = [p for p in self.path.parent.iterdir()
                      if (match := LABELS_FILE.fullmatch(p.name)) and match["prefix"] == prefix and p.is_file()]
        if not candidates:
            raise DataError(f"no class labels for {self.path.name}: no {prefix}-labels-idx1-ubyte (gzipped or not) "
                            f"in {str(self.path.parent)!r}")
        path = min(candidates, key=lambda p: p.suffix == ".gz")
        raw = read_idx_bytes(path)
        labels = parse_idx(raw, path, 1)
        if hashlib.sha256(raw).hexdigest() in FASHION_MNIST_LABELS_SHA256:
            names = FASHION_MNIST_CLASSES
        else:
            names = [str(k) for k in range(int(labels.max()) + 1 if len(labels) else 0)]
        return checked_labels(self, list(names), labels)
