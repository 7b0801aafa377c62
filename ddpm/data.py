"""Training images: where they come from, how each becomes a tensor in [-1, 1], and in what order.

Three sources: a Hugging Face Hub dataset (--dataset_name), a local folder (--train_data_dir: image files, or
MNIST-format IDX files, see ddpm/idx.py), or the built-in "shapes" dataset, which the package draws itself so a
first run needs no download. Each also gives its images' class labels, where they have classes (classes()), for
class-conditional training.
"""

import contextlib
import io
import itertools
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import get_session
from PIL import Image, ImageDraw
from torchvision import transforms
from tqdm.auto import tqdm

from ddpm.idx import IdxSource, idx_image_files
from ddpm.image_source import DataError, ImageSource, checked_labels

# `datasets` is imported only where a Hub dataset is loaded: it is slow to import, and a run on local or
# built-in images does not need it installed.
if TYPE_CHECKING:
    import datasets

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")

# PIL errors of a corrupt, truncated or undecodable file; such an image is skipped, not fatal.
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _open(fp) -> Image.Image:
    image = Image.open(fp)
    image.load()  # decode now, so a truncated file fails here rather than inside a transform
    return image


class FolderSource(ImageSource):
    def __init__(self, root: str):
        if not Path(root).is_dir():
            raise DataError(f"--train_data_dir {root!r} is not a folder; pass a folder that contains images")
        self.root = root
        # Sorted, so every rank and every resumed run maps index i to the same file.
        self.files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.files:
            raise DataError(f"no images in --train_data_dir {root!r}; looked recursively for "
                            f"{', '.join(IMAGE_EXTENSIONS)}, and for MNIST-format IDX files named "
                            "train-images-idx3-ubyte[.gz] directly in it")
        self.description = f"imagefolder {root}: {len(self.files)} images"

    def __len__(self) -> int:
        return len(self.files)

    def get(self, i: int) -> Image.Image:
        return _open(self.files[i])

    def describe(self, i: int) -> str:
        return str(self.files[i])

    def classes(self) -> tuple[list[str], torch.Tensor]:
        """One class per subfolder, by torchvision's ImageFolder rule: the sorted subfolder names, label k for the
        images anywhere under the k-th."""
        names = sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir())
        if not names:
            raise DataError(f"--train_data_dir {self.root!r} has no subfolders, so its images have no classes; "
                            "put each class's images in a subfolder named for it")
        first_parts = [file.relative_to(self.root).parts for file in self.files]
        loose = [parts for parts in first_parts if len(parts) == 1]
        if loose:
            raise DataError(f"image {loose[0][0]!r} lies directly in --train_data_dir {self.root!r}, outside the "
                            f"class subfolders ({len(loose)} such image(s)); move it into one")
        counts = {name: 0 for name in names}
        for parts in first_parts:
            counts[parts[0]] += 1
        empty = [name for name, count in counts.items() if count == 0]
        if empty:
            raise DataError(f"class subfolder {empty[0]!r} of --train_data_dir {self.root!r} holds no images "
                            f"({len(empty)} such subfolder(s)); remove it or add its images")
        index = {name: k for k, name in enumerate(names)}
        return checked_labels(self, names, [index[parts[0]] for parts in first_parts])


