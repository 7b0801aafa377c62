"""Sampling: DDPM Algorithm 2, run exactly as diffusers' DDPMPipeline runs it."""

import torch
from torch import nn
from tqdm.auto import tqdm

from .scheduler import DDPMScheduler, randn
from .unet import unwrap_model


@torch.inference_mode()
def generate(unet: nn.Module, scheduler: DDPMScheduler, batch_size: int, generator: torch.Generator | None = None,
             num_inference_steps: int = 1000, progress: bool = False) -> torch.Tensor:
    """Draw `batch_size` images; returns a CPU float tensor (B, C, H, W) in [0, 1].

    The same weights and `generator=torch.manual_seed(s)` give the same pixels as
    `DDPMPipeline(...)(batch_size, generator=torch.manual_seed(s), output_type="np")`:
    one draw for x_T, then one per step with t > 0, in that order.
    """
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
    # Algorithm 2, lines 2-5: for t = T..1, x_{t-1} = mu_theta(x_t, t) + sigma_t z
    for t in tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False):
        model_output = unet(x, t)
        x = scheduler.step(model_output, t, x, generator=generator)
    unet.train(was_training)
    # Algorithm 2, line 6: return x_0, mapped from [-1, 1] to [0, 1]
    return (x / 2 + 0.5).clamp(0, 1).float().cpu()
