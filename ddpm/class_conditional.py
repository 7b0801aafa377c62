"""Sampling and scoring a class-conditional model: which classes a grid or a set of many images asks for, guided
sampling of given labels in batches (ddpm/guidance.py's GuidedUNet through ddpm/sampling.py's generate), the grid
with a row per class, and on the built-in shapes the conditional accuracy: the fraction of the samples whose
fitted class (ddpm/shapes_score.py) is the class asked for. ddpm/conditional_evaluation.py scores a training run."""

import math
from collections.abc import Callable

import torch
from torch import nn

from .guidance import GuidedUNet
from .sampling import Scheduler, generate


def images_per_class(num_images: int) -> int:
    """The images in each class's row of a grid standing for `num_images`: a row of the square grid of that many."""
    return math.ceil(math.sqrt(num_images))


def grid_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """0, ..., 0, 1, ..., 1, ...: `per_class` images of each class, class by class (a row each in the sample grid, per_row=per_class)."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def balanced_labels(indices: list[int] | range, num_classes: int) -> torch.Tensor:
    """Image i's class is i mod K: any first N images are balanced over the classes to within one."""
    return torch.as_tensor(list(indices), dtype=torch.int64) % num_classes


def generate_for_labels(unet: nn.Module, scheduler: Scheduler, class_labels: torch.Tensor,
                        generator: torch.Generator | list[torch.Generator],
                        num_inference_steps: int | None = None, guidance_scale: float = 1.0, batch_size: int = 64,
                        eta: float = 0.0, progress: bool = False,
                        wrap: Callable[[nn.Module], nn.Module] | None = None) -> torch.Tensor:
    """One image per label, drawn by `generate` in batches of at most `batch_size`, each batch guided towards its
    labels with scale `guidance_scale` (GuidedUNet); `generator`: one for all, drawn batch after batch, or one per
    image. `wrap` (e.g. FastUNet) goes around each GuidedUNet. Returns (N, C, H, W) in [0, 1] on the CPU."""
    if isinstance(generator, list) and len(generator) != len(class_labels):
        raise ValueError(f"generate_for_labels: {len(generator)} generators for {len(class_labels)} labels; "
                         "pass one generator, or one per label")
    images = []
    for start in range(0, len(class_labels), batch_size):
        labels = class_labels[start:start + batch_size]
        model = GuidedUNet(unet, labels, guidance_scale)
        batch_generator = generator[start:start + len(labels)] if isinstance(generator, list) else generator
        images.append(generate(wrap(model) if wrap else model, scheduler, len(labels), batch_generator,
                               num_inference_steps, eta=eta, progress=progress))
    return torch.cat(images)


def conditional_accuracy(fitted_classes: torch.Tensor, class_labels: torch.Tensor) -> float:
    """The fraction of samples whose fitted class is the class asked for (valid or not: an invalid sample counts
    against it only if its best fit is another class)."""
    return (fitted_classes.cpu() == class_labels.cpu()).float().mean().item()
