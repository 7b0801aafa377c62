"""FID and KID of images against reference statistics, computed as the papers compute them.

    FID = |mu_x - mu_y|^2 + Tr(S_x) + Tr(S_y) - 2 Tr((S_x S_y)^(1/2))        (Heusel et al. 2017)
over the pool_3 features (ddpm/inception.py) of two image sets, their means mu and unbiased covariances S.
KID (Binkowski et al. 2018) is the unbiased estimate of the squared MMD with the kernel k(x, y) = (x . y / d + 1)^3,
its mean and standard deviation over 100 random subsets of min(1000, n, m) images of each set (torch-fidelity's
defaults and order of draws, so its figures match torch-fidelity's where n, m >= 1000).

Reference statistics are a .npz with pytorch-fid's keys `mu` and `sigma`, the KID features (up to 10,000 of them),
and what they were computed from: data, split, count, resolution, channels, resize, network (the sha256 of its
weights) and a fingerprint of the data. `reference_statistics` reuses a cached file when all of these match, and
computes it again otherwise.

The API train.py uses: `reference_statistics(ReferenceImages.of_data(...), network, resize, cache_dir)` once,
then `fid_of_samples(images, reference, network)` for each batch of samples.
"""

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ddpm import distributed
from ddpm.data import IMAGE_EXTENSIONS, UNREADABLE, DataError, ShapesSource, TrainingImages, crop_and_flip, to_mode
from ddpm.image_source import ImageSource
from ddpm.inception import Inception, resize

KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 2020  # torch-fidelity's defaults
KID_REFERENCE_FEATURES = 10_000  # reference features kept for KID: 100 subsets of 1,000 draw from these
PROVENANCE = ("data", "split", "count", "resolution", "channels", "resize", "network", "fingerprint")


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (float) as uint8, rounded as a saved PNG is (DDPMPipeline's numpy_to_pil); uint8 as is."""
    if images.dtype == torch.uint8:
        return images
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def frechet_distance(mu_x: np.ndarray, sigma_x: np.ndarray, mu_y: np.ndarray, sigma_y: np.ndarray) -> float:
    """FID = |mu_x - mu_y|^2 + Tr(S_x) + Tr(S_y) - 2 Tr((S_x S_y)^(1/2)), in float64 (Heusel et al. 2017).

    Tr((S_x S_y)^(1/2)) = sum sqrt(eig(R S_y R)) with R = S_x^(1/2) (both symmetric PSD: eigh, not sqrtm; equal to
    pytorch-fid's sqrtm to about 1e-7 relative). Coordinates constant in both sets (zero rows of S_x and S_y) add
    nothing to the traces and are left out of the eigen-decompositions.
    """
    mu_x, mu_y, sigma_x, sigma_y = (np.asarray(a, dtype=np.float64) for a in (mu_x, mu_y, sigma_x, sigma_y))
    active = (np.diag(sigma_x) > 0) | (np.diag(sigma_y) > 0)
    sigma_x, sigma_y = sigma_x[np.ix_(active, active)], sigma_y[np.ix_(active, active)]
    values, vectors = np.linalg.eigh(sigma_x)
    root_x = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    product = root_x @ sigma_y @ root_x
    trace_sqrt = np.sqrt(np.linalg.eigvalsh((product + product.T) / 2).clip(min=0)).sum()
    diff = mu_x - mu_y
    return float(diff @ diff + np.trace(sigma_x) + np.trace(sigma_y) - 2 * trace_sqrt)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x . y / d + 1)^3, the KID kernel, for every row pair of x and y."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def kernel_inception_distance(x: np.ndarray, y: np.ndarray, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED) -> tuple[float, float] | None:
    """KID: mean and standard deviation over `subsets` of the unbiased MMD^2 estimate (Binkowski et al. 2018)

        [sum_{i != j} k(x_i, x_j) + sum_{i != j} k(y_i, y_j)] / (s (s - 1)) - 2 sum_{i, j} k(x_i, y_j) / s^2

    on s = min(subset_size, n, m) rows drawn without replacement from each set; None if s < 2.
    """
    s = min(subset_size, len(x), len(y))
    if s < 2:
        return None
    rng = np.random.RandomState(seed)
    estimates = []
    for _ in range(subsets):
        a = x[rng.choice(len(x), s, replace=False)].astype(np.float64)
        b = y[rng.choice(len(y), s, replace=False)].astype(np.float64)
        k_aa, k_bb, k_ab = polynomial_kernel(a, a), polynomial_kernel(b, b), polynomial_kernel(a, b)
        within = k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)
        estimates.append(within / (s * (s - 1)) - 2 * k_ab.sum() / s**2)
    return float(np.mean(estimates)), float(np.std(estimates))


