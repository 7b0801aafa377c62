"""The variational bound of DDPM (Ho et al. 2020, Eq. 5) in bits per dimension: the NLL of the paper's Table 1.

    L = L_T + sum_{t=2..T} L_{t-1} + L_0                                        (Eq. 5)
    L_T     = KL(q(x_T | x_0) || p(x_T)),  p(x_T) = N(0, I)                     the prior term
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))             Gaussians: Eq. 6-7 against Eq. 1
    L_0     = -log p_theta(x_0 | x_1)                                           the discretised decoder, Eq. 13

Each term is averaged over the D = C*H*W dimensions of an image and divided by ln 2 (nats -> bits).
Code index i = 0..T-1 stands for the paper's t = i + 1, so the term computed at index i is the paper's L_i:
L_0 the decoder, L_1..L_{T-1} the KL terms. The order of operations and of the noise draws is that of the
original code's calc_bpd_loop (see ../shared/reference/nll.md).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import ImageSource, TrainingImages
from .scheduler import DDPMScheduler

# The model: (x_t in float32, timesteps (B,)) -> eps, x_0 or v, as the scheduler's prediction_type says.
Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

VARIANCES = ("fixed_small", "fixed_large")


def model_variance_of(variance_type: str) -> str:
    """fixed_small or fixed_large for a scheduler's variance_type (the _log variants are the same variances)."""
    return variance_type.removesuffix("_log")


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) per dimension, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) ~= 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as the original code (max error 1.8e-4)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log p(x) per dimension, in nats, for data on 256 levels in [-1, 1] (DDPM Eq. 13).

    The probability of the bin of width 2/255 around x under N(mean, exp(log_scale)^2); the first and last
    bins reach out to -inf and +inf.
    """
    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255))
    cdf_minus = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_bin = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_bin))


def x0_from_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images as TrainingImages gives them, (k / 255 - 0.5) / 0.5 in float32, as x_0 = k / 127.5 - 1 exactly
    (float64)."""
    k = ((images.double() + 1) * 127.5).round()  # the uint8 value k, recovered exactly
    return k / 127.5 - 1


@dataclass
class BoundTerms:
    """The terms of the bound for a batch, in bits/dim, each of shape (B,) or (B, T)."""

    prior: torch.Tensor  # L_T
    terms: torch.Tensor  # column i is L_i: the decoder L_0 in column 0, the KL terms L_1..L_{T-1} after it

    @property
    def decoder(self) -> torch.Tensor:
        return self.terms[:, 0]

    @property
    def kl(self) -> torch.Tensor:
        return self.terms[:, 1:].sum(dim=1)

    @property
    def total(self) -> torch.Tensor:
        return self.prior + self.terms.sum(dim=1)


