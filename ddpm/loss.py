"""The training objective: DDPM Algorithm 1 and L_simple (Eq. 14), with the x_0 and v targets."""

import torch
import torch.nn.functional as F
from torch import nn

from .scheduler import DDPMScheduler


def training_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the network learns to output for x_t: eps (DDPM), x_0 itself, or v (Salimans & Ho 2022)."""
    prediction_type = scheduler.config["prediction_type"]
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    return scheduler.get_velocity(x0, noise, timesteps)


def diffusion_loss(unet: nn.Module, scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor,
                   timesteps: torch.Tensor) -> torch.Tensor:
    """Algorithm 1, lines 2-5, for a batch x0 with its noise eps and timesteps t drawn by the caller:
    L_simple = || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2   (Eq. 14),
    averaged over pixels and batch. The MSE is taken in fp32 even under autocast."""
    noisy = scheduler.add_noise(x0, noise, timesteps)  # Eq. 4
    prediction = unet(noisy, timesteps)
    target = training_target(scheduler, x0, noise, timesteps)
    return F.mse_loss(prediction.float(), target.float())
