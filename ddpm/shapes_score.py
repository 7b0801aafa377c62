"""A score for samples of a model trained on the built-in shapes dataset: do they look like its images?

Each sample is fitted by the best rendering of the dataset's own generative factors (shape, colour,
background, side, centre), drawn by the dataset's own renderer (ShapesSource.render). A sample is valid
when the RMSE of its best fit is under VALID_RMSE. The score reports the valid fraction, how many of the
24 classes (shape x colour x background) the valid samples cover, and the total-variation distance of
their class histogram to the uniform one (the dataset draws the classes uniformly); and the median best-fit
RMSE, which still tells models apart when none of their samples is valid.
"""

import functools
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from .data import ShapeFactors, ShapesSource

# The fit: a grid search over sides and centres in steps of COARSE_STEP of the image side (0.5 px at 16 px), on
# the image averaged down to at most GRID_RESOLUTION px (the grid's masks stay few); then a local search at the
# image's own resolution, one canvas pixel (1/4 px) at a time in the end.
GRID_RESOLUTION, COARSE_STEP = 16, 1 / 32
# Best-fit RMSE, in levels of 0..255, under which a sample is valid. Measured with
# benchmarks/shapes_score_calibration.py on 2,048 built-in images of seed 1, fraction under 6 (RMSE min..max):
#                  8 px                 16 px                 32 px
#   real           1.000 (0.00..0.00)   1.000 (0.00..4.44)    1.000 (0.00..4.12)
#   blur sigma 1   0.000 (8.27..44.8)   0.000 (7.25..27.7)    0.009 (5.13..18.2)
#   blur sigma 0.5 0.119 (3.15..17.2)   0.520 (2.51..10.8)    0.978 (1.63..8.01)
#   uniform noise  0.000 (94.9..113)    0.000 (108..118)      0.000 (113..119)
VALID_RMSE = 6.0

CLASSES = ShapesSource.CLASSES  # the built-in dataset's class labels: index k is label k
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


@dataclass
class ShapesScore:
    valid_fraction: float  # samples whose best fit has RMSE < VALID_RMSE
    classes_covered: int  # of the 24 (shape x colour x background), among the valid samples
    tv_to_uniform: float  # total-variation distance of the valid samples' class histogram to uniform; 1 if none
    median_rmse: float  # of the best fits of all samples, in levels of 0..255
    num_images: int

    def __str__(self) -> str:
        valid = round(self.valid_fraction * self.num_images)
        return (f"valid {self.valid_fraction:.3f} ({valid} of {self.num_images}), classes {self.classes_covered} "
                f"of {len(CLASSES)}, TV to uniform {self.tv_to_uniform:.3f}, median fit RMSE {self.median_rmse:.1f}")