class VariationalBound:
    """The constants of the bound for one noise schedule and model variance, and its terms for a batch.

    The betas are the scheduler's (the values the model was trained with); every constant derived from them is
    computed in float64, and so is every term, whatever the model's dtype. They live on `device`, which must be
    that of the images passed in. clip=False leaves the x_0 prediction unclipped (for the checks in nll.md).
    """

    def __init__(self, scheduler: DDPMScheduler, variance: str, device: str | torch.device = "cpu", clip: bool = True):
        if variance not in VARIANCES:
            raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
        self.T = scheduler.config["num_train_timesteps"]
        self.prediction_type = scheduler.config["prediction_type"]
        self.variance, self.clip = variance, clip
        if self.T < 2:
            raise ValueError(f"the bound needs at least 2 timesteps, the scheduler has {self.T}")
        betas = scheduler.betas.to(device=device, dtype=torch.float64)
        alphas = 1 - betas  # alpha_t = 1 - beta_t
        abar = torch.cumprod(alphas, dim=0)  # abar_t = prod_{s<=t} alpha_s
        abar_prev = torch.cat([torch.ones_like(abar[:1]), abar[:-1]])
        if self.prediction_type == "epsilon" and abar[-1] == 0:
            raise ValueError("abar_T = 0 (zero terminal SNR): x_0 cannot be predicted from epsilon at t = T")
        self.sqrt_abar, self.sqrt_one_minus_abar = abar.sqrt(), (1 - abar).sqrt()
        self.sqrt_recip_abar, self.sqrt_recip_abar_minus_one = (1 / abar).sqrt(), (1 / abar - 1).sqrt()
        self.log_one_minus_abar_T = torch.log(1 - abar[-1])

        # Eq. 7: q(x_{t-1} | x_t, x_0) = N(mutilde_t, betatilde_t I), with
        # mutilde_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
        # betatilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t
        self.posterior_mean_coef1 = betas * abar_prev.sqrt() / (1 - abar)
        self.posterior_mean_coef2 = (1 - abar_prev) * alphas.sqrt() / (1 - abar)
        posterior_variance = betas * (1 - abar_prev) / (1 - abar)
        # betatilde_1 = 0: its log is "clipped" to that of betatilde_2, as in the original code
        self.posterior_log_variance = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))

        # Sec. 3.2: sigma_t^2 = betatilde_t (fixed_small) or beta_t (fixed_large); at t = 1 both use betatilde_2,
        # so the decoder L_0 is the same for both and they differ in the KL terms
        if variance == "fixed_small":
            self.model_log_variance = self.posterior_log_variance
        else:
            self.model_log_variance = torch.log(torch.cat([posterior_variance[1:2], betas[1:]]))

    def prior(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, (B,): q(x_T | x_0) = N(sqrt(abar_T) x_0, (1 - abar_T) I)."""
        zero = torch.zeros((), dtype=torch.float64, device=x0.device)
        return mean_bits(normal_kl(self.sqrt_abar[-1] * x0, self.log_one_minus_abar_T, zero, zero))

    def p_mean_variance(self, output: torch.Tensor, x_t: torch.Tensor,
                        t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """p_theta(x_{t-1} | x_t) = N(mu_theta, sigma_t^2 I) from the model's output at x_t:
        (x0_hat, mu_theta, log sigma_t^2)."""
        if self.prediction_type == "epsilon":
            # Eq. 15, Eq. 4 solved for x_0: x_0 = sqrt(1 / abar_t) x_t - sqrt(1 / abar_t - 1) eps
            x0_hat = at(self.sqrt_recip_abar, t) * x_t - at(self.sqrt_recip_abar_minus_one, t) * output
        elif self.prediction_type == "sample":
            x0_hat = output
        else:  # v_prediction: x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v
            x0_hat = at(self.sqrt_abar, t) * x_t - at(self.sqrt_one_minus_abar, t) * output
        if self.clip:
            x0_hat = x0_hat.clamp(-1, 1)
        # mu_theta = mutilde_t(x0_hat, x_t), Eq. 7 (with x_0 from eps, this is Eq. 11)
        mean = at(self.posterior_mean_coef1, t) * x0_hat + at(self.posterior_mean_coef2, t) * x_t
        return x0_hat, mean, at(self.model_log_variance, t)

    def terms_at(self, model: Model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """L_t in bits/dim for each image of x0 (float64, (B, C, H, W)) at its own timestep t ((B,), 0-based):
        the KL term where t > 0, the decoder where t = 0. `noise` is the eps of x_t."""
        # Eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
        x_t = at(self.sqrt_abar, t) * x0 + at(self.sqrt_one_minus_abar, t) * noise
        _, model_mean, model_log_variance = self.p_mean_variance(model(x_t.float(), t).double(), x_t, t)
        # L_{t-1} of Eq. 5: the KL between the posterior q(x_{t-1} | x_t, x_0) and the model (Eq. 8; with fixed
        # variances and eps from the model, Eq. 12's weighted || eps - eps_theta ||^2 plus a constant)
        true_mean = at(self.posterior_mean_coef1, t) * x0 + at(self.posterior_mean_coef2, t) * x_t
        kl = normal_kl(true_mean, at(self.posterior_log_variance, t), model_mean, model_log_variance)
        # L_0: -log p_theta(x_0 | x_1), the discretised Gaussian of Eq. 13
        decoder_nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance)
        return mean_bits(torch.where((t == 0).reshape(-1, 1, 1, 1), decoder_nll, kl))

    @torch.inference_mode()
    def evaluate(self, model: Model, x0: torch.Tensor, generator: torch.Generator,
                 progress: tqdm | None = None) -> BoundTerms:
        """All T + 1 terms for a batch x0 (float64, in [-1, 1]). For i = T-1 down to 0, one
        torch.randn(x0.shape, generator, float32) drawn on the CPU and moved to x0's device: the original order."""
        batch = x0.shape[0]
        terms = torch.empty(batch, self.T, dtype=torch.float64, device=x0.device)
        for i in reversed(range(self.T)):
            noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
            t = torch.full((batch,), i, dtype=torch.int64, device=x0.device)
            terms[:, i] = self.terms_at(model, x0, t, noise.double())
            if progress is not None:
                progress.update(1)
        return BoundTerms(self.prior(x0), terms)

    @torch.inference_mode()
    def estimate(self, model: Model, x0: torch.Tensor, generator: torch.Generator, strata: int) -> torch.Tensor:
        """An unbiased Monte Carlo estimate of the bound in bits/dim, (B,), from `strata` model calls per image.

        The T timesteps are cut into `strata` runs of consecutive timesteps; each image draws one timestep
        uniformly from each run, and that term, times the run's length, stands for the run's sum (a stratified
        sample). Most of the bound lies in the first timesteps (L_0 and the first KL terms), so the runs grow
        geometrically: for T = 1000 and 20 strata they start at t = 0, 1, 2, 3, 4, 6, 8, 11, 16, ..., 501, 708,
        the first four single timesteps, whose terms are then exact. The prior is computed exactly. With
        strata = T it is the bound itself.
        """
        strata = min(strata, self.T)
        bounds = [0]
        for k in range(1, strata + 1):  # T^(k / strata), at least one timestep per run, room left for the rest
            bounds.append(min(max(bounds[-1] + 1, round(self.T ** (k / strata))), self.T - (strata - k)))
        batch, total = x0.shape[0], self.prior(x0)
        for start, end in zip(bounds[:-1], bounds[1:]):
            t = torch.randint(start, end, (batch,), generator=generator).to(x0.device)
            noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
            total = total + (end - start) * self.terms_at(model, x0, t, noise.double())
        return total


def images_as_x0(source: ImageSource, resolution: int, channels: int, count: int) -> torch.Tensor:
    """The first `count` images of `source`, resized and center-cropped as training does (no flips), as x_0."""
    dataset = TrainingImages(source, resolution, channels, center_crop=True, random_flip=False)
    return x0_from_pixels(torch.stack([dataset[(i, 0)] for i in range(min(count, len(source)))]))


def estimate_bits_per_dim(unet: nn.Module, bound: VariationalBound, x0: torch.Tensor, seed: int,
                          strata: int = 20, batch_size: int = 64) -> float:
    """The mean over x0 of VariationalBound.estimate, in eval mode, in batches: an unbiased estimate of the
    bound in bits/dim. Noise and timesteps come from a generator seeded with `seed`, so that with the same seed
    the estimates of one model at different times differ only by what it learnt."""
    was_training = unet.training
    unet.eval()
    generator = torch.Generator().manual_seed(seed)
    total = sum(bound.estimate(unet, x0[i:i + batch_size], generator, strata).sum().item()
                for i in range(0, len(x0), batch_size))
    unet.train(was_training)
    return total / len(x0)


def at(coefficient: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The coefficient's value at each image's timestep, shaped (B, 1, 1, 1) to broadcast over C, H, W."""
    return coefficient[t].reshape(-1, 1, 1, 1)


def mean_bits(nats: torch.Tensor) -> torch.Tensor:
    """Per-dimension nats (B, C, H, W) to bits/dim per image (B,): the mean over C, H, W, divided by ln 2."""
    return nats.mean(dim=(1, 2, 3)) / math.log(2.0)
