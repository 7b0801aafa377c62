"""The variational bound in bits/dim (ddpm/likelihood.py) against the checks of ../shared/reference/nll.md,
an independent float64 computation written from nll.md, and diffusers' DDPMScheduler.step.

The oracle, zero and Gaussian "models" are closed-form functions of x_t, so T = 1000 costs little; the
independent computation runs a tiny UNet with T = 10 (any T is allowed there).
"""

import math

import numpy as np
import pytest
import torch

from ddpm import DDPMScheduler, UNet2DModel
from ddpm.likelihood import VariationalBound, approx_standard_normal_cdf, x0_from_pixels
from oracle import MICRO, diffusers, perturb_, single_thread  # noqa: F401  (autouse fixture)

VARIANCES = ("fixed_small", "fixed_large")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def interior_pixels(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """x_0 = k / 127.5 - 1 for random k in 1..254 (no pixel at either end of the range)."""
    k = torch.randint(1, 255, shape, generator=torch.Generator().manual_seed(seed))
    return k.double() / 127.5 - 1


def oracle_model(bound: VariationalBound, x0: torch.Tensor):
    """eps_hat = the true eps of x_t, so x0_hat = x_0."""
    def model(x_t, t):
        sqrt_abar = bound.sqrt_abar[t].reshape(-1, 1, 1, 1)
        sqrt_one_minus_abar = bound.sqrt_one_minus_abar[t].reshape(-1, 1, 1, 1)
        return ((x_t.double() - sqrt_abar * x0) / sqrt_one_minus_abar).float()
    return model


def zero_model(x_t, t):
    return torch.zeros_like(x_t)


def run(model, scheduler: DDPMScheduler, variance: str, x0: torch.Tensor, seed: int = 0, clip: bool = True):
    bound = VariationalBound(scheduler, variance, clip=clip)
    return bound.evaluate(model, x0, torch.Generator().manual_seed(seed))


# nll.md's checks (linear betas 1e-4..0.02, T = 1000)


@pytest.fixture(scope="module")
def oracle_runs() -> dict:
    """The oracle model's terms on interior pixels, for each variance."""
    x0 = interior_pixels((2, 3, 8, 8))
    runs = {}
    for variance in VARIANCES:
        bound = VariationalBound(DDPMScheduler(), variance)
        runs[variance] = bound.evaluate(oracle_model(bound, x0), x0, torch.Generator().manual_seed(0))
    return runs


@pytest.fixture(scope="module")
def zero_model_runs() -> dict:
    """The zero model's terms, no clipping, for each variance; 12,288 dimensions: standard errors ~0.01 bits."""
    x0 = interior_pixels((16, 3, 16, 16))
    return {variance: run(zero_model, DDPMScheduler(), variance, x0, clip=False) for variance in VARIANCES}


@pytest.mark.parametrize("variance", VARIANCES)
def test_oracle_model_decoder_is_1_3057_bits_per_interior_pixel(variance, oracle_runs):
    assert oracle_runs[variance].decoder.tolist() == pytest.approx([1.3057, 1.3057], abs=1e-4)


def test_oracle_model_decoder_is_0_5098_bits_at_values_0_and_255():
    x0 = torch.tensor([-1.0, 1.0], dtype=torch.float64).repeat_interleave(96).reshape(2, 3, 8, 4)
    bound = VariationalBound(DDPMScheduler(), "fixed_small")
    decoder = bound.evaluate(oracle_model(bound, x0), x0, torch.Generator().manual_seed(0)).decoder
    assert decoder.tolist() == pytest.approx([0.5098, 0.5098], abs=2e-4)  # 0.5099 with the tanh Phi


@pytest.mark.parametrize("variance, expected", [("fixed_small", 0.0), ("fixed_large", 0.4864)])
def test_oracle_model_kl_sum_is_the_floor_of_its_variance(variance, expected, oracle_runs):
    assert oracle_runs[variance].kl.tolist() == pytest.approx([expected, expected], abs=1e-4)


@pytest.mark.parametrize("variance, expected", [("fixed_small", 14.67), ("fixed_large", 13.97)])
def test_zero_model_kl_sum_is_independent_of_the_data(variance, expected, zero_model_runs):
    assert zero_model_runs[variance].kl.mean().item() == pytest.approx(expected, abs=0.05)


def test_zero_model_decoder_is_about_2_47_bits_per_interior_pixel(zero_model_runs):
    assert zero_model_runs["fixed_small"].decoder.mean().item() == pytest.approx(2.47, abs=0.05)


def test_prior_term_is_2_91e_5_times_the_mean_square_of_x0():
    x0 = interior_pixels((4, 3, 8, 8))
    prior = VariationalBound(DDPMScheduler(), "fixed_small").prior(x0)
    expected = 2.91e-5 * x0.pow(2).mean(dim=(1, 2, 3))
    assert prior.tolist() == pytest.approx(expected.tolist(), rel=0.01)


def test_gaussian_data_with_its_optimal_denoiser_gives_the_entropy_2_0471_bits_per_dim():
    # x_0 ~ N(0, I); eps_hat = sqrt(1 - abar_t) x_t is optimal, so p(x_{t-1} | x_t) = N(sqrt(alpha_t) x_t, beta_t)
    # is exact with fixed_large and the bound is tight at every T. The decoder is the continuous N(x_0; mu, beta_1).
    scheduler = DDPMScheduler(num_train_timesteps=50)
    x0 = torch.randn((128, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bound = VariationalBound(scheduler, "fixed_large", clip=False)
    seen = {}

    def optimal_denoiser(x_t, t):
        seen[int(t[0])] = x_t.double()
        return bound.sqrt_one_minus_abar[t[0]].float() * x_t

    terms = bound.evaluate(optimal_denoiser, x0, torch.Generator().manual_seed(1))
    beta_1 = scheduler.betas[0].double()
    mu = (1 - beta_1).sqrt() * seen[0]
    decoder_nats = 0.5 * torch.log(2 * math.pi * beta_1) + (x0 - mu) ** 2 / (2 * beta_1)
    decoder = decoder_nats.mean(dim=(1, 2, 3)) / math.log(2)
    total = (terms.prior + terms.kl + decoder).mean().item()
    # 98,304 dimensions: the standard error is about 0.0065 bits (fixed_small gives 4.04 here)
    assert total == pytest.approx(0.5 * math.log2(2 * math.pi * math.e), abs=0.02)  # 2.04710


# The bound against an independent float64 computation with the same noise


def numpy_bound(unet, scheduler: DDPMScheduler, x0: np.ndarray, seed: int, variance: str) -> np.ndarray:
    """nll.md's bound per image, written out in numpy float64 step by step."""
    betas = scheduler.betas.double().numpy()
    T = len(betas)
    alphas = 1 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    betatilde = betas * (1 - abar_prev) / (1 - abar)
    log_betatilde = np.log(np.append(betatilde[1], betatilde[1:]))
    model_logvar = log_betatilde if variance == "fixed_small" else np.log(np.append(betatilde[1], betas[1:]))
    c1 = betas * np.sqrt(abar_prev) / (1 - abar)
    c2 = (1 - abar_prev) * np.sqrt(alphas) / (1 - abar)
    prediction = scheduler.config["prediction_type"]

    def kl(m1, lv1, m2, lv2):
        return 0.5 * (-1 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))

    def phi(z):
        return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))

    generator = torch.Generator().manual_seed(seed)
    total = np.zeros(x0.shape[0])
    for i in range(T - 1, -1, -1):
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).double().numpy()
        x_t = np.sqrt(abar[i]) * x0 + np.sqrt(1 - abar[i]) * eps
        with torch.no_grad():
            out = unet(torch.from_numpy(x_t).float(), torch.full((x0.shape[0],), i)).double().numpy()
        if prediction == "epsilon":
            x0_hat = np.sqrt(1 / abar[i]) * x_t - np.sqrt(1 / abar[i] - 1) * out
        elif prediction == "sample":
            x0_hat = out
        else:
            x0_hat = np.sqrt(abar[i]) * x_t - np.sqrt(1 - abar[i]) * out
        mu = c1[i] * np.clip(x0_hat, -1, 1) + c2[i] * x_t
        if i > 0:
            nats = kl(c1[i] * x0 + c2[i] * x_t, log_betatilde[i], mu, model_logvar[i])
        else:
            sigma = np.exp(0.5 * model_logvar[0])
            plus, minus = phi((x0 - mu + 1 / 255) / sigma), phi((x0 - mu - 1 / 255) / sigma)
            log_p = np.where(x0 < -0.999, np.log(np.maximum(plus, 1e-12)),
                             np.where(x0 > 0.999, np.log(np.maximum(1 - minus, 1e-12)),
                                      np.log(np.maximum(plus - minus, 1e-12))))
            nats = -log_p
        total += nats.mean(axis=(1, 2, 3)) / np.log(2)
    prior = kl(np.sqrt(abar[-1]) * x0, np.log(1 - abar[-1]), 0.0, 0.0)
    return total + prior.mean(axis=(1, 2, 3)) / np.log(2)


