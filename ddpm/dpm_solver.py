"""DPM-Solver and DPM-Solver++ (Lu et al. 2022): sampling a DDPM-trained model in 10 to 20 steps, multistep.

The same noise schedule and trained network as DDPM; sampling solves the diffusion ODE with an exponential
integrator: the linear part of the ODE exactly, the network's part by a Taylor expansion in lambda.
The papers' VP notation: alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t)
(half the log-SNR); h = lambda_t - lambda_s is a step's length in lambda.
DPM-Solver (arXiv 2206.00927) integrates the noise prediction eps_theta, DPM-Solver++ (arXiv 2211.01095) the
data prediction x_theta = (x_t - sigma_t eps_theta) / alpha_t; each step reuses the model outputs of the steps
before it (multistep, DPM-Solver++ Sec. 4.2), so one step costs one network evaluation.
Matches diffusers' DPMSolverMultistepScheduler in config keys, defaults, numbers and the order of random draws.
"""

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .scheduler import betas_for_config, checked_config, dynamic_threshold, randn

# diffusers' DPMSolverMultistepScheduler.__init__ defaults.
DEFAULT_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "solver_order": 2,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "final_sigmas_type": "zero",
    "lambda_min_clipped": -float("inf"),
    "variance_type": None,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
}

SUPPORTED_VALUES: dict[str, tuple[Any, ...]] = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "solver_order": (1, 2, 3),
    "prediction_type": ("epsilon", "sample", "v_prediction"),
    "algorithm_type": ("dpmsolver++", "dpmsolver", "sde-dpmsolver++"),
    "solver_type": ("midpoint", "heun"),
    "final_sigmas_type": ("zero", "sigma_min"),
    # the ODE needs only the mean: a DDPMScheduler's variance_type says how DDPM samples, and is ignored here
    "variance_type": (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"),
    "timestep_spacing": ("linspace", "leading", "trailing"),
    # diffusers' other step schedules (and flow matching) are not implemented here
    "use_beta_sigmas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
}

SIGMA_SCHEDULES = ("use_karras_sigmas", "use_exponential_sigmas", "use_lu_lambdas")


def checked_dpm_config(config: dict[str, Any]) -> dict[str, Any]:
    """The full config, or a one-line ValueError naming the option and value we do not support."""
    cfg = checked_config("DPMSolverMultistepScheduler", config, DEFAULT_CONFIG, SUPPORTED_VALUES)
    chosen = [key for key in SIGMA_SCHEDULES if cfg[key]]
    if len(chosen) > 1:
        raise ValueError(f"DPMSolverMultistepScheduler: choose at most one of {list(SIGMA_SCHEDULES)}, got {chosen}")
    if cfg["algorithm_type"] == "dpmsolver" and cfg["final_sigmas_type"] == "zero":
        raise ValueError("DPMSolverMultistepScheduler: final_sigmas_type='zero' needs a data-prediction "
                         "algorithm_type (dpmsolver++); with algorithm_type='dpmsolver' use 'sigma_min'")
    return cfg


def spaced_timesteps(num_inference_steps: int, last_timestep: int, cfg: dict[str, Any]) -> np.ndarray:
    """The timesteps sampling visits, from the top down, spaced as cfg["timestep_spacing"] says
    (Lin et al. 2023, Table 2); leading and linspace space n + 1 points and drop t = 0, as diffusers does."""
    n = num_inference_steps
    if cfg["timestep_spacing"] == "linspace":
        return np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if cfg["timestep_spacing"] == "leading":
        step_ratio = last_timestep // (n + 1)
        return (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64) + cfg["steps_offset"]
    step_ratio = cfg["num_train_timesteps"] / n  # trailing
    return np.arange(last_timestep, 0, -step_ratio).round().copy().astype(np.int64) - 1


