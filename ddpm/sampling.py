"""Sampling: DDPM Algorithm 2, DDIM (Eq. 12) or DPM-Solver++, run exactly as diffusers' DDPMPipeline and DDIMPipeline
run them."""

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from .ddim import DDIMScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .scheduler import DDPMScheduler, randn
from .unet import unwrap_model

Scheduler = DDPMScheduler | DDIMScheduler | DPMSolverMultistepScheduler

# Every sampler a script offers (--sampler NAME): its scheduler class, and its step count unless told:
# DDPMPipeline's 1000, DDIMPipeline's 50, and DPM-Solver's 20 (where its paper finds it near converged).
SAMPLERS: dict[str, type[Scheduler]] = {
    "ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler,
    "dpm-sde": DPMSolverMultistepScheduler,
}
DEFAULT_STEPS: dict[str, int] = {"ddpm": 1000, "ddim": 50, "dpm": 20, "dpm-sde": 20}
# dpm-sde: SDE-DPM-Solver++ (noise at each step) over trailing timesteps, which in 20 steps kept DDPM-1000's
# quality where the deterministic solver did not (docs/sampling.md)
SAMPLER_OPTIONS: dict[str, dict[str, Any]] = {
    "dpm-sde": {"algorithm_type": "sde-dpmsolver++", "timestep_spacing": "trailing"},
}


def sampling_scheduler(sampler: str, config: Mapping[str, Any]) -> Scheduler:
    """The scheduler that samples with `sampler` (a name in SAMPLERS), built from a scheduler's config (the
    training DDPMScheduler's): as diffusers' `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
    if sampler in SAMPLER_OPTIONS:  # as diffusers' DPMSolverMultistepScheduler.from_config(config, **options)
        return SAMPLERS[sampler].from_config(config, **SAMPLER_OPTIONS[sampler])
    return SAMPLERS[sampler].from_config(config)


def sampler_name(scheduler: Scheduler) -> str:
    """The name in SAMPLERS of the scheduler's class (and options)."""
    for name, options in SAMPLER_OPTIONS.items():
        if isinstance(scheduler, SAMPLERS[name]) and all(scheduler.config.get(k) == v for k, v in options.items()):
            return name
    return next(name for name, cls in SAMPLERS.items() if isinstance(scheduler, cls))


@torch.inference_mode()
def generate(unet: nn.Module, scheduler: Scheduler, batch_size: int,
             generator: torch.Generator | list[torch.Generator] | None = None,
             num_inference_steps: int | None = None, eta: float = 0.0, progress: bool = False) -> torch.Tensor:
    """Draw `batch_size` images; returns a CPU float tensor (B, C, H, W) in [0, 1].

    The same weights and `generator=torch.manual_seed(s)` give the same pixels as
    `DDPMPipeline(...)(batch_size, generator=torch.manual_seed(s), output_type="np")` (1000 steps by default),
    or with a DDIMScheduler as `DDIMPipeline(...)(batch_size, generator=..., eta=eta)` (50 steps by default),
    or with a DPMSolverMultistepScheduler as a DDPMPipeline given that scheduler (20 steps by default here):
    one draw for x_T, then one per step that adds noise, in that order. A list of generators, one per image,
    draws each image's noise from its own generator, as those pipelines do with such a list.
    """
    is_ddim = isinstance(scheduler, DDIMScheduler)
    if eta != 0 and not is_ddim:
        raise ValueError(f"generate: eta={eta} needs a DDIMScheduler; the {type(scheduler).__name__} has no eta "
                         "(DDPM's own noise is DDIM's eta = 1)")
    if isinstance(generator, list) and len(generator) != batch_size:
        raise ValueError(f"generate: {len(generator)} generators for a batch of {batch_size} images; "
                         "pass one per image")
    if num_inference_steps is None:
        num_inference_steps = DEFAULT_STEPS[sampler_name(scheduler)]
    config = unwrap_model(unet).config
    size = config["sample_size"]
    if size is None:
        raise ValueError("generate: the UNet config has no sample_size, so the image size is unknown")
    height, width = (size, size) if isinstance(size, int) else size
    parameter = next(unet.parameters())

    was_training = unet.training
    unet.eval()
    # Algorithm 2, line 1: x_T ~ N(0, I)
    x = randn((batch_size, config["in_channels"], height, width), generator, parameter.device, parameter.dtype)
    scheduler.set_timesteps(num_inference_steps)
    step_options = {"eta": eta} if is_ddim else {}
    # Algorithm 2, lines 2-5: for t = T..1, x_{t-1} = mu_theta(x_t, t) + sigma_t z (DDIM: Eq. 12 over the tau_i;
    # DPM-Solver++: one multistep solver step from t_{i-1} to t_i)
    for t in tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False):
        model_output = unet(x, t)
        x = scheduler.step(model_output, t, x, generator=generator, **step_options)
    unet.train(was_training)
    # Algorithm 2, line 6: return x_0, mapped from [-1, 1] to [0, 1]
    return (x / 2 + 0.5).clamp(0, 1).float().cpu()


def generate_in_batches(unet: nn.Module, scheduler: Scheduler, count: int,
                        generator: torch.Generator, num_inference_steps: int | None = None, batch_size: int = 64,
                        progress: bool = False) -> torch.Tensor:
    """`count` >= 1 images drawn by `generate` in batches of at most `batch_size`, one generator throughout."""
    return torch.cat([generate(unet, scheduler, min(batch_size, count - start), generator, num_inference_steps,
                               progress=progress) for start in range(0, count, batch_size)])


def image_generators(seed: int, indices: list[int]) -> list[torch.Generator]:
    """One CPU generator per image, so that image i's noise depends on (seed, i) alone, not on the batch.

    torch's CPU generator keeps 32 bits of its seed, so image i gets seed (start + i) mod 2^32 with `start`
    hashed from `seed`: the images of one run never share noise, and runs with different seeds almost surely
    do not overlap (the chance is about 2 x num_images / 2^32). `generate(unet, scheduler, 1,
    image_generators(seed, [i]))` redraws image i alone.
    """
    start = int(np.random.SeedSequence(seed).generate_state(1)[0])
    return [torch.Generator().manual_seed((start + i) % 2**32) for i in indices]


def sample_grid(images: torch.Tensor, min_side: int = 256, per_row: int | None = None) -> torch.Tensor:
    """The images (B, C, H, W) in [0, 1] as one grid of `per_row` (default ceil(sqrt(B))) columns (torchvision's
    make_grid, 2 px padding), enlarged by a whole factor, nearest-neighbour, until its short side is at least
    `min_side` pixels: 16 tiles of 16 px make a 74 px grid, too small to judge on a screen, shown at 296 px; each
    pixel a block."""
    grid = make_grid(images, nrow=per_row or math.ceil(math.sqrt(len(images))))
    factor = math.ceil(min_side / min(grid.shape[1:]))
    return grid.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2) if factor > 1 else grid
