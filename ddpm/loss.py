"""The training objective: DDPM Algorithm 1 and L_simple (Eq. 14), with the x_0 and v targets, and the
optional min-SNR-gamma weighting of Hang et al. 2023."""

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


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, snr_gamma: float,
                    snr_floor: float | None = None) -> torch.Tensor:
    """Min-SNR-gamma loss weights, one per timestep (Hang et al. 2023, "Efficient Diffusion Training via
    Min-SNR Weighting Strategy"; diffusers' --snr_gamma).

    With SNR(t) = abar_t / (1 - abar_t), the x_0 loss is weighted by w_t = min(SNR(t), gamma). The same
    weighting of the other targets, whose squared error is the x_0 error times SNR(t) (eps) or
    SNR(t) + 1 (v), divides it by that factor:
      x_0: min(SNR, gamma)    eps: min(SNR, gamma) / SNR = min(1, gamma / SNR)    v: min(SNR, gamma) / (SNR + 1)
    The eps form is written min(1, gamma / SNR) so that SNR = 0 (a zero-terminal-SNR schedule) gives its limit, 1.

    With snr_floor f (x_0 and v only), the x_0 weight is also held at f or above where SNR(t) < f:
    clamp(SNR, f, gamma), with the floor of Salimans & Ho's truncated-SNR weighting max(SNR, 1) (2022,
    "Progressive Distillation", Sec. 4) at f = 1. Without it the high-noise steps, where a sample's shape,
    colour and place are decided, weigh almost nothing (SNR -> 0 as t -> T).
    """
    abar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = abar / (1 - abar)
    prediction_type = scheduler.config["prediction_type"]
    if prediction_type == "epsilon":
        if snr_floor is not None:  # floor / SNR grows without bound as SNR -> 0
            raise ValueError("a floor on the min-SNR weight is for x_0 and v prediction, not epsilon")
        return (snr_gamma / snr).clamp(max=1)
    x0_weight = snr.clamp(min=snr_floor, max=snr_gamma)
    return x0_weight if prediction_type == "sample" else x0_weight / (snr + 1)


def diffusion_loss(unet: nn.Module, scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor,
                   timesteps: torch.Tensor, snr_gamma: float | None = None,
                   snr_floor: float | None = None) -> torch.Tensor:
    """Algorithm 1, lines 2-5, for a batch x0 with its noise eps and timesteps t drawn by the caller:
    L_simple = || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2   (Eq. 14),
    averaged over pixels and batch; with snr_gamma (and snr_floor), each image's error is weighted by
    min_snr_weights first.
    The MSE is taken in fp32 even under autocast."""
    noisy = scheduler.add_noise(x0, noise, timesteps)  # Eq. 4
    prediction = unet(noisy, timesteps)
    target = training_target(scheduler, x0, noise, timesteps)
    if snr_gamma is None:
        return F.mse_loss(prediction.float(), target.float())
    per_image = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_image * min_snr_weights(scheduler, timesteps, snr_gamma, snr_floor)).mean()