@functools.lru_cache(maxsize=4)
def candidates(resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The coarse grid: each (shape index, side, cx, cy), (M, 4), and its coverage mask (M, resolution^2) in [0, 1].

    A mask is the shape drawn white on black by the dataset's renderer: an image of the dataset is
    background + mask * (colour - background), up to rounding.
    """
    source = ShapesSource(resolution, seed=0, size=1)
    step = COARSE_STEP * resolution
    geometry, masks = [], []
    low, high = (fraction * resolution for fraction in ShapesSource.SIDE)
    for side in np.linspace(low, high, round((high - low) / step) + 1):
        centres = np.linspace(side / 2, resolution - side / 2, round((resolution - side) / step) + 1)
        for shape_index, shape in enumerate(ShapesSource.SHAPES):
            for cx in centres:
                for cy in centres:
                    geometry.append((shape_index, side, cx, cy))
                    masks.append(pixels_of(source.render(ShapeFactors(shape, WHITE, BLACK, side, cx, cy)))[0])
    return torch.tensor(geometry, dtype=torch.float64), torch.stack(masks).flatten(1) / 255


def pixels_of(image) -> torch.Tensor:
    """A PIL RGB image as a float tensor (3, H, W) in levels of 0..255."""
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(
        image.height, image.width, 3).permute(2, 0, 1).float()


@dataclass
class Fit:
    classes: torch.Tensor  # (N,) index into CLASSES of each sample's best fit
    rmse: torch.Tensor  # (N,) RMSE of that fit, in levels of 0..255
    factors: list[ShapeFactors]


def fit(images: torch.Tensor, chunk: int = 2048) -> Fit:
    """The best rendering of the dataset's factors for each image (N, 3, H, W) in [0, 1], H = W."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise ValueError(f"the shapes score needs square RGB images (N, 3, H, H), got shape {tuple(images.shape)}")
    x = 255 * images.float()
    resolution = x.shape[-1]
    small = F.interpolate(x, size=GRID_RESOLUTION, mode="area") if resolution > GRID_RESOLUTION else x
    zoom = resolution / small.shape[-1]
    starts = [replace(f, side=f.side * zoom, cx=f.cx * zoom, cy=f.cy * zoom) for f in grid_search(small, chunk)]
    factors = [refine(image, start) for image, start in zip(x, starts)]
    source = ShapesSource(resolution, seed=0, size=1)
    rmse = torch.stack([(pixels_of(source.render(f)) - image).pow(2).mean().sqrt() for f, image in zip(factors, x)])
    classes = torch.tensor([CLASSES.index((f.shape, f.color, f.background)) for f in factors])
    return Fit(classes, rmse, factors)


def grid_search(x: torch.Tensor, chunk: int) -> list[ShapeFactors]:
    """The best coarse-grid rendering of each image x (N, 3, R, R) in levels of 0..255.

    For a mask a and a (colour c, background b), the squared error of x against b + a (c - b) is
    |x - b|^2 - 2 a . ((x - b) . (c - b)) + |c - b|^2 |a|^2: one matrix product over all masks and images.
    """
    geometry, masks = candidates(x.shape[-1])
    pixels = x.flatten(2).transpose(1, 2)  # (N, P, 3)
    n, p = pixels.shape[:2]
    colors = torch.tensor(ShapesSource.COLORS, dtype=torch.float32)
    backgrounds = torch.tensor(ShapesSource.BACKGROUNDS, dtype=torch.float32)
    offsets = pixels[:, None] - backgrounds[None, :, None]  # (N, 2, P, 3): x - b
    contrast = colors[:, None] - backgrounds[None]  # (4, 2, 3): c - b
    # (x - b) . (c - b) for every image, colour and background: (P, N * 4 * 2)
    projections = torch.einsum("nbpk,cbk->pncb", offsets, contrast).reshape(p, -1)
    contrast_sq = contrast.pow(2).sum(-1).reshape(1, -1).repeat(1, n)  # (1, N * 4 * 2): |c - b|^2
    best_error = torch.full((n * 8,), float("inf"))
    best_mask = torch.zeros(n * 8, dtype=torch.long)
    for start in range(0, len(masks), chunk):
        a = masks[start:start + chunk]
        error = a.pow(2).sum(1, keepdim=True) * contrast_sq - 2 * (a @ projections)
        value, index = error.min(dim=0)
        better = value < best_error
        best_error[better], best_mask[better] = value[better], index[better] + start
    base = offsets.pow(2).sum(dim=(2, 3))  # (N, 2): |x - b|^2, the same for every mask
    best = (best_error.reshape(n, 4, 2) + base[:, None, :]).reshape(n, 8).argmin(dim=1)
    found = []
    for i, combination in enumerate(best.tolist()):
        shape_index, side, cx, cy = geometry[best_mask[i * 8 + combination]].tolist()
        found.append(ShapeFactors(ShapesSource.SHAPES[int(shape_index)], ShapesSource.COLORS[combination // 2],
                                  ShapesSource.BACKGROUNDS[combination % 2], side, cx, cy))
    return found


def refine(x: torch.Tensor, start: ShapeFactors) -> ShapeFactors:
    """A local search from `start` for the rendering of (start's shape and colours) that fits x best.

    The renderer truncates each coordinate to its canvas's pixel grid, so an image is fixed by the canvas pixels
    (L, T, R, B) that hold the shape's left, top, right and bottom edges, and for a triangle A, its apex. The
    search walks that grid: it moves one of them, or two opposite edges together, by one canvas pixel while the
    fit improves.
    """
    resolution, scale = x.shape[-1], ShapesSource.SUPERSAMPLE
    source = ShapesSource(resolution, seed=0, size=1)
    # the grid point is within about a grid step of the fit: walk there in steps of 2^k canvas pixels, then 1
    step = 2 ** math.floor(math.log2(max(1, resolution / GRID_RESOLUTION)))
    half = start.side / 2
    # an edge on the canvas's far border (r = big) draws as one in its last pixel
    cell = [min(math.floor(scale * value), resolution * scale - 1) for value in
            (start.cx - half, start.cy - half, start.cx + half, start.cy + half, start.cx)]
    coordinates = 5 if start.shape == "triangle" else 4
    directions = [tuple(d if k == j else 0 for k in range(5)) for j in range(coordinates) for d in (-1, 1)]
    directions += [(d, 0, d, 0, 0) for d in (-1, 1)] + [(0, d, 0, d, 0) for d in (-1, 1)]

    target = x.permute(1, 2, 0).numpy()  # (H, W, 3), as PIL's pixels

    def error(f: ShapeFactors) -> float:
        return float(np.square(np.asarray(source.render(f), dtype=np.float32) - target).sum())

    best = factors_in_cell(start, cell, resolution) or start
    best_error = error(best)
    while True:
        found = [(moved, factors_in_cell(start, moved, resolution))
                 for moved in ([c + step * d for c, d in zip(cell, direction)] for direction in directions)]
        found = [(moved, f, error(f)) for moved, f in found if f is not None]
        moved, f, e = min(found, key=lambda item: item[2], default=(None, None, math.inf))
        if e < best_error:
            cell, best, best_error = moved, f, e
        elif step > 1:
            step //= 2
        else:
            return best


def factors_in_cell(like: ShapeFactors, cell: list[int], resolution: int) -> ShapeFactors | None:
    """Factors (shape and colours of `like`) drawn with their edges (and apex) in the canvas pixels
    cell = [L, T, R, B, A], side and centre inside the dataset's ranges; None if there are none."""
    left, top, right, bottom, apex = cell
    scale = ShapesSource.SUPERSAMPLE
    big = resolution * scale
    low, high = (fraction * big for fraction in ShapesSource.SIDE)
    # the side s must put both l and l + s (and t and t + s) in their pixels: |s - (right - left)| < 1, etc.
    s_low = max(right - left - 1, bottom - top - 1, low)
    s_high = min(right - left + 1, bottom - top + 1, high)
    for k in range(8):  # a few sides across the allowed range: the apex may rule some out
        side = s_low + (k + 0.5) * (s_high - s_low) / 8
        # l in [L, L + 1), l + s in [R, R + 1), inside the canvas, and for a triangle l + s / 2 in [A, A + 1)
        l_low, l_high = max(left, right - side, 0.0), min(left + 1, right + 1 - side, big - side)
        if like.shape == "triangle":
            l_low, l_high = max(l_low, apex - side / 2), min(l_high, apex + 1 - side / 2)
        t_low, t_high = max(top, bottom - side, 0.0), min(top + 1, bottom + 1 - side, big - side)
        if s_low < s_high and l_low < l_high and t_low < t_high:
            l, t = (l_low + l_high) / 2, (t_low + t_high) / 2
            return ShapeFactors(like.shape, like.color, like.background, side / scale, (l + side / 2) / scale,
                                (t + side / 2) / scale)
    return None


def score(classes: torch.Tensor, rmse: torch.Tensor) -> ShapesScore:
    """The score of fitted samples: their best-fit classes and RMSEs."""
    valid = rmse < VALID_RMSE
    histogram = torch.bincount(classes[valid], minlength=len(CLASSES)).double()
    tv = 0.5 * (histogram / histogram.sum() - 1 / len(CLASSES)).abs().sum().item() if valid.any() else 1.0
    return ShapesScore(valid.double().mean().item(), int((histogram > 0).sum()), tv, rmse.quantile(0.5).item(), len(rmse))


def shapes_score(images: torch.Tensor) -> ShapesScore:
    """The shapes score of images (N, 3, H, W) in [0, 1], e.g. samples from ddpm.generate."""
    found = fit(images)
    return score(found.classes, found.rmse)