def karras_sigmas(train_sigmas: np.ndarray, n: int, rho: float = 7.0) -> np.ndarray:
    """EDM (Karras et al. 2022) Eq. 5 between the training schedule's extreme noise-to-signal ratios:
    sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    sigma_min, sigma_max = train_sigmas[0].item(), train_sigmas[-1].item()
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(train_sigmas: np.ndarray, n: int) -> np.ndarray:
    """log sigma evenly spaced from the training schedule's largest sigma down to its smallest."""
    sigma_min, sigma_max = train_sigmas[0].item(), train_sigmas[-1].item()
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def lu_sigmas(train_sigmas: np.ndarray, n: int) -> np.ndarray:
    """DPM-Solver Sec. 3.3, uniform logSNR steps: lambda = -log sigma evenly spaced, from the top down."""
    log_sigmas = np.log(train_sigmas)
    log_min, log_max = log_sigmas[0].item(), log_sigmas[-1].item()
    return np.exp(log_max + np.linspace(0, 1, n) * (log_min - log_max))


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each sigma: log sigma interpolated linearly between the two
    training timesteps around it."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VP pair (alpha_t, sigma_t), alpha_t^2 + sigma_t^2 = 1, of a noise-to-signal ratio s = sigma_t / alpha_t."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def half_log_snr(alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """DPM-Solver Sec. 3.1: lambda_t = log(alpha_t / sigma_t), the time variable the solver steps in."""
    return torch.log(alpha_t) - torch.log(sigma_t)


class DPMSolverMultistepScheduler:
    """The DDPM variance schedule sampled by multistep DPM-Solver++ (default) or DPM-Solver, of order 1, 2 or 3."""

    def __init__(self, **config: Any):
        self.config = checked_dpm_config(config)
        self.betas = betas_for_config(self.config)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if self.config["rescale_betas_zero_snr"]:
            self.alphas_cumprod[-1] = 2**-24  # as diffusers: near 0 but not 0, so that the first sigma is finite
        # lambda of every training timestep, for lambda_min_clipped
        self.lambda_t = half_log_snr(torch.sqrt(self.alphas_cumprod), torch.sqrt(1 - self.alphas_cumprod))
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(self.config["num_train_timesteps"] - 1, -1, -1, dtype=torch.int64)
        # the noise-to-signal ratio s = sigma_t / alpha_t = sqrt((1 - abar_t) / abar_t) of each timestep (diffusers'
        # "sigmas", EDM's sigma); set_timesteps keeps those of the visited timesteps, alpha_sigma gives (alpha, sigma)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.model_outputs: list[torch.Tensor] = []
        self.step_index: int | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> "DPMSolverMultistepScheduler":
        """A DPMSolverMultistepScheduler from any scheduler's config (a DDPMScheduler's too), with `overrides` on top.
        As diffusers' from_config, keys it does not know (clip_sample) are dropped, and so are those a diffusers
        config lists as left at their defaults (`_use_default_values`): DPM-Solver's own defaults apply there."""
        defaults_used = set(config.get("_use_default_values", ()))
        kept = {key: value for key, value in config.items() if key in DEFAULT_CONFIG and key not in defaults_used}
        return cls(**{**kept, **overrides})

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose the timesteps t_0 > ... > t_{M-1} sampling visits and the noise levels of each, plus a last one to
        step to: sigma = 0 (x_0 itself) or the smallest training sigma (final_sigmas_type)."""
        cfg, T = self.config, self.config["num_train_timesteps"]
        if not isinstance(num_inference_steps, (int, np.integer)) or not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must be an integer from 1 to num_train_timesteps={T}, "
                             f"got {num_inference_steps!r}")
        # lambda_min_clipped: timesteps whose lambda is below it are never visited (diffusers' cosine fix)
        clipped = torch.searchsorted(torch.flip(self.lambda_t, [0]), cfg["lambda_min_clipped"])
        timesteps = spaced_timesteps(int(num_inference_steps), (T - clipped).numpy().item(), cfg)

        sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        log_sigmas = np.log(sigmas)
        schedule = next((key for key in SIGMA_SCHEDULES if cfg[key]), None)
        if schedule is None:
            sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        else:
            # the noise levels first, evenly spaced in some function of sigma; the timesteps follow from them
            spacing = {"use_karras_sigmas": karras_sigmas, "use_exponential_sigmas": exponential_sigmas,
                       "use_lu_lambdas": lu_sigmas}[schedule]
            sigmas = spacing(sigmas, int(num_inference_steps))
            timesteps = np.array([sigma_to_t(sigma, log_sigmas) for sigma in sigmas])
            if schedule != "use_exponential_sigmas" and cfg["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()  # as diffusers: rounded, except for these two (truncated below)

        if cfg["final_sigmas_type"] == "sigma_min":
            sigma_last = float(((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5)
        else:
            sigma_last = 0.0
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [sigma_last]]).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self.model_outputs = []
        self.step_index = None

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The network's output as the prediction the algorithm integrates: x_theta for DPM-Solver++
        (DPM-Solver++ Sec. 2.1, the data prediction model x_theta = (x_t - sigma_t eps_theta) / alpha_t), eps_theta
        for DPM-Solver."""
        alpha_t, sigma_t = alpha_sigma(self.sigmas[self.step_index])
        prediction_type = self.config["prediction_type"]
        if self.config["algorithm_type"] in ("dpmsolver++", "sde-dpmsolver++"):
            if prediction_type == "epsilon":
                x0 = (sample - sigma_t * model_output) / alpha_t
            elif prediction_type == "sample":
                x0 = model_output
            else:  # v_prediction: x_0 = alpha_t x_t - sigma_t v
                x0 = alpha_t * sample - sigma_t * model_output
            if self.config["thresholding"]:
                # DPM-Solver++ Sec. 4.3: (Imagen's dynamic) thresholding keeps x_theta in the data's range
                x0 = dynamic_threshold(x0, self.config["dynamic_thresholding_ratio"], self.config["sample_max_value"])
            return x0
        if prediction_type == "epsilon":
            eps = model_output
        elif prediction_type == "sample":
            eps = (sample - alpha_t * model_output) / sigma_t
        else:  # v_prediction: eps = alpha_t v + sigma_t x_t
            eps = alpha_t * model_output + sigma_t * sample
        if self.config["thresholding"]:
            # threshold the x_0 that eps implies, then take the eps the thresholded x_0 implies
            x0 = dynamic_threshold((sample - sigma_t * eps) / alpha_t, self.config["dynamic_thresholding_ratio"],
                                   self.config["sample_max_value"])
            eps = (sample - alpha_t * x0) / sigma_t
        return eps

    def _alpha_sigma_lambda(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """alpha, sigma and lambda of the `index`-th noise level of the inference schedule."""
        alpha, sigma = alpha_sigma(self.sigmas[index])
        return alpha, sigma, half_log_snr(alpha, sigma)

    def first_order_update(self, m0: torch.Tensor, sample: torch.Tensor,
                           noise: torch.Tensor | None = None) -> torch.Tensor:
        """One step of DPM-Solver-1 / DPM-Solver++1 (both equal DDIM, eta = 0) from s = t_{i-1} to t = t_i."""
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self.step_index + 1)
        alpha_s, sigma_s, lambda_s = self._alpha_sigma_lambda(self.step_index)
        h = lambda_t - lambda_s
        algorithm = self.config["algorithm_type"]
        if algorithm == "dpmsolver++":
            # DPM-Solver++ Eq. (8), the exact solution x_t = (sigma_t / sigma_s) x_s + sigma_t int e^lambda x_theta
            # dlambda, with x_theta constant over the step (DPM-Solver++1, Sec. 4.1):
            # x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) x_theta(x_s, s)
            return (sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * m0
        if algorithm == "dpmsolver":
            # DPM-Solver Eq. (3.7): x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps_theta(x_s, s)
            return (alpha_t / alpha_s) * sample - (sigma_t * (torch.exp(h) - 1.0)) * m0
        # SDE-DPM-Solver++1 (the variant of diffusers and the authors' code): the data-prediction update of the
        # diffusion SDE, x_t = (sigma_t / sigma_s) e^-h x_s + alpha_t (1 - e^-2h) x_theta + sigma_t sqrt(1 - e^-2h) z
        return ((sigma_t / sigma_s * torch.exp(-h)) * sample + (alpha_t * (1 - torch.exp(-2.0 * h))) * m0
                + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise)

    def second_order_update(self, sample: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """One step of multistep second-order DPM-Solver++(2M) (DPM-Solver++ Algorithm 2) or DPM-Solver-2M, from the
        model outputs at s0 = t_{i-1} and s1 = t_{i-2}."""
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self.step_index + 1)
        alpha_s0, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(self.step_index)
        _, _, lambda_s1 = self._alpha_sigma_lambda(self.step_index - 1)
        m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        # D1 ~ h x_theta'(s0): the backward difference of the last two outputs, scaled to this step's length
        D0, D1 = m0, (1.0 / r0) * (m0 - m1)
        midpoint = self.config["solver_type"] == "midpoint"
        algorithm = self.config["algorithm_type"]
        if algorithm == "dpmsolver++":
            # Algorithm 2: x_t = (sigma_t / sigma_s0) x_s0 - alpha_t (e^-h - 1) (D0 + D1 / 2) (midpoint);
            # heun takes the Taylor coefficient of Eq. (9) for D1 instead: alpha_t ((e^-h - 1) / h + 1)
            first = (sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * D0
            if midpoint:
                return first - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1
            return first + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
        if algorithm == "dpmsolver":
            # DPM-Solver Eq. (3.6) with k = 2 for eps_theta: coefficient sigma_t (e^h - 1) / 2 (midpoint)
            # or sigma_t ((e^h - 1) / h - 1) (heun) for D1
            first = (alpha_t / alpha_s0) * sample - (sigma_t * (torch.exp(h) - 1.0)) * D0
            if midpoint:
                return first - 0.5 * (sigma_t * (torch.exp(h) - 1.0)) * D1
            return first - (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
        # SDE-DPM-Solver++(2M)
        first = (sigma_t / sigma_s0 * torch.exp(-h)) * sample + (alpha_t * (1 - torch.exp(-2.0 * h))) * D0
        if midpoint:
            first = first + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * D1
        else:
            first = first + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
        return first + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise

    def third_order_update(self, sample: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """One step of multistep third-order DPM-Solver++(3M) or DPM-Solver-3M, from the model outputs at
        s0 = t_{i-1}, s1 = t_{i-2} and s2 = t_{i-3}."""
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self.step_index + 1)
        alpha_s0, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(self.step_index)
        _, _, lambda_s1 = self._alpha_sigma_lambda(self.step_index - 1)
        _, _, lambda_s2 = self._alpha_sigma_lambda(self.step_index - 2)
        m0, m1, m2 = self.model_outputs[-1], self.model_outputs[-2], self.model_outputs[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        # D1 ~ h x', D2 ~ h^2 x'' / 2: divided differences of the last three outputs
        D0 = m0
        D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
        D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
        algorithm = self.config["algorithm_type"]
        if algorithm == "dpmsolver++":
            # DPM-Solver++ Eq. (9) with k = 3: the integrals of e^lambda (lambda - lambda_s0)^n / n! in closed form
            return ((sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * D0
                    + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
                    - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * D2)
        if algorithm == "dpmsolver":
            # DPM-Solver Eq. (3.6) with k = 3, for eps_theta
            return ((alpha_t / alpha_s0) * sample - (sigma_t * (torch.exp(h) - 1.0)) * D0
                    - (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
                    - (sigma_t * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5)) * D2)
        # SDE-DPM-Solver++(3M)
        return ((sigma_t / sigma_s0 * torch.exp(-h)) * sample + (alpha_t * (1.0 - torch.exp(-2.0 * h))) * D0
                + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
                + (alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * D2
                + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise)

    def order_of_this_step(self) -> int:
        """The solver order of this step: the first steps lack earlier outputs (order 1, then 2); the last step is
        first order when it steps to sigma = 0 or euler_at_final, and with lower_order_final under 15 steps the
        last two are at most first and second order, which steadies few-step sampling (as the authors' code)."""
        cfg, n, i = self.config, len(self.timesteps), self.step_index
        few_steps = cfg["lower_order_final"] and n < 15
        if i == n - 1 and (cfg["euler_at_final"] or few_steps or cfg["final_sigmas_type"] == "zero"):
            return 1
        order = min(cfg["solver_order"], len(self.model_outputs))
        return min(order, 2) if i == n - 2 and few_steps else order

    def _index_of(self, timestep: int | torch.Tensor) -> int:
        """Where sampling starts in the schedule: the first index of `timestep`. (diffusers takes the second of a
        repeated timestep, as Karras sigmas on the cosine schedule give, and then runs past the end.)"""
        matches = (self.timesteps == torch.as_tensor(timestep).to(self.timesteps.device)).nonzero()
        if len(matches) == 0:
            raise ValueError(f"DPMSolverMultistepScheduler.step: timestep {int(timestep)} is not in the schedule "
                             f"{self.timesteps.tolist()}")
        return matches[0].item()

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """One multistep solver step from x_{t_{i-1}} to x_{t_i}, returned as a tensor (in model_output's dtype).

        The steps count on from the first `timestep` given after set_timesteps. Only the SDE variant draws
        noise from `generator`: one draw per step, the last step included.
        """
        if self.num_inference_steps is None:
            raise ValueError("DPMSolverMultistepScheduler.step: call set_timesteps(num_inference_steps) first")
        if self.step_index is None:
            self.step_index = self._index_of(timestep)
        self.model_outputs = (self.model_outputs + [self.convert_model_output(model_output, sample)])
        self.model_outputs = self.model_outputs[-self.config["solver_order"]:]
        order = self.order_of_this_step()
        sample = sample.to(torch.float32)  # as diffusers: the update in fp32 whatever the model's dtype
        noise = None
        if self.config["algorithm_type"] == "sde-dpmsolver++":
            noise = randn(model_output.shape, generator, model_output.device, torch.float32)
        if order == 1:
            prev_sample = self.first_order_update(self.model_outputs[-1], sample, noise)
        elif order == 2:
            prev_sample = self.second_order_update(sample, noise)
        else:
            prev_sample = self.third_order_update(sample, noise)
        self.step_index += 1
        return prev_sample.to(model_output.dtype)