class HubSource(ImageSource):
    def __init__(self, name: str, rows: "datasets.Dataset", split: str = "train", label_column: str = "label"):
        import datasets

        columns = [c for c, feature in rows.features.items() if isinstance(feature, datasets.Image)]
        if not columns:
            seen = ", ".join(f"{c} ({type(f).__name__})" for c, f in rows.features.items())
            raise DataError(f"dataset {name!r} has no image column (columns: {seen}); pick a dataset with a "
                            "datasets.Image feature")
        self.name, self.column = name, "image" if "image" in columns else columns[0]
        self.all_columns, self.label_column = rows, label_column
        # Undecoded rows are {"bytes", "path"}: we decode with PIL ourselves, so a bad row is skipped with its
        # file name.
        self.rows = rows.select_columns([self.column]).cast_column(self.column, datasets.Image(decode=False))
        if len(self.rows) == 0:
            raise DataError(f"dataset {name!r} has no rows in its {split} split; pick a dataset with images")
        self.description = f"Hub dataset {name} ({split}): {len(self.rows)} images"

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, i: int) -> Image.Image:
        row = self.rows[i][self.column]
        if row is None or (row["bytes"] is None and row["path"] is None):
            raise OSError("the row holds no image")
        return _open(io.BytesIO(row["bytes"]) if row["bytes"] is not None else row["path"])

    def describe(self, i: int) -> str:
        row = self.rows[i][self.column]
        path = row and row["path"]
        return f"row {i} of {self.name}" + (f" ({path})" if path else "")

    def classes(self) -> tuple[list[str], torch.Tensor]:
        """The labels in column `label_column`: a ClassLabel (its names) or plain integers (named by number)."""
        import datasets

        column, features = self.label_column, self.all_columns.features
        if column not in features:
            seen = ", ".join(f"{c} ({type(f).__name__})" for c, f in features.items())
            raise DataError(f"dataset {self.name!r} has no label column {column!r} (columns: {seen}); "
                            "pass --label_column")
        feature = features[column]
        is_int = isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
        if not isinstance(feature, datasets.ClassLabel) and not is_int:
            raise DataError(f"column {column!r} of dataset {self.name!r} holds {feature}, not class labels "
                            "(a ClassLabel or integers); pass --label_column")
        labels = np.asarray(self.all_columns.with_format("numpy")[column])
        if isinstance(feature, datasets.ClassLabel):
            names = list(feature.names)
        elif len(labels) and np.issubdtype(labels.dtype, np.integer):  # integers without names: class k is "k"
            names = [str(k) for k in range(max(int(labels.max()) + 1, 0))]
        else:  # missing values: checked_labels says so
            names = []
        return checked_labels(self, names, labels)


@dataclass(frozen=True)
class ShapeFactors:
    """The generative factors of one built-in image; side and centre (cx, cy) in pixels of the image."""

    shape: str
    color: tuple[int, int, int]
    background: tuple[int, int, int]
    side: float
    cx: float
    cy: float


class ShapesSource(ImageSource):
    """The built-in dataset: one large coloured circle, square or triangle on a plain background."""

    SHAPES = ("circle", "square", "triangle")
    COLORS = ((220, 30, 30), (30, 170, 60), (30, 90, 220), (250, 150, 20))
    COLOR_NAMES = ("red", "green", "blue", "orange")
    BACKGROUNDS = ((245, 245, 245), (20, 20, 20))  # white and black both contrast with every colour
    BACKGROUND_NAMES = ("white", "black")
    # The 24 classes, shape x colour x background, in this order: label k is CLASSES[k], named CLASS_NAMES[k]
    CLASSES = list(itertools.product(SHAPES, COLORS, BACKGROUNDS))
    CLASS_NAMES = ["-".join(names) for names in itertools.product(SHAPES, COLOR_NAMES, BACKGROUND_NAMES)]
    SIDE = (0.4, 0.7)  # the side, as a fraction of the image; the shape lies wholly inside the image
    SUPERSAMPLE = 4  # draw at 4x and average down: anti-aliased edges even at 16 px

    def __init__(self, resolution: int, seed: int, size: int):
        if resolution < 1 or size < 1:
            raise DataError(f"the built-in dataset needs resolution >= 1 and size >= 1, got {resolution} and {size}")
        self.resolution, self.seed, self.size = resolution, seed, size
        self.description = f"built-in shapes dataset, {size} images"

    def __len__(self) -> int:
        return self.size

    def get(self, i: int) -> Image.Image:
        if not 0 <= i < self.size:
            raise IndexError(f"image {i} of a built-in dataset of {self.size}")
        return self.render(self.factors(i))

    def factors(self, i: int) -> ShapeFactors:
        """The factors of image i, drawn at random from (seed, i)."""
        # A string seed is hashed (SHA-512): image i depends on (seed, i) only, so images render lazily in any order.
        rng = random.Random(f"shapes/{self.seed}/{i}")
        big = self.resolution * self.SUPERSAMPLE
        background = rng.choice(self.BACKGROUNDS)
        shape, color = rng.choice(self.SHAPES), rng.choice(self.COLORS)
        side = rng.uniform(*self.SIDE) * big
        cx, cy = rng.uniform(side / 2, big - side / 2), rng.uniform(side / 2, big - side / 2)
        # SUPERSAMPLE is a power of 2: dividing by it here and multiplying in render() is exact
        return ShapeFactors(shape, color, background, side / self.SUPERSAMPLE, cx / self.SUPERSAMPLE,
                            cy / self.SUPERSAMPLE)

    def render(self, factors: ShapeFactors) -> Image.Image:
        """The image of `factors` at this source's resolution, drawn as every image of the dataset is."""
        big = self.resolution * self.SUPERSAMPLE
        image = Image.new("RGB", (big, big), factors.background)
        side, cx, cy = (value * self.SUPERSAMPLE for value in (factors.side, factors.cx, factors.cy))
        left, top, right, bottom = cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2
        draw = ImageDraw.Draw(image)
        if factors.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=factors.color)
        elif factors.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=factors.color)
        else:
            draw.polygon(((cx, top), (right, bottom), (left, bottom)), fill=factors.color)
        return image.resize((self.resolution, self.resolution), Image.Resampling.BOX)

    def describe(self, i: int) -> str:
        return f"built-in shapes image {i}"

    def classes(self) -> tuple[list[str], torch.Tensor]:
        """Each image's class, its (shape, colour, background), named like "circle-red-white"."""
        index = {factors: k for k, factors in enumerate(self.CLASSES)}
        labels = [index[f.shape, f.color, f.background] for f in map(self.factors, range(self.size))]
        return checked_labels(self, list(self.CLASS_NAMES), labels)