@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_bound_agrees_with_an_independent_float64_computation(prediction_type, variance):
    scheduler = DDPMScheduler(num_train_timesteps=10, beta_end=0.2, prediction_type=prediction_type)
    torch.manual_seed(0)
    unet = perturb_(UNet2DModel(**MICRO)).eval()
    k = torch.randint(0, 256, (3, 3, 8, 8), generator=torch.Generator().manual_seed(2))
    x0 = k.double() / 127.5 - 1
    ours = run(unet, scheduler, variance, x0, seed=5).total.numpy()
    expected = numpy_bound(unet, scheduler, x0.numpy(), seed=5, variance=variance)
    np.testing.assert_allclose(ours, expected, rtol=2e-3)


# The model's p(x_{t-1} | x_t) against diffusers' DDPMScheduler.step


@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_model_mean_and_variance_equal_diffusers_step(prediction_type, variance):
    config = dict(prediction_type=prediction_type, variance_type=variance)
    bound = VariationalBound(DDPMScheduler(**config), variance)
    theirs = diffusers.DDPMScheduler(**config)
    # diffusers in float64, its abar from the same float32 betas: in float32 its beta_t = 1 - abar_t / abar_{t-1}
    # would be up to ~5e-4 off at small t
    theirs.alphas_cumprod = torch.cumprod(1 - theirs.betas.double(), dim=0)
    generator = torch.Generator().manual_seed(0)
    x_t = 1.5 * torch.randn((2, 3, 4, 4), generator=generator, dtype=torch.float64)
    output = torch.randn((2, 3, 4, 4), generator=generator, dtype=torch.float64)
    for t in (0, 1, 2, 500, 999):
        step = theirs.step(output, t, x_t, generator=torch.Generator().manual_seed(t))
        x0_hat, mean, log_variance = bound.p_mean_variance(output, x_t, torch.tensor([t, t]))
        # diffusers adds sigma_t z at every t > 0, z the first draw of its generator
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t), dtype=torch.float64) if t > 0 else 0
        np.testing.assert_allclose(x0_hat.numpy(), step.pred_original_sample.numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose((mean + torch.exp(0.5 * log_variance) * z).numpy(), step.prev_sample.numpy(),
                                   rtol=1e-9, atol=1e-12, err_msg=f"t = {t}")


# The stratified estimate used during training


def test_estimate_with_one_stratum_per_timestep_is_the_bound():
    # the oracle model's terms do not depend on the noise, so both see the same terms
    x0 = interior_pixels((2, 3, 4, 4))
    scheduler = DDPMScheduler(num_train_timesteps=50)
    bound = VariationalBound(scheduler, "fixed_large")
    exact = bound.evaluate(oracle_model(bound, x0), x0, torch.Generator().manual_seed(0)).total
    estimate = bound.estimate(oracle_model(bound, x0), x0, torch.Generator().manual_seed(1), strata=50)
    np.testing.assert_allclose(estimate.numpy(), exact.numpy(), rtol=1e-9)


def test_estimate_with_few_strata_is_unbiased():
    # oracle model, fixed_large: the terms are fixed and fall steeply with t, so only the timestep draw varies
    x0 = interior_pixels((1, 3, 4, 4)).expand(4000, 3, 4, 4)
    bound = VariationalBound(DDPMScheduler(num_train_timesteps=100), "fixed_large")
    exact = bound.evaluate(oracle_model(bound, x0[:1]), x0[:1], torch.Generator().manual_seed(0)).total.item()
    estimates = bound.estimate(oracle_model(bound, x0), x0, torch.Generator().manual_seed(1), strata=4)
    standard_error = estimates.std().item() / math.sqrt(len(estimates))
    assert estimates.std().item() > 0  # the draw of timesteps does vary the estimate
    assert estimates.mean().item() == pytest.approx(exact, abs=4 * standard_error)


def test_estimate_takes_the_large_first_terms_exactly_so_20_strata_suffice_at_t_1000():
    # the oracle model's decoder term (1.31 bits) alone would swing a uniform stratification's estimate by ~1 bit
    x0 = interior_pixels((64, 3, 4, 4))
    bound = VariationalBound(DDPMScheduler(), "fixed_large")
    estimate = bound.estimate(oracle_model(bound, x0), x0, torch.Generator().manual_seed(1), strata=20)
    assert estimate.mean().item() == pytest.approx(1.3057 + 0.4864, rel=0.01)
    assert estimate.std().item() < 0.05


# Small pieces


def test_approximate_normal_cdf_is_within_1_8e_4_of_the_exact_one():
    z = torch.linspace(-8, 8, 10001, dtype=torch.float64)
    assert (approx_standard_normal_cdf(z) - torch.special.ndtr(z)).abs().max().item() < 1.8e-4


def test_pixels_from_training_images_become_k_over_127_5_minus_1_exactly():
    k = torch.arange(256, dtype=torch.float64)
    as_training_images = (k.float() / 255 - 0.5) / 0.5  # what ConvertImageDtype and Normalize([0.5], [0.5]) give
    assert torch.equal(x0_from_pixels(as_training_images), k / 127.5 - 1)


def test_unknown_variance_is_refused_naming_it():
    with pytest.raises(ValueError, match="learned"):
        VariationalBound(DDPMScheduler(), "learned")
