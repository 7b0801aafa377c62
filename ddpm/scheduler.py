"""The noise schedule: the forward process q(x_t | x_0) and one reverse step p(x_{t-1} | x_t).

DDPM (Ho et al. 2020). Matches diffusers' DDPMScheduler in config keys, defaults and numbers:
coefficients stay 0-d float32 tensors, in diffusers' order of operations, so results agree bit for bit.
"""

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

# diffusers' DDPMScheduler.__init__ defaults. Every key is written to scheduler_config.json.
DEFAULT_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}

SUPPORTED_VALUES: dict[str, tuple[str, ...]] = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "variance_type": ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"),
    "prediction_type": ("epsilon", "sample", "v_prediction"),
    "timestep_spacing": ("leading", "trailing", "linspace"),
}


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Improved DDPM (Nichol & Dhariwal 2021, Eq. 17): abar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), s = 0.008."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
             for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(abar_t) so that abar_T = 0 (zero terminal SNR)."""
    sqrt_alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_alphas_cumprod[0].clone(), sqrt_alphas_cumprod[-1].clone()
    sqrt_alphas_cumprod -= last
    sqrt_alphas_cumprod *= first / (first - last)
    alphas_cumprod = sqrt_alphas_cumprod**2
    alphas = torch.cat([alphas_cumprod[0:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1 - alphas


def checked_config(name: str, config: dict[str, Any], defaults: dict[str, Any],
                   supported: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """`defaults` updated with `config`; unknown keys and unsupported values are a ValueError naming them."""
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise ValueError(f"{name}: unknown config key(s) {unknown}; known keys are {sorted(defaults)}")
    cfg = {**defaults, **config}
    for key, allowed in supported.items():
        if cfg[key] not in allowed and not (key == "beta_schedule" and cfg["trained_betas"] is not None):
            raise ValueError(f"{name}: unsupported {key}={cfg[key]!r}; choose one of {list(allowed)}")
    T = cfg["num_train_timesteps"]
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"{name}: num_train_timesteps must be a positive integer, got {T!r}")
    if cfg["trained_betas"] is not None:
        cfg["trained_betas"] = [float(b) for b in cfg["trained_betas"]]
        if len(cfg["trained_betas"]) != T:
            raise ValueError(f"{name}: trained_betas has {len(cfg['trained_betas'])} values, "
                             f"num_train_timesteps is {T}")
    return cfg


def betas_for_config(cfg: dict[str, Any]) -> torch.Tensor:
    """beta_1..beta_T (float32): trained_betas or the beta_schedule, optionally rescaled to zero terminal SNR."""
    T = cfg["num_train_timesteps"]
    if cfg["trained_betas"] is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    elif cfg["beta_schedule"] == "linear":
        # DDPM Sec. 4: betas linear from beta_1 = 1e-4 to beta_T = 0.02
        betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], T, dtype=torch.float32)
    elif cfg["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, T, dtype=torch.float32) ** 2
    else:
        betas = cosine_betas(T)
    return rescale_zero_terminal_snr(betas) if cfg["rescale_betas_zero_snr"] else betas


def inference_timesteps(num_inference_steps: int, cfg: dict[str, Any]) -> torch.Tensor:
    """The `num_inference_steps` timesteps sampling visits, from T-1 down, spaced as cfg["timestep_spacing"]
    says (Lin et al. 2023, Table 2)."""
    T = cfg["num_train_timesteps"]
    if not isinstance(num_inference_steps, (int, np.integer)) or not 1 <= num_inference_steps <= T:
        raise ValueError(f"num_inference_steps must be an integer from 1 to num_train_timesteps={T}, "
                         f"got {num_inference_steps!r}")
    n = int(num_inference_steps)
    if cfg["timestep_spacing"] == "linspace":
        timesteps = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    elif cfg["timestep_spacing"] == "leading":
        timesteps = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.int64) + cfg["steps_offset"]
    else:  # trailing
        timesteps = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    return torch.from_numpy(timesteps)


def predict_x0(model_output: torch.Tensor, sample: torch.Tensor, abar_t: torch.Tensor,
               prediction_type: str) -> torch.Tensor:
    """x_0 predicted from the model output at x_t. For epsilon, DDPM Eq. 15 (Eq. 4 solved for x_0):
    x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    if prediction_type == "epsilon":
        return (sample - (1 - abar_t) ** (0.5) * model_output) / abar_t ** (0.5)
    if prediction_type == "sample":
        return model_output
    # v_prediction: x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v
    return (abar_t**0.5) * sample - ((1 - abar_t) ** 0.5) * model_output