@dataclass
class FeatureStatistics:
    """What FID and KID need of one image set: the features' mean, covariance, count, and KID features."""

    mu: np.ndarray  # float64 (2048,)
    sigma: np.ndarray  # float64 (2048, 2048), the unbiased covariance (np.cov)
    count: int
    kid_features: np.ndarray | None  # float32, at most KID_REFERENCE_FEATURES rows; None: KID cannot be computed

    @classmethod
    def of(cls, features: np.ndarray) -> "FeatureStatistics":
        """The statistics of (n, 2048) features, n >= 2; beyond KID_REFERENCE_FEATURES a seeded choice kept."""
        if len(features) < 2:
            raise ValueError(f"FID needs at least 2 images to estimate a covariance, got {len(features)}")
        features64 = features.astype(np.float64)
        kept = features
        if len(features) > KID_REFERENCE_FEATURES:
            kept = features[np.sort(np.random.RandomState(KID_SEED).choice(len(features), KID_REFERENCE_FEATURES,
                                                                            replace=False))]
        return cls(features64.mean(axis=0), np.cov(features64, rowvar=False), len(features),
                   kept.astype(np.float32))


@dataclass
class ReferenceStatistics:
    """The statistics of a reference set, what they were computed from, and where they are stored."""

    statistics: FeatureStatistics
    provenance: dict[str, str | int] = field(default_factory=dict)  # {} for a pytorch-fid .npz
    path: Path | None = None

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceStatistics":
        """A .npz of ours, or pytorch-fid's (mu and sigma only: no KID, and no provenance)."""
        try:
            with np.load(path) as f:
                if "mu" not in f or "sigma" not in f:
                    raise DataError(f"{str(path)!r} has no mu and sigma (keys: {', '.join(f.files)}); pass the .npz of "
                                    "evaluate.py's cache or of pytorch-fid")
                mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
                kid = f["kid_features"] if "kid_features" in f else None
                count = int(f["count"]) if "count" in f else 0
                provenance = {key: f[key].item() for key in PROVENANCE if key in f}
        except (OSError, ValueError) as error:
            if isinstance(error, DataError):
                raise
            raise DataError(f"could not read reference statistics {str(path)!r}: {error}") from None
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise DataError(f"{str(path)!r}: mu {mu.shape} and sigma {sigma.shape} are not a mean and its covariance")
        return cls(FeatureStatistics(mu, sigma, count, kid), provenance, Path(path))

    def save(self, path: str | Path) -> None:
        """Write the .npz, complete or not at all (renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": self.statistics.mu, "sigma": self.statistics.sigma, **self.provenance}
        if self.statistics.kid_features is not None:
            arrays["kid_features"] = self.statistics.kid_features
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(descriptor, "wb") as file:
                np.savez(file, **arrays)
            os.replace(temporary, path)
        finally:
            Path(temporary).unlink(missing_ok=True)
        self.path = path

    def describe(self) -> str:
        """One line: what the statistics were computed from, and where they are."""
        where = f" ({self.path})" if self.path else ""
        if not self.provenance:
            return f"reference statistics of unknown provenance{where}"
        p = self.provenance
        size = "as stored" if p["resolution"] == 0 else f"at {p['resolution']}x{p['resolution']}"
        split = f" ({p['split']})" if p["split"] else ""
        return f"{p['count']} images of {p['data']}{split} {size}, resize {p['resize']}{where}"


class ReferenceImages(torch.utils.data.Dataset):
    """The images of a reference set as uint8 (C, H, W) tensors, and what identifies them for the cache."""

    def __init__(self, load: Callable[[int], torch.Tensor], count: int, data: str, split: str, resolution: int,
                 channels: int, fingerprint: str):
        self.load, self.count = load, count
        self.identity = {"data": data, "split": split, "count": count, "resolution": resolution,
                         "channels": channels, "fingerprint": fingerprint}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.load(i)

    @classmethod
    def of_data(cls, source: ImageSource, resolution: int, channels: int, count: int | None = None,
                split: str = "train") -> "ReferenceImages":
        """The first `count` (default: all) images of training data as the model sees them: converted to L or RGB,
        resized (shorter side = resolution) and center-cropped, as train.py does, without flips."""
        dataset = TrainingImages(source, resolution, channels, center_crop=True, random_flip=False)
        count = len(source) if count is None else min(count, len(source))
        return cls(lambda i: crop_and_flip(dataset.decoded(i), resolution, True, False, 0), count,
                   data_name(source), split, resolution, channels, fingerprint(source, count))

    @classmethod
    def of_folder(cls, folder: str | Path, count: int | None = None) -> "ReferenceImages":
        """The images of a folder (recursively, sorted by path) as they are stored, as RGB."""
        files = image_files(folder)
        count = len(files) if count is None else min(count, len(files))
        stats = "\n".join(f"{p.relative_to(folder)}\t{p.stat().st_size}\t{p.stat().st_mtime_ns}" for p in files[:count])
        return cls(lambda i: read_rgb(files[i]), count, f"imagefolder {Path(folder).resolve()}", "", 0, 3,
                   hashlib.sha256(stats.encode()).hexdigest())


def image_files(folder: str | Path) -> list[Path]:
    if not Path(folder).is_dir():
        raise DataError(f"{str(folder)!r} is not a folder of images")
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"no images in {str(folder)!r}; looked recursively for {', '.join(IMAGE_EXTENSIONS)}")
    return files


def read_rgb(path: Path) -> torch.Tensor:
    """An image file as uint8 (3, H, W): grey repeated to 3 channels, transparency on white (data.to_mode)."""
    try:
        with Image.open(path) as image:
            pixels = np.asarray(to_mode(image, "RGB"))
    except UNREADABLE as error:
        raise DataError(f"could not read image {str(path)!r}: {error}") from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def data_name(source: ImageSource) -> str:
    """The data's name without its count (kept apart), e.g. "IDX /data/train-images-idx3-ubyte"; paths as the
    source was given them, so pass absolute ones for a cache that any working directory finds."""
    if isinstance(source, ShapesSource):
        return f"built-in shapes, seed {source.seed}"
    return source.description.rsplit(":", 1)[0]


def fingerprint(source: ImageSource, count: int) -> str:
    """What changes when the data does: file sizes and times where there are files, a Hub dataset's fingerprint,
    and the pixels of the first 16 images for every source (the built-in shapes are fixed by their code)."""
    digest = hashlib.sha256()
    files = getattr(source, "files", None) or [p for p in [getattr(source, "path", None)] if p is not None]
    for path in files:
        digest.update(f"{path}\t{path.stat().st_size}\t{path.stat().st_mtime_ns}\n".encode())
    rows = getattr(source, "rows", None)
    digest.update(str(getattr(rows, "_fingerprint", "")).encode())
    for i in range(min(16, count)):
        try:
            digest.update(np.asarray(source.get(i)).tobytes())
        except UNREADABLE:
            digest.update(b"unreadable")
    return digest.hexdigest()


class Resized(torch.utils.data.Dataset):
    """Each image of `images` resized for the Inception: float32 (3, 299, 299) in [0, 255]."""

    def __init__(self, images: torch.utils.data.Dataset, mode: str):
        self.images, self.mode = images, mode

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return resize(self.images[i][None], self.mode)[0]


def features_of_dataset(images: torch.utils.data.Dataset, indices: range, network: Inception, resize_mode: str,
                        batch_size: int = 64, num_workers: int = 0, progress: bool = False,
                        desc: str = "Inception features") -> np.ndarray:
    """float32 (len(indices), 2048) features of images[i] for i in indices, in order."""
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(Resized(images, resize_mode), indices),
                                         batch_size=batch_size, num_workers=num_workers)
    features = [network.features(batch) for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress,
                                                            leave=False)]
    return torch.cat(features).numpy() if features else np.zeros((0, 2048), np.float32)


def features_of_images(images: torch.Tensor, network: Inception, resize_mode: str, batch_size: int = 64) -> np.ndarray:
    """float32 (N, 2048) features of images (N, 1 or 3, H, W), uint8 or float in [0, 1] (quantized as a PNG)."""
    images = quantize(images).cpu()
    return torch.cat([network.features(resize(images[i:i + batch_size], resize_mode))
                      for i in range(0, len(images), batch_size)]).numpy()


def cache_path(cache_dir: str | Path, provenance: dict) -> Path:
    """The cache file of a reference set: named by what identifies it, less the fingerprint (a changed dataset
    overwrites its file rather than adding one)."""
    key = json.dumps({k: v for k, v in provenance.items() if k != "fingerprint"}, sort_keys=True)
    data = str(provenance["data"])
    name = Path(data.split()[-1]).name if "/" in data else data  # a path's last part, else the whole name
    slug = "".join(c if c.isalnum() else "-" for c in name)[:40]
    return Path(cache_dir) / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddpm" / "fid"


def reference_statistics(images: ReferenceImages, network: Inception, resize_mode: str,
                         cache_dir: str | Path | None = None, batch_size: int = 64, num_workers: int = 0,
                         ctx: distributed.Context | None = None, progress: bool = True) -> ReferenceStatistics | None:
    """The statistics of `images` under `network` and `resize_mode`, from the cache when it holds them for exactly
    these images, settings and network, else computed (under torchrun each process a share) and cached.

    Returns them on the main process, None on the others.
    """
    ctx = ctx or distributed.Context(0, 0, 1, network.device)
    provenance = {**images.identity, "resize": resize_mode, "network": network.sha256}
    path = cache_path(cache_dir or default_cache_dir(), provenance)
    cached = None
    if ctx.is_main and path.is_file():
        try:
            cached = ReferenceStatistics.load(path)
        except DataError as error:
            tqdm.write(f"recomputing the reference statistics: {error}")
        if cached is not None and cached.provenance != provenance:
            changed = [k for k in PROVENANCE if cached.provenance.get(k) != provenance[k]]
            tqdm.write(f"recomputing the reference statistics in {path}: its {', '.join(changed)} differ")
            cached = None
    if distributed.from_main(ctx, float(cached is not None)):
        if ctx.is_main:
            tqdm.write(f"reference statistics from the cache: {path}")
        return cached if ctx.is_main else None
    share = range(ctx.rank * len(images) // ctx.world_size, (ctx.rank + 1) * len(images) // ctx.world_size)
    features = features_of_dataset(images, share, network, resize_mode, batch_size, num_workers,
                                   progress=progress and ctx.is_main,
                                   desc=f"features of {len(images)} reference images")
    gathered = distributed.gather_to_main(ctx, features)
    if not ctx.is_main:
        return None
    reference = ReferenceStatistics(FeatureStatistics.of(np.concatenate(gathered)), provenance)
    reference.save(path)
    tqdm.write(f"reference statistics computed and cached: {path}")
    return reference


def compare(features: np.ndarray, reference: ReferenceStatistics) -> dict[str, float | int | None]:
    """FID and KID of (n, 2048) features against the reference."""
    mine = FeatureStatistics.of(features)
    ref = reference.statistics
    kid = kernel_inception_distance(features, ref.kid_features) if ref.kid_features is not None else None
    kid_mean, kid_std = kid if kid is not None else (None, None)
    subset_size = None if kid is None else min(KID_SUBSET_SIZE, len(features), len(ref.kid_features))
    return {"fid": frechet_distance(mine.mu, mine.sigma, ref.mu, ref.sigma), "kid_mean": kid_mean,
            "kid_std": kid_std, "num_images": len(features), "num_reference": ref.count,
            "kid_subsets": None if kid is None else KID_SUBSETS, "kid_subset_size": subset_size}


def check_comparable(reference: ReferenceStatistics, network: Inception, resize_mode: str) -> None:
    """A one-line error unless the reference was computed with this network and resize (when it says)."""
    p = reference.provenance
    if p and (p["network"], p["resize"]) != (network.sha256, resize_mode):
        raise DataError(f"{reference.describe()} was computed with network {p['network'][:12]} and resize "
                        f"{p['resize']}, not {network.sha256[:12]} and {resize_mode}: FIDs compare only within one "
                        "network and resize")


def fid_of_samples(images: torch.Tensor, reference: ReferenceStatistics, network: Inception,
                   resize_mode: str | None = None, batch_size: int = 64) -> dict[str, float | int | None]:
    """FID and KID of images (N, C, H, W), uint8 or float in [0, 1], against the reference; the resize is the
    reference's own unless given (a pytorch-fid .npz does not say)."""
    resize_mode = resize_mode or reference.provenance.get("resize") or "legacy_tensorflow"
    check_comparable(reference, network, resize_mode)
    return compare(features_of_images(images, network, resize_mode, batch_size), reference)
