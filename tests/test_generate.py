"""ddpm.generate against diffusers.DDPMPipeline: same weights and seed give the same images."""

import numpy as np
import pytest
import torch

from ddpm import DDPMScheduler, UNet2DModel, generate
from oracle import MICRO, diffusers, measured, micro_unets, single_thread  # noqa: F401  (autouse fixture)

TOLERANCE = 1e-5

SAMPLERS = {
    "leading": ({}, 10),
    "leading_steps_offset_1": ({"steps_offset": 1}, 10),
    "trailing": ({"timestep_spacing": "trailing"}, 10),
    "linspace": ({"timestep_spacing": "linspace"}, 10),
    "fixed_small_log": ({"variance_type": "fixed_small_log"}, 20),
    "fixed_large": ({"variance_type": "fixed_large"}, 20),
    "fixed_large_trailing": ({"variance_type": "fixed_large", "timestep_spacing": "trailing"}, 13),
    "v_prediction_no_clip": ({"prediction_type": "v_prediction", "clip_sample": False}, 15),
    "sample_prediction": ({"prediction_type": "sample"}, 15),
    "thresholding": ({"thresholding": True, "sample_max_value": 2.0}, 15),
    "squaredcos_cap_v2_linspace": ({"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "linspace"}, 12),
}


@pytest.fixture(scope="module")
def unets():
    return micro_unets()


def diffusers_images(unet, scheduler_config: dict, seed: int | None, **call) -> np.ndarray:
    pipeline = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**scheduler_config))
    pipeline.set_progress_bar_config(disable=True)
    generator = None if seed is None else torch.manual_seed(seed)
    return pipeline(batch_size=2, generator=generator, output_type="np", **call).images


def as_nhwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("name", SAMPLERS)
def test_generate_equals_ddpm_pipeline(name, unets):
    ours, theirs = unets
    scheduler_config, steps = SAMPLERS[name]
    expected = diffusers_images(theirs, scheduler_config, seed=3, num_inference_steps=steps)
    actual = generate(ours, DDPMScheduler(**scheduler_config), 2, generator=torch.manual_seed(3), num_inference_steps=steps)
    difference = np.abs(as_nhwc(actual) - expected).max()
    assert measured(f"generate {name} ({steps} steps) max abs diff", difference) <= TOLERANCE


def test_generate_with_default_1000_steps_equals_ddpm_pipeline(unets):
    ours, theirs = unets
    expected = diffusers_images(theirs, {}, seed=0)
    actual = generate(ours, DDPMScheduler(), 2, generator=torch.manual_seed(0))
    difference = np.abs(as_nhwc(actual) - expected).max()
    assert measured("generate 1000 steps max abs diff", difference) <= TOLERANCE


def test_generate_with_fixed_large_log_equals_ddpm_pipeline_with_fixed_large(unets):
    # diffusers' fixed_large_log returns NaN (its issue 14569); exp(0.5 log beta) = sqrt(beta) is fixed_large.
    ours, theirs = unets
    expected = diffusers_images(theirs, {"variance_type": "fixed_large"}, seed=5, num_inference_steps=10)
    actual = generate(ours, DDPMScheduler(variance_type="fixed_large_log"), 2, generator=torch.manual_seed(5),
                      num_inference_steps=10)
    difference = np.abs(as_nhwc(actual) - expected).max()
    assert measured("generate fixed_large_log vs fixed_large max abs diff", difference) <= TOLERANCE


def test_generate_without_generator_draws_from_the_global_rng_like_ddpm_pipeline(unets):
    ours, theirs = unets
    torch.manual_seed(11)
    expected = diffusers_images(theirs, {}, seed=None, num_inference_steps=5)
    torch.manual_seed(11)
    actual = generate(ours, DDPMScheduler(), 2, num_inference_steps=5)
    difference = np.abs(as_nhwc(actual) - expected).max()
    assert measured("generate global rng max abs diff", difference) <= TOLERANCE


def test_generate_returns_batch_channels_height_width_floats_in_0_1_without_grad():
    torch.manual_seed(0)
    unet = UNet2DModel(**dict(MICRO, in_channels=1, out_channels=1)).eval()
    images = generate(unet, DDPMScheduler(), 3, generator=torch.manual_seed(0), num_inference_steps=3)
    assert images.shape == (3, 1, 8, 8)
    assert images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert not images.requires_grad