def clip_x0(pred_x0: torch.Tensor, cfg: dict[str, Any]) -> torch.Tensor:
    """Keep the predicted x_0 in the data range: dynamic thresholding if asked, else clip to +-clip_sample_range."""
    if cfg["thresholding"]:
        return dynamic_threshold(pred_x0, cfg["dynamic_thresholding_ratio"], cfg["sample_max_value"])
    if cfg["clip_sample"]:
        return pred_x0.clamp(-cfg["clip_sample_range"], cfg["clip_sample_range"])
    return pred_x0


def dynamic_threshold(sample: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Imagen, Saharia et al. 2022): clamp x_0 to the per-sample `ratio`
    quantile s of |x_0| (s >= 1, <= max_value), then divide by s."""
    dtype = sample.dtype
    batch, channels, *rest = sample.shape
    if dtype not in (torch.float32, torch.float64):
        sample = sample.float()  # the quantile needs fp32 at least
    flat = sample.reshape(batch, channels * int(np.prod(rest)))
    s = torch.quantile(flat.abs(), ratio, dim=1)
    s = torch.clamp(s, min=1, max=max_value).unsqueeze(1)
    flat = torch.clamp(flat, -s, s) / s
    return flat.reshape(batch, channels, *rest).to(dtype)


def randn(shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator] | None,
          device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise. A CPU generator draws on the CPU and the result moves to `device`,
    so one seed gives the same numbers on any device (as diffusers' randn_tensor). A list of
    generators, one per image, draws image i's noise from generator i alone (as randn_tensor too)."""
    device = torch.device(device)
    generators = generator if isinstance(generator, list) else [generator]
    share = (1, *shape[1:]) if isinstance(generator, list) else shape  # what each generator draws
    if any(g is None or g.device.type != "cpu" for g in generators):  # the device's own RNG, or generators on it
        draws = [torch.randn(share, generator=g, device=device if g is None else g.device, dtype=dtype)
                 for g in generators]
        return (torch.cat(draws) if len(draws) > 1 else draws[0]).to(device)
    # Bound for a GPU, the CPU draw lands in page-locked memory and is copied without blocking: the host queues the
    # copy and goes on, drawing the next step's noise while the GPU still runs this one. From pageable memory the
    # copy would first wait for the GPU to finish all its queued work, at every step.
    host = torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda")
    for g, rows in zip(generators, host.split(share[0])):
        torch.randn(share, generator=g, dtype=dtype, out=rows)
    return host.to(device, non_blocking=True)


