"""The training objective: DDPM Algorithm 1 and L_simple (Eq. 14), with the x_0 and v targets, the optional
min-SNR-gamma weighting of Hang et al. 2023, and class labels for classifier-free guidance (Ho & Salimans 2022)."""

import torch
import torch.nn.functional as F
from torch import nn

from .scheduler import DDPMScheduler


def draw_noise_and_timesteps(x0: torch.Tensor, num_train_timesteps: int,
                             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1, lines 3-4, for a batch x0: t ~ Uniform({1, ..., T}) (0-based here) and eps ~ N(0, I).
    eps is drawn first, then t: the order of every run's noise stream, which exact resume replays."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    timesteps = torch.randint(0, num_train_timesteps, (x0.shape[0],), generator=generator, device=x0.device)
    return noise, timesteps


def training_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the network learns to output for x_t: eps (DDPM), x_0 itself, or v (Salimans & Ho 2022)."""
    prediction_type = scheduler.config["prediction_type"]
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    return scheduler.get_velocity(x0, noise, timesteps)


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights, one per timestep (Hang et al. 2023, "Efficient Diffusion Training via
    Min-SNR Weighting Strategy"; diffusers' --snr_gamma).

    With SNR(t) = abar_t / (1 - abar_t), the x_0 loss is weighted by w_t = min(SNR(t), gamma). The same
    weighting of the other targets, whose squared error is the x_0 error times SNR(t) (eps) or
    SNR(t) + 1 (v), divides it by that factor:
      x_0: min(SNR, gamma)    eps: min(SNR, gamma) / SNR = min(1, gamma / SNR)    v: min(SNR, gamma) / (SNR + 1)
    The eps form is written min(1, gamma / SNR) so that SNR = 0 (a zero-terminal-SNR schedule) gives its limit, 1.
    """
    abar = scheduler.alphas_cumprod_on(timesteps.device, torch.float32)[timesteps]
    snr = abar / (1 - abar)
    prediction_type = scheduler.config["prediction_type"]
    if prediction_type == "epsilon":
        return (snr_gamma / snr).clamp(max=1)
    if prediction_type == "sample":
        return snr.clamp(max=snr_gamma)
    return snr.clamp(max=snr_gamma) / (snr + 1)


def diffusion_loss(unet: nn.Module, scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor,
                   timesteps: torch.Tensor, snr_gamma: float | None = None,
                   class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Algorithm 1, line 5's objective, for a batch x0 with the eps and t of draw_noise_and_timesteps:
    L_simple = || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2   (Eq. 14),
    averaged over pixels and batch; with snr_gamma, each image's error is weighted by min_snr_weights first;
    with class_labels, eps_theta(x_t, t, c) (Ho & Salimans 2022, Algorithm 1). The MSE is in fp32 under autocast."""
    x_t = scheduler.add_noise(x0, noise, timesteps)  # Eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
    prediction = unet(x_t, timesteps) if class_labels is None else unet(x_t, timesteps, class_labels)
    target = training_target(scheduler, x0, noise, timesteps)
    if snr_gamma is None:
        return F.mse_loss(prediction.float(), target.float())
    per_image = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_image * min_snr_weights(scheduler, timesteps, snr_gamma)).mean()
