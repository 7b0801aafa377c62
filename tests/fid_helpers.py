"""What the FID tests share: a tiny TorchScript network with the Inception's interface, and folders of images."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

ACTIVE = 24  # the tiny network's features that vary; the other 2,024 are 0, so FID's eigen-decompositions stay small


class TinyInception(nn.Module):
    """float32 (N, 3, 299, 299) to (N, 2048): a 13 x 13 convolution of stride 13, pooled to 2 x 2, through tanh."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, ACTIVE // 4, kernel_size=13, stride=13)
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.tanh(self.pool(self.conv(x)).flatten(1))
        return torch.cat([features, torch.zeros(x.shape[0], 2048 - features.shape[1])], dim=1)


def save_tiny_inception(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    torch.jit.script(TinyInception()).save(path)
    return path


def write_images(folder: Path, count: int, seed: int, size: tuple[int, int] = (12, 10), grey_every: int = 0,
                 offset: int = 0) -> list[np.ndarray]:
    """`count` random images 0.png, 1.png, ... (every `grey_every`-th grey); returns their pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = []
    for i in range(count):
        grey = grey_every and i % grey_every == 0
        shape = (size[1], size[0]) if grey else (size[1], size[0], 3)
        pixels = rng.integers(offset, 256 - offset, shape, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        written.append(pixels)
    return written
