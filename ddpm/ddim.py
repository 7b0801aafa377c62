"""DDIM (Song, Meng & Ermon 2021): sampling a DDPM-trained model in few steps, deterministic at eta = 0.

The same noise schedule and the same trained eps_theta as DDPM; only the reverse step differs.
The DDIM paper writes alpha_t for what DDPM (and this code) calls abar_t = prod_{s<=t} (1 - beta_s).
Matches diffusers' DDIMScheduler in config keys, defaults, numbers and the order of random draws.

That includes diffusers' choice of the previous timestep (diffusers#12633, open): t - T // n whatever the
timestep_spacing, the next visited timestep only for "leading" (the default). With "linspace" it is off the grid
(T = 1000, n = 10: 999 steps to 899, but the model next runs at 888, ..., 111 steps to 11, and the last step
takes that x_11 for x_0's neighbour, so x_11's noise stays in the image); "trailing" is off by one where n does
not divide T, and its last step stops at abar_0 instead of 1. See docs/sampling.md.
"""

from collections.abc import Mapping
from typing import Any

import torch

from .scheduler import betas_for_config, checked_config, clip_x0, inference_timesteps, predict_x0, randn

# diffusers' DDIMScheduler.__init__ defaults.
DEFAULT_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}

SUPPORTED_VALUES: dict[str, tuple[str, ...]] = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "prediction_type": ("epsilon", "sample", "v_prediction"),
    "timestep_spacing": ("leading", "trailing", "linspace"),
}


class DDIMScheduler:
    """The DDPM variance schedule with the DDIM reverse step (Eq. 12), noise scaled by eta (Eq. 16)."""

    def __init__(self, **config: Any):
        self.config = checked_config("DDIMScheduler", config, DEFAULT_CONFIG, SUPPORTED_VALUES)
        self.betas = betas_for_config(self.config)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # abar before the first timestep, used by the last step: 1 (x_0 itself), or abar_0
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(self.config["num_train_timesteps"] - 1, -1, -1, dtype=torch.int64)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "DDIMScheduler":
        """A DDIMScheduler from any scheduler's config (a DDPMScheduler's too): keys it does not know,
        such as variance_type, are dropped, as diffusers' from_config drops them."""
        return cls(**{key: value for key, value in config.items() if key in DEFAULT_CONFIG})

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose the `num_inference_steps` timesteps tau_S > ... > tau_1 that sampling visits (DDIM Sec. 4.2)."""
        self.timesteps = inference_timesteps(num_inference_steps, self.config).to(device)
        self.num_inference_steps = int(num_inference_steps)

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             eta: float = 0.0, use_clipped_model_output: bool = False,
             generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """One DDIM step from x_t to x_prev (DDIM Eq. 12), returned as a tensor.

        eta = 0 is deterministic DDIM; eta = 1 has DDPM's posterior variance. Noise is drawn
        from `generator` only when eta > 0, one draw per step, the last step included.
        """
        if self.num_inference_steps is None:
            raise ValueError("DDIMScheduler.step: call set_timesteps(num_inference_steps) first")
        cfg = self.config
        t = int(timestep)
        # as diffusers: the previous timestep is t minus the leading spacing, whatever timestep_spacing is
        prev_t = t - cfg["num_train_timesteps"] // self.num_inference_steps
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        one_minus_abar_t = 1 - abar_t

        # the "predicted x_0" of Eq. 12, f_theta(x_t) of Eq. 9, and the eps it implies
        pred_x0 = predict_x0(model_output, sample, abar_t, cfg["prediction_type"])
        if cfg["prediction_type"] == "epsilon":
            pred_eps = model_output
        elif cfg["prediction_type"] == "sample":
            pred_eps = (sample - abar_t ** (0.5) * pred_x0) / one_minus_abar_t ** (0.5)
        else:  # v_prediction: eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t
            pred_eps = (abar_t**0.5) * model_output + (one_minus_abar_t**0.5) * sample
        pred_x0 = clip_x0(pred_x0, cfg)

        # Eq. 16: sigma_t(eta) = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
        variance = ((1 - abar_prev) / one_minus_abar_t) * (1 - abar_t / abar_prev)
        sigma = eta * variance ** (0.5)
        if use_clipped_model_output:
            # the eps that the clipped x_0 implies, so that x_0 and eps agree again
            pred_eps = (sample - abar_t ** (0.5) * pred_x0) / one_minus_abar_t ** (0.5)

        # Eq. 12: x_prev = sqrt(abar_prev) x_0  +  sqrt(1 - abar_prev - sigma_t^2) eps  +  sigma_t z
        #                  "predicted x_0"         "direction pointing to x_t"            random noise
        direction = (1 - abar_prev - sigma**2) ** (0.5) * pred_eps
        prev_sample = abar_prev ** (0.5) * pred_x0 + direction
        if eta > 0:
            z = randn(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + sigma * z
        return prev_sample
