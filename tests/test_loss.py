"""The min-SNR-gamma loss weighting (Hang et al. 2023), against the paper's formula and diffusers' scripts."""

import pytest
import torch
import torch.nn.functional as F

from ddpm import DDPMScheduler, UNet2DModel
from ddpm.loss import diffusion_loss, min_snr_weights, training_target
from oracle import TINY, diffusers, perturb_

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
    snr = diffusers.training_utils.compute_snr(theirs_scheduler, TIMESTEPS)
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
