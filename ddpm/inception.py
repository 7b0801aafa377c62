"""The network of FID and KID: the TF "2015-12-05" Inception v3 up to pool_3 (2048 features), and how an image
reaches its 299 x 299 input.

An image goes in as uint8 pixels p (grey repeated to 3 channels), is resized to 299 x 299 in float (RESIZES), and
enters the network as (p - 128) / 128: the TF graph's own Sub and Mul, as torch-fidelity and clean-fid feed it.

The network is torch-fidelity's port of the TF graph (weights downloaded by torch-fidelity on first use; the
optional extra `pip install -e '.[fid]'`), or any TorchScript file given as --inception PATH that maps
float32 N x 3 x 299 x 299 inputs, so scaled, to N x 2048 features. docs/fid.md compares the libraries.
"""

import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

INPUT_SIZE = 299
FEATURES = 2048

# How an image reaches 299 x 299, named as clean-fid names its modes (Parmar et al. 2022):
# legacy_tensorflow: TF 1.x resize_bilinear (align_corners=False, no half-pixel centres), as the papers' TF code
#   and torch-fidelity resize; clean: PIL bicubic on each channel in float, as clean-fid; legacy_pytorch:
#   F.interpolate bilinear (align_corners=False, no antialiasing), as pytorch-fid.
RESIZES = ("legacy_tensorflow", "clean", "legacy_pytorch")


class InceptionError(ValueError):
    """The network cannot be loaded or used; the message says what was seen and what to do."""


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) with C = 1 or 3 as (N, 3, H, W): grey images repeated to three channels."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise InceptionError(f"the Inception takes uint8 images (N, 1 or 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def resize(images: torch.Tensor, mode: str) -> torch.Tensor:
    """uint8 (N, 1 or 3, H, W) as float32 (N, 3, 299, 299) pixels in [0, 255], resized as `mode` says."""
    images = to_rgb(images)
    if mode == "legacy_tensorflow":
        return resize_bilinear_tf1(images.float(), INPUT_SIZE)
    if mode == "legacy_pytorch":
        return F.interpolate(images.float(), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    if mode == "clean":
        return torch.stack([resize_clean(image) for image in images])
    raise InceptionError(f"unknown resize {mode!r}; use one of {', '.join(RESIZES)}")


def resize_clean(image: torch.Tensor) -> torch.Tensor:
    """clean-fid's "clean" resize of one uint8 (3, H, W) image: each channel a PIL float ("F") image, resized
    bicubic to 299 x 299, clipped to [0, 255] and not rounded."""
    channels = [np.asarray(Image.fromarray(channel.numpy().astype(np.float32))
                           .resize((INPUT_SIZE, INPUT_SIZE), resample=Image.BICUBIC)) for channel in image]
    return torch.from_numpy(np.stack(channels).clip(0, 255))


def resize_bilinear_tf1(images: torch.Tensor, size: int) -> torch.Tensor:
    """TF 1.x tf.image.resize_bilinear(align_corners=False) of float (N, C, H, W) to (size, size).

    Output pixel i reads the input at x = i * (in / out) (no half-pixel offset), its neighbours floor(x) and
    floor(x) + 1 (clamped to the edge), weighted by the fraction; scale and positions in float32, as TF computes
    them, and the same order of operations as torch-fidelity's bit-exact port.
    """
    def taps(length: int):
        position = torch.arange(size, dtype=torch.float32) * torch.tensor(length / size, dtype=torch.float32)
        low = position.long()
        return low, (low + 1).clamp(max=length - 1), (position - low.float()).to(images.dtype)

    top, bottom, dy = taps(images.shape[2])
    left, right, dx = taps(images.shape[3])
    upper, lower = images[:, :, top, :], images[:, :, bottom, :]
    upper = upper[..., left] + (upper[..., right] - upper[..., left]) * dx
    lower = lower[..., left] + (lower[..., right] - lower[..., left]) * dx
    return upper + (lower - upper) * dy.view(-1, 1)


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class TorchFidelityPool3(nn.Module):
    """torch-fidelity's FeatureExtractorInceptionV3 from its first convolution to pool_3, on inputs already
    resized and scaled: the layers its forward runs after its own resize and (x - 128) / 128."""

    LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
              "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
              "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool")

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.layers = nn.Sequential(*(getattr(extractor, name) for name in self.LAYERS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).flatten(1)


class Inception:
    """A pool_3 network, with the sha256 of its weights file: FIDs compare only within one network and resize."""

    def __init__(self, module: nn.Module, sha256: str, description: str, device: torch.device | str = "cpu"):
        self.module = module.eval().to(device)  # eval: batch norm with its stored statistics, whatever the batch
        self.sha256, self.description, self.device = sha256, description, torch.device(device)

    @torch.inference_mode()
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """float32 (N, 3, 299, 299) pixels in [0, 255] (from `resize`) to float32 (N, 2048) features on the CPU."""
        out = self.module(((pixels - 128) / 128).to(self.device))  # the TF graph's Sub 128 and Mul 1/128
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape != (len(pixels), FEATURES):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InceptionError(f"the Inception {self.description} returned {shape} for {len(pixels)} images; "
                                 f"a pool_3 network returns (N, {FEATURES})")
        return out.float().cpu()


def load_inception(path: str | None = None, device: torch.device | str = "cpu") -> Inception:
    """The TorchScript network at `path`, or (None) torch-fidelity's, its weights downloaded on first use."""
    if path is not None:
        if not Path(path).is_file():
            raise InceptionError(f"--inception {path!r}: no such file; pass a TorchScript pool_3 network "
                                 "(docs/fid.md says where to get one)")
        try:
            with warnings.catch_warnings():  # torch 2.9+ calls TorchScript deprecated; the format is the interface here
                warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", FutureWarning)
                module = torch.jit.load(path, map_location="cpu")
        except (RuntimeError, ValueError) as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise InceptionError(f"--inception {path!r} is not a TorchScript file: {reason}") from None
        return Inception(module, sha256_of(path), str(path), device)
    return torch_fidelity_inception(device)


def torch_fidelity_inception(device: torch.device | str = "cpu") -> Inception:
    """torch-fidelity's TF-ported Inception v3, the weights file downloaded into torch's hub cache once."""
    try:
        from torch_fidelity import feature_extractor_inceptionv3 as tf_inception
    except ImportError:
        raise InceptionError("the default Inception is torch-fidelity's: pip install -e '.[fid]' (or "
                             "pip install torch-fidelity), or pass --inception PATH, a TorchScript network") from None
    url = tf_inception.URL_INCEPTION_V3
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # the file name ends in the first 8 hex digits of its sha256, which the download checks
            torch.hub.download_url_to_file(url, str(path), hash_prefix=path.stem.rsplit("-", 1)[-1])
        except (OSError, RuntimeError) as error:
            raise InceptionError(f"could not download torch-fidelity's Inception weights from {url} ({error}); "
                                 "without network pass --inception PATH, a TorchScript network") from None
    extractor = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                         feature_extractor_weights_path=str(path))
    return Inception(TorchFidelityPool3(extractor), sha256_of(path), f"torch-fidelity {path.name}", device)
