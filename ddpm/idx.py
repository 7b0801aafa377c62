"""MNIST-format IDX image files: MNIST, Fashion-MNIST and KMNIST ship as these.

An IDX file is a 4-byte magic (0, 0, data type, number of dimensions), one big-endian uint32 per
dimension, then the values in row-major order. Image files are type 0x08 (unsigned byte) with 3
dimensions (images, rows, columns), named `train-images-idx3-ubyte` (the training split) and
`t10k-images-idx3-ubyte` (the test split), often gzipped (`.gz`). http://yann.lecun.com/exdb/mnist/
Some copies (Kaggle's MNIST) name them with a dot, `train-images.idx3-ubyte`: both names are read.
"""

import gzip
import re
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from ddpm.image_source import DataError, ImageSource

UNSIGNED_BYTE = 0x08
SPLIT_PREFIXES = {"train": "train", "test": "t10k"}  # the file-name prefix of each split
IMAGES_SUFFIX = "-images-idx3-ubyte"
IMAGES_FILE = re.compile(r"(?P<prefix>.+)-images[-.]idx3-ubyte(\.gz)?")  # the dot: Kaggle's copies of MNIST


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


def read_idx_images(path: str | Path) -> np.ndarray:
    """All images of an IDX image file as uint8 (images, rows, columns); DataError if it is malformed."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # the gzip magic, whatever the file is called
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # EOFError: a truncated gzip stream
        raise DataError(f"cannot read IDX file {str(path)!r}: {e or type(e).__name__}") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise DataError(f"{str(path)!r} is not an IDX file: bad magic {raw[:4].hex(' ') or '(empty file)'}, "
                        "expected 00 00 08 03")
    dtype, ndim = raw[2], raw[3]
    if dtype != UNSIGNED_BYTE or ndim != 3:
        raise DataError(f"IDX file {str(path)!r} holds type 0x{dtype:02x} with {ndim} dimensions; images are "
                        "unsigned bytes (0x08) with 3 (magic 00 00 08 03); a labels file is not an images file")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {str(path)!r} is truncated: {len(raw)} bytes, shorter than its "
                        f"{header}-byte header")
    count, rows, columns = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).tolist()
    if rows == 0 or columns == 0:
        raise DataError(f"IDX file {str(path)!r} has empty images: dimensions {count} x {rows} x {columns}")
    expected = count * rows * columns
    if len(raw) - header != expected:
        problem = "truncated" if len(raw) - header < expected else "too long"
        raise DataError(f"IDX file {str(path)!r} is {problem}: {len(raw) - header} bytes of pixels, its header "
                        f"says {count} x {rows} x {columns} = {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(count, rows, columns)


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