# The built-in images that evaluation uses: held out from every training run with a non-negative --seed (default 0).
HELD_OUT_SEED = -1


def make_builtin_source(resolution: int, seed: int, size: int) -> ImageSource:
    """The built-in "shapes" dataset: `size` images drawn at `resolution`, image i fixed by (seed, i)."""
    return ShapesSource(resolution, seed, size)


def _hub_reachable() -> bool:
    try:
        get_session().head(hub_constants.ENDPOINT, timeout=3)
    except Exception:  # whatever the failure (DNS, refused, timeout, proxy), the Hub is out of reach
        return False
    return True


@contextlib.contextmanager
def _offline_mode():
    import datasets

    # Both libraries read HF_HUB_OFFLINE once at import, so offline mode is switched through their constants.
    saved = hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def load_images(
    dataset_name: str | None,
    dataset_config_name: str | None,
    train_data_dir: str | None,
    cache_dir: str | None,
    resolution: int,
    seed: int,
    builtin_size: int = 2048,
    split: str = "train",
    label_column: str = "label",
) -> ImageSource:
    """The images to train on: a Hub dataset, a local folder, or (given neither) the built-in shapes.
    `label_column` names a Hub dataset's column of class labels, read only if the labels are asked for."""
    if dataset_name and train_data_dir:
        raise DataError(f"got both --dataset_name {dataset_name!r} and --train_data_dir {train_data_dir!r}; "
                        "pass only one")
    if train_data_dir:
        if Path(train_data_dir).is_dir() and idx_image_files(train_data_dir):  # MNIST-style: train-*/t10k-* by split
            return IdxSource(train_data_dir, split)
        if split != "train":
            raise DataError(f"split {split!r} of --train_data_dir {train_data_dir!r}: a folder of images has no splits "
                            "(a folder of MNIST-format IDX files, or a Hub dataset, has)")
        return FolderSource(train_data_dir)
    if not dataset_name:
        return make_builtin_source(resolution, seed, builtin_size)
    # Without network the Hub client retries for ~25 s before it fails. One quick request tells us first; if the
    # Hub is out of reach we load in offline mode, so a cached dataset still loads and any other fails at once.
    import datasets

    offline = hub_constants.HF_HUB_OFFLINE or not _hub_reachable()
    try:
        with _offline_mode() if offline else contextlib.nullcontext():
            rows = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split=split)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if isinstance(e, ConnectionError):
            raise DataError(
                f"could not load dataset {dataset_name!r} from the Hugging Face Hub (offline?): {reason}; "
                "without network only datasets already in the cache load"
            ) from None
        raise DataError(f"could not load dataset {dataset_name!r} ({split} split): {reason}") from None
    return HubSource(dataset_name, rows, split, label_column)


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Any PIL image as "L" or "RGB": transparency composited on white, high bit depths scaled to 8 bit."""
    if image.mode.startswith("I;16"):
        # 16-bit has a fixed white level (65535); PIL's own convert would clip everything above 255 to white.
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().astype(np.uint8))
    elif image.mode in ("I", "F"):
        # 32-bit int and float images carry no white level: stretch each image's own min..max to 0..255.
        pixels = np.asarray(image, dtype=np.float64)
        low, high = pixels.min(), pixels.max()
        image = Image.fromarray((255 * (pixels - low) / max(high - low, 1e-12)).round().astype(np.uint8))
    if image.mode in ("RGBA", "RGBa", "LA", "PA", "P") or "transparency" in image.info:
        # White, not black, behind transparent pixels: sprites and logos are drawn to be seen on a page.
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA"))
    return image.convert(mode)


# Datasets whose resized images fit in this many bytes are decoded once and kept in memory (per process).
CACHE_BYTES = 2 * 2**30


def crop_and_flip(image: torch.Tensor, resolution: int, center_crop: bool, random_flip: bool,
                  draw: int) -> torch.Tensor:
    """A resolution x resolution crop of a uint8 (channels, height, width) image, mirrored or not: diffusers'
    RandomCrop (or CenterCrop) and RandomHorizontalFlip, their random choices read from `draw`, in [0, 2^62)."""
    height, width = image.shape[-2:]
    if center_crop:
        image = transforms.functional.center_crop(image, [resolution])
    else:
        # offsets uniform over the possible ones (a 61-bit number modulo n is, to within n / 2^61)
        rows, columns = height - resolution + 1, width - resolution + 1
        top, left = (draw >> 1) % rows, (draw >> 1) // rows % columns
        image = transforms.functional.crop(image, top, left, resolution, resolution)
    if random_flip and draw & 1:  # bit 0: the flip, with probability 1/2
        image = transforms.functional.hflip(image)
    return image


class TrainingImages(torch.utils.data.Dataset):
    """Images as (channels, resolution, resolution) tensors in [-1, 1], augmented as diffusers' train_unconditional.py.

    Indexed by keys (index, draw) from EpochSampler: the draw fixes the random crop and flip (crop_and_flip).

    Each image is first decoded: converted to L or RGB and resized (shorter side = resolution), as uint8. With
    cache_bytes > 0 and a dataset that fits, all images are decoded once, up front, and kept in memory; otherwise
    each is decoded when drawn. The crop, flip and scaling then run on the uint8 tensor, the same ops torchvision
    applies to a PIL image, so caching changes no pixel. An unreadable image is skipped, with a line naming it
    when `report` is on (train.py: on the main process).

    With with_labels=True (class-conditional training), an item is (image, class label) instead; `class_names`
    names the labels. The labels are read, and checked, once here.
    """

    def __init__(self, source: ImageSource, resolution: int, channels: int, center_crop: bool, random_flip: bool,
                 cache_bytes: int = 0, progress: bool = False, report: bool = True, with_labels: bool = False):
        if channels not in (1, 3):
            raise DataError(f"images can have 1 (grey) or 3 (RGB) channels, got {channels}")
        self.class_names, self.labels = source.classes() if with_labels else (None, None)
        self.source, self.mode = source, "L" if channels == 1 else "RGB"
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.resize = transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR)
        self.to_model_range = transforms.Compose(
            [
                transforms.ConvertImageDtype(torch.float32),  # uint8 -> [0, 1], exactly as ToTensor divides
                transforms.Normalize([0.5], [0.5]),  # [0, 1] -> [-1, 1], the range DDPM's x_0 lives in
            ]
        )
        # In shared memory: DataLoader workers are other processes, and a file one of them found unreadable is then
        # skipped by all, and reported once.
        self.unreadable = torch.zeros(len(source), dtype=torch.bool).share_memory_()
        self.report = report
        self.cache: list[torch.Tensor | None] | None = None
        if cache_bytes > 0 and len(source) * channels * resolution**2 <= cache_bytes:
            self.cache = self._decode_all(cache_bytes, progress)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor | tuple[torch.Tensor, int]:
        index, draw = key
        used, image = self.readable(index)
        image = self.to_model_range(crop_and_flip(image, self.resolution, self.center_crop, self.random_flip, draw))
        return image if self.labels is None else (image, int(self.labels[used]))

    def _decode(self, i: int) -> torch.Tensor:
        """Image i as uint8 (channels, height, width), shorter side = resolution; raises UNREADABLE errors."""
        return transforms.functional.pil_to_tensor(self.resize(to_mode(self.source.get(i), self.mode)))

    def _decode_or_none(self, i: int) -> torch.Tensor | None:
        try:
            return self._decode(i)
        except UNREADABLE as e:
            if not self.unreadable[i] and self.report:
                tqdm.write(f"skipping unreadable image {self.source.describe(i)}: {e}")
            self.unreadable[i] = True
            return None

    def _decode_all(self, cache_bytes: int, progress: bool) -> list[torch.Tensor | None] | None:
        """Every image decoded (None where unreadable), or None if they turn out larger than cache_bytes."""
        images, total = [], 0
        # PIL releases the GIL while it decodes and resizes, so threads decode in parallel
        pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))
        try:
            decoded = pool.map(self._decode_or_none, range(len(self.source)))
            for image in tqdm(decoded, total=len(self.source), desc="decoding images into memory",
                              disable=not progress, leave=False, delay=2):  # a bar only if it takes a while
                total += 0 if image is None else image.numel()
                if total > cache_bytes:  # wider than square: too large after all, so decode on demand
                    return None
                images.append(image)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return images

    def decoded(self, index: int) -> torch.Tensor:
        """Image `index` as uint8 (channels, height, width), shorter side = resolution, before the crop and flip."""
        return self.readable(index)[1]

    def decoded_with_label(self, index: int) -> tuple[torch.Tensor, int]:
        """decoded(index) and its class label (with_labels=True): the label of the image given in its place, if
        image `index` is unreadable."""
        if self.labels is None:
            raise ValueError("decoded_with_label: these TrainingImages were made without with_labels=True")
        used, image = self.readable(index)
        return image, int(self.labels[used])

    def readable(self, index: int) -> tuple[int, torch.Tensor]:
        """(i, image i decoded), i = index unless image `index` is unreadable."""
        # An unreadable image is replaced by the next readable one, so one bad file does not stop a long run.
        for step in range(len(self.source)):
            i = (index + step) % len(self.source)
            if self.unreadable[i]:
                continue
            image = self.cache[i] if self.cache is not None else self._decode_or_none(i)
            if image is not None:
                return i, image
        raise DataError(f"none of the images could be read ({self.source.description}); see the lines above")

    @property
    def cached(self) -> bool:
        return self.cache is not None

    @property
    def skipped(self) -> int:
        """How many images were found unreadable so far: all of them once the dataset is cached."""
        return int(self.unreadable.sum())


class EpochSampler(torch.utils.data.Sampler):
    """Our DistributedSampler (shuffle=True, drop_last=False) that can also start mid-epoch, for exact resumes.

    Yields keys (index, draw) for TrainingImages. Each epoch shuffles all indices by (seed, epoch), pads
    by wrap-around to a multiple of world_size, and gives rank r the positions r, r + world_size, ...
    Each position's draw picks the random crop and flip of the image there (crop_and_flip).
    """

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1):
        if num_samples < 1:
            raise DataError(f"cannot sample from a dataset of {num_samples} images")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.num_samples, self.seed, self.rank, self.world_size = num_samples, seed, rank, world_size
        self.per_rank = math.ceil(num_samples / world_size)
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch `epoch`, skipping the first `start` samples this rank already consumed."""
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"start must be in [0, {self.per_rank}] (samples per rank per epoch), got {start}")
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.per_rank - self.start

    def keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys __iter__ yields, as two int64 tensors: image indices and their draws."""
        # A string seed is hashed, so (seed, epoch) pairs never share a stream the way `seed + epoch` would.
        g = torch.Generator().manual_seed(random.Random(f"epoch/{self.seed}/{self.epoch}").getrandbits(63))
        perm = torch.randperm(self.num_samples, generator=g)
        # The draws of every position in the global (padded) order, at once: they do not depend on the rank that
        # reads them, the number of DataLoader workers or a mid-epoch start, and cost one call per epoch (seeding a
        # generator per image took 33 us, 1.6 s for a CIFAR-10 epoch on this project's CPU).
        total = self.per_rank * self.world_size
        draws = torch.randint(2**62, (total,), generator=g)
        positions = torch.arange(self.rank + self.start * self.world_size, total, self.world_size)
        return perm[positions % self.num_samples], draws[positions]

    def __iter__(self):
        indices, draws = self.keys()
        return zip(indices.tolist(), draws.tolist())