class DDPMScheduler:
    """The variance schedule beta_1..beta_T and the DDPM forward and reverse steps."""

    def __init__(self, **config: Any):
        self.config = checked_config("DDPMScheduler", config, DEFAULT_CONFIG, SUPPORTED_VALUES)
        self.betas = betas_for_config(self.config)

        # alpha_t = 1 - beta_t,  abar_t = prod_{s<=t} alpha_s
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self._alphas_cumprod_on: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # by device and dtype
        self.one = torch.tensor(1.0)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(self.config["num_train_timesteps"] - 1, -1, -1, dtype=torch.int64)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "DDPMScheduler":
        """A DDPMScheduler from any scheduler's config (a DDIMScheduler's too), dropping the keys it does not know."""
        return cls(**{key: value for key, value in config.items() if key in DEFAULT_CONFIG})

    # Forward process

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """DDPM Eq. 4, q(x_t | x_0):  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        sqrt_abar, sqrt_one_minus_abar = self._forward_coefficients(original_samples, timesteps)
        return sqrt_abar * original_samples + sqrt_one_minus_abar * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target (Salimans & Ho 2022):  v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
        sqrt_abar, sqrt_one_minus_abar = self._forward_coefficients(sample, timesteps)
        return sqrt_abar * noise - sqrt_one_minus_abar * sample

    def alphas_cumprod_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """abar_t for every t, on `device` in `dtype`: copied once, since a copy to the GPU every training step
        would make the host wait for it."""
        key = (torch.device(device), dtype)
        if key not in self._alphas_cumprod_on:
            self._alphas_cumprod_on[key] = self.alphas_cumprod.to(device=device, dtype=dtype)
        return self._alphas_cumprod_on[key]

    def _forward_coefficients(self, like: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(abar_t) and sqrt(1 - abar_t) for each timestep, shaped to broadcast over `like`."""
        abar = self.alphas_cumprod_on(like.device, like.dtype)[timesteps.to(like.device)].flatten()
        shape = (-1,) + (1,) * (like.ndim - 1)
        return (abar**0.5).reshape(shape), ((1 - abar) ** 0.5).reshape(shape)

    # Reverse process

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose the `num_inference_steps` timesteps that sampling visits, from T-1 down."""
        self.timesteps = inference_timesteps(num_inference_steps, self.config).to(device)
        self.num_inference_steps = int(num_inference_steps)

    def previous_timestep(self, timestep: int | torch.Tensor) -> int:
        """The timestep sampling visits after `timestep`; -1 after the last one."""
        t = int(timestep)
        if self.num_inference_steps is None:
            return t - 1
        index = (self.timesteps == t).nonzero()[0, 0].item()
        return int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else -1

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """One step of DDPM Algorithm 2: sample x_{t-1} ~ p(x_{t-1} | x_t), returned as a tensor.

        With fewer inference steps the step goes from t to the previous visited timestep p,
        and alpha_t, beta_t below are those of that jump: alpha_t = abar_t / abar_p.
        """
        cfg = self.config
        t = int(timestep)
        prev_t = self.previous_timestep(t)
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        one_minus_abar_t = 1 - abar_t
        one_minus_abar_prev = 1 - abar_prev
        alpha_t = abar_t / abar_prev
        beta_t = 1 - alpha_t

        pred_x0 = clip_x0(predict_x0(model_output, sample, abar_t, cfg["prediction_type"]), cfg)

        # DDPM Eq. 7, the mean of the posterior q(x_{t-1} | x_t, x_0):
        # mu_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
        # (with x_0 from epsilon this is Eq. 11: mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t))
        pred_x0_coeff = (abar_prev ** (0.5) * beta_t) / one_minus_abar_t
        sample_coeff = alpha_t ** (0.5) * one_minus_abar_prev / one_minus_abar_t
        prev_sample = pred_x0_coeff * pred_x0 + sample_coeff * sample

        # Algorithm 2, line 4: x_{t-1} = mu + sigma_t z, z ~ N(0, I), and z = 0 at the last step
        if t > 0:
            z = randn(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + self._sigma(beta_t, one_minus_abar_prev, one_minus_abar_t) * z
        return prev_sample

    def _sigma(self, beta_t: torch.Tensor, one_minus_abar_prev: torch.Tensor,
               one_minus_abar_t: torch.Tensor) -> torch.Tensor:
        """sigma_t, DDPM Sec. 3.2: sigma_t^2 = beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t (Eq. 7)
        for fixed_small, or sigma_t^2 = beta_t for fixed_large. The _log variants compute it through
        the logarithm, as in the original code."""
        posterior_variance = torch.clamp(one_minus_abar_prev / one_minus_abar_t * beta_t, min=1e-20)
        variance_type = self.config["variance_type"]
        if variance_type == "fixed_small":
            return posterior_variance**0.5
        if variance_type == "fixed_small_log":
            return torch.exp(0.5 * torch.log(posterior_variance))
        if variance_type == "fixed_large":
            return beta_t**0.5
        return torch.exp(0.5 * torch.log(beta_t))  # fixed_large_log
