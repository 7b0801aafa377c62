"""ddpm.generate with a DDIMScheduler against diffusers.DDIMPipeline, and with one generator per image."""

from __future__ import annotations  # the diffusers annotation below is not evaluated

import numpy as np
import pytest
import torch

from ddpm import DDIMScheduler, DDPMScheduler, generate
from oracle import diffusers, measured, micro_unets, single_thread  # noqa: F401  (autouse fixture)

TOLERANCE = 1e-5

SAMPLERS = {  # DDIM scheduler config, eta, steps
    "eta_0": ({}, 0.0, 10),
    "eta_1": ({}, 1.0, 10),
    "eta_0.5_trailing": ({"timestep_spacing": "trailing"}, 0.5, 12),
    "linspace_no_alpha_one": ({"timestep_spacing": "linspace", "set_alpha_to_one": False}, 0.3, 8),
    "v_prediction_no_clip": ({"prediction_type": "v_prediction", "clip_sample": False}, 0.0, 10),
    "thresholding_cosine": ({"thresholding": True, "beta_schedule": "squaredcos_cap_v2"}, 0.7, 10),
}


@pytest.fixture(scope="module")
def unets():
    return micro_unets()


def ddim_pipeline(unet, scheduler_config: dict) -> diffusers.DDIMPipeline:
    pipeline = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(**scheduler_config))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def as_nhwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).numpy()


def png_pixels(images: torch.Tensor) -> np.ndarray:
    """The uint8 pixels a PNG of `images` holds, rounded as DDIMPipeline's numpy_to_pil."""
    return (as_nhwc(images) * 255).round().astype(np.uint8)


@pytest.mark.parametrize("name", SAMPLERS)
def test_generate_with_ddim_equals_ddim_pipeline(name, unets):
    ours, theirs = unets
    config, eta, steps = SAMPLERS[name]
    pipeline = ddim_pipeline(theirs, config)
    expected = pipeline(2, generator=torch.manual_seed(3), eta=eta, num_inference_steps=steps, output_type="np").images
    actual = generate(ours, DDIMScheduler(**config), 2, generator=torch.manual_seed(3), num_inference_steps=steps,
                      eta=eta)
    assert measured(f"generate ddim {name} max abs diff", np.abs(as_nhwc(actual) - expected).max()) <= TOLERANCE
    pil = pipeline(2, generator=torch.manual_seed(3), eta=eta, num_inference_steps=steps).images
    assert np.array_equal(png_pixels(actual), np.stack([np.asarray(image) for image in pil]))


def test_generate_with_ddim_defaults_to_ddim_pipelines_50_steps(unets):
    ours, theirs = unets
    expected = ddim_pipeline(theirs, {})(2, generator=torch.manual_seed(0), output_type="np").images
    actual = generate(ours, DDIMScheduler(), 2, generator=torch.manual_seed(0))
    assert measured("generate ddim 50 steps max abs diff", np.abs(as_nhwc(actual) - expected).max()) <= TOLERANCE


def test_ddim_from_a_ddpm_config_equals_ddim_pipeline_given_the_ddpm_scheduler(unets):
    # DDIMPipeline converts the DDPMScheduler it is given with DDIMScheduler.from_config
    ours, theirs = unets
    pipeline = diffusers.DDIMPipeline(unet=theirs, scheduler=diffusers.DDPMScheduler(variance_type="fixed_large"))
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(2, generator=torch.manual_seed(1), num_inference_steps=10, output_type="np").images
    scheduler = DDIMScheduler.from_config(DDPMScheduler(variance_type="fixed_large").config)
    actual = generate(ours, scheduler, 2, generator=torch.manual_seed(1), num_inference_steps=10)
    assert np.abs(as_nhwc(actual) - expected).max() <= TOLERANCE


@pytest.mark.parametrize("sampler", ["ddpm", "ddim_eta_1"])
def test_one_generator_per_image_equals_the_pipeline_given_that_list(sampler, unets):
    ours, theirs = unets
    if sampler == "ddpm":
        pipeline, scheduler, call = diffusers.DDPMPipeline(theirs, diffusers.DDPMScheduler()), DDPMScheduler(), {}
    else:
        pipeline, scheduler, call = ddim_pipeline(theirs, {}), DDIMScheduler(), {"eta": 1.0}
    pipeline.set_progress_bar_config(disable=True)

    def generators():
        return [torch.Generator().manual_seed(seed) for seed in (5, 17, 2)]

    expected = pipeline(3, generator=generators(), num_inference_steps=10, output_type="np", **call).images
    actual = generate(ours, scheduler, 3, generator=generators(), num_inference_steps=10, **call)
    assert measured(f"generate {sampler} generator list max abs diff",
                    np.abs(as_nhwc(actual) - expected).max()) <= TOLERANCE


def test_an_image_with_its_own_generator_does_not_depend_on_the_other_images_of_its_batch(unets):
    ours, _ = unets
    scheduler = DDPMScheduler()
    alone = generate(ours, scheduler, 1, generator=[torch.Generator().manual_seed(7)], num_inference_steps=10)
    batch = generate(ours, scheduler, 3, num_inference_steps=10,
                     generator=[torch.Generator().manual_seed(seed) for seed in (1, 7, 9)])
    assert measured("image in batch of 3 vs alone max abs diff", (batch[1] - alone[0]).abs().max().item()) <= TOLERANCE


def test_eta_with_the_ddpm_scheduler_is_a_value_error_naming_it(unets):
    ours, _ = unets
    with pytest.raises(ValueError, match="eta=0.5.*DDPMScheduler"):
        generate(ours, DDPMScheduler(), 1, eta=0.5, num_inference_steps=2)


def test_a_generator_list_of_the_wrong_length_is_a_value_error(unets):
    ours, _ = unets
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        generate(ours, DDIMScheduler(), 3, generator=[torch.Generator(), torch.Generator()], num_inference_steps=2)
