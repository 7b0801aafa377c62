"""The min-SNR-gamma loss weighting (Hang et al. 2023), against the paper's formula and diffusers' scripts."""

import diffusers
import pytest
import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from ddpm import DDPMScheduler, UNet2DModel
from ddpm.loss import diffusion_loss, importance_sampling_probabilities, min_snr_weights, training_target
from oracle import TINY, perturb_

TIMESTEPS = torch.tensor([0, 1, 10, 100, 250, 500, 750, 999])


def paper_snr(timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = abar_t / (1 - abar_t), from the linear betas in float64, independently of the scheduler."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, dim=0)[timesteps]
    return abar / (1 - abar)


@pytest.mark.parametrize("gamma", [1.0, 5.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_min_snr_weights_follow_the_papers_formula_for_each_prediction_type(prediction_type, gamma):
    snr = paper_snr(TIMESTEPS)
    x0_weight = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64))  # w_t = min(SNR(t), gamma)
    # the eps error is SNR times the x_0 error, the v error (SNR + 1) times it
    expected = {"sample": x0_weight, "epsilon": x0_weight / snr, "v_prediction": x0_weight / (snr + 1)}[prediction_type]
    ours = min_snr_weights(DDPMScheduler(prediction_type=prediction_type), TIMESTEPS, gamma)
    # the scheduler's abar is float32: 1 - abar_0 = 1e-4 keeps only ~4 significant digits
    torch.testing.assert_close(ours.double(), expected, rtol=5e-4, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_min_snr_weights_equal_diffusers_training_scripts(prediction_type):
    # diffusers' train_text_to_image.py --snr_gamma: min(snr, gamma), then / snr (eps) or / (snr + 1) (v)
    theirs_scheduler = diffusers.DDPMScheduler(prediction_type=prediction_type)
    snr = compute_snr(theirs_scheduler, TIMESTEPS)
    weights = torch.stack([snr, 5.0 * torch.ones_like(TIMESTEPS)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        weights = weights / snr
    elif prediction_type == "v_prediction":
        weights = weights / (snr + 1)
    ours = min_snr_weights(DDPMScheduler(prediction_type=prediction_type), TIMESTEPS, 5.0)
    torch.testing.assert_close(ours, weights, rtol=1e-6, atol=0)


def test_epsilon_weights_are_one_where_snr_is_below_gamma_and_gamma_over_snr_above():
    snr = paper_snr(TIMESTEPS).float()
    weights = min_snr_weights(DDPMScheduler(), TIMESTEPS, 5.0)
    assert torch.all(weights[snr <= 5] == 1)
    assert torch.all(weights[snr > 5] < 1)
    assert (snr > 5).any() and (snr <= 5).any()


def test_epsilon_weight_at_zero_terminal_snr_is_its_limit_one():
    scheduler = DDPMScheduler(rescale_betas_zero_snr=True)
    assert scheduler.alphas_cumprod[-1] == 0  # SNR(T) = 0
    weights = min_snr_weights(scheduler, torch.tensor([999, 998]), 5.0)
    assert torch.isfinite(weights).all() and weights[0] == 1


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g), torch.tensor([3, 40, 400, 900])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_loss_with_snr_gamma_weights_each_images_mse(prediction_type, batch):
    x0, noise, timesteps = batch
    scheduler = DDPMScheduler(prediction_type=prediction_type)
    torch.manual_seed(0)
    unet = perturb_(UNet2DModel(**TINY))
    prediction = unet(scheduler.add_noise(x0, noise, timesteps), timesteps)
    per_image = ((prediction - training_target(scheduler, x0, noise, timesteps)) ** 2).mean(dim=(1, 2, 3))
    expected = (per_image * min_snr_weights(scheduler, timesteps, 5.0)).mean()
    torch.testing.assert_close(diffusion_loss(unet, scheduler, x0, noise, timesteps, snr_gamma=5.0), expected,
                               rtol=1e-6, atol=0)
    # the weights differ from 1 on this batch, so the weighted loss is not L_simple
    assert not torch.allclose(expected, F.mse_loss(prediction, training_target(scheduler, x0, noise, timesteps)))


def test_an_unreachable_gamma_leaves_the_epsilon_loss_l_simple(batch):
    x0, noise, timesteps = batch
    scheduler = DDPMScheduler()
    torch.manual_seed(0)
    unet = perturb_(UNet2DModel(**TINY))
    torch.testing.assert_close(diffusion_loss(unet, scheduler, x0, noise, timesteps, snr_gamma=1e9),
                               diffusion_loss(unet, scheduler, x0, noise, timesteps), rtol=1e-6, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_importance_sampling_draws_each_timestep_in_proportion_to_its_min_snr_weight(prediction_type):
    scheduler = DDPMScheduler(prediction_type=prediction_type, beta_schedule="squaredcos_cap_v2")
    probabilities = importance_sampling_probabilities(scheduler, 10.0)
    weights = min_snr_weights(scheduler, torch.arange(1000), 10.0)
    assert probabilities.shape == (1000,)
    torch.testing.assert_close(probabilities.sum(), torch.tensor(1.0))
    torch.testing.assert_close(probabilities / probabilities[0], weights / weights[0])


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_the_importance_sampled_loss_equals_the_min_snr_weighted_loss_in_expectation(prediction_type):
    # E_p[loss of one image at t drawn from p] over every t, exactly, against the weighted loss with uniform t
    scheduler = DDPMScheduler(prediction_type=prediction_type, beta_schedule="squaredcos_cap_v2")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(1, 3, 4, 4, generator=g) * 2 - 1, torch.randn(1, 3, 4, 4, generator=g)
    unet = lambda x, t: 0.5 * x  # noqa: E731 -- an error that differs from timestep to timestep
    timesteps = torch.arange(1000)
    weighted = diffusion_loss(unet, scheduler, x0.expand(1000, -1, -1, -1), noise.expand(1000, -1, -1, -1),
                              timesteps, snr_gamma=10.0)
    sampled = torch.stack([diffusion_loss(unet, scheduler, x0, noise, t.view(1), snr_gamma=10.0,
                                          importance_sampled=True) for t in timesteps])
    expectation = (importance_sampling_probabilities(scheduler, 10.0) * sampled).sum()
    torch.testing.assert_close(expectation, weighted, rtol=1e-5, atol=0)
