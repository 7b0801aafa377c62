"""ddpm.generate with a DPMSolverMultistepScheduler against diffusers: a DDPMPipeline loaded from our saved folder,
its scheduler swapped for `DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`, gives our pixels."""

from __future__ import annotations  # the diffusers annotation below are not evaluated

import numpy as np
import pytest
import torch

from ddpm import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, generate, load_pipeline, save_pipeline
from ddpm.sampling import SAMPLERS, sampling_scheduler
from oracle import diffusers, measured, micro_unets, single_thread  # noqa: F401  (autouse fixture)

TOLERANCE = 1e-5

CASES = {  # the training DDPMScheduler's config, DPM-Solver options set on top (as from_config(..., **options)), steps
    "default": ({}, {}, 10),
    "quickstart_cosine_sample": ({"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample"}, {}, 20),
    "v_prediction_order_3_trailing": ({"prediction_type": "v_prediction"},
                                      {"solver_order": 3, "timestep_spacing": "trailing"}, 12),
    "dpmsolver_karras": ({}, {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min",
                              "use_karras_sigmas": True}, 8),
    "sde_dpmsolver++_thresholding": ({}, {"algorithm_type": "sde-dpmsolver++", "thresholding": True}, 10),
}


@pytest.fixture(scope="module")
def unets():
    return micro_unets()


def as_nhwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).numpy()


def png_pixels(images: torch.Tensor) -> np.ndarray:
    """The uint8 pixels a PNG of `images` holds, rounded as DDPMPipeline's numpy_to_pil."""
    return (as_nhwc(images) * 255).round().astype(np.uint8)


def pipeline_with_dpm_solver(folder, **options) -> diffusers.DDPMPipeline:
    """What a diffusers user does with our folder: load it, swap the scheduler for DPM-Solver++."""
    pipeline = diffusers.DDPMPipeline.from_pretrained(folder)
    pipeline.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config, **options)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.mark.parametrize("name", CASES)
def test_generate_equals_ddpm_pipeline_with_the_dpm_solver_swapped_in(name, unets, tmp_path):
    ours, _ = unets
    ddpm_config, options, steps = CASES[name]
    save_pipeline(tmp_path, ours, DDPMScheduler(**ddpm_config))
    pipeline = pipeline_with_dpm_solver(tmp_path, **options)
    expected = pipeline(2, generator=torch.manual_seed(3), num_inference_steps=steps, output_type="np").images

    unet, scheduler = load_pipeline(tmp_path, scheduler_class=DPMSolverMultistepScheduler)
    scheduler = DPMSolverMultistepScheduler.from_config(scheduler.config, **options)
    actual = generate(unet, scheduler, 2, generator=torch.manual_seed(3), num_inference_steps=steps)
    assert measured(f"generate dpm {name} max abs diff", np.abs(as_nhwc(actual) - expected).max()) <= TOLERANCE
    pil = pipeline(2, generator=torch.manual_seed(3), num_inference_steps=steps).images
    assert np.array_equal(png_pixels(actual), np.stack([np.asarray(image) for image in pil]))


def test_generate_with_dpm_defaults_to_20_steps(unets, tmp_path):
    ours, _ = unets
    save_pipeline(tmp_path, ours, DDPMScheduler())
    expected = pipeline_with_dpm_solver(tmp_path)(2, generator=torch.manual_seed(0), num_inference_steps=20,
                                                  output_type="np").images
    actual = generate(ours, sampling_scheduler("dpm", DDPMScheduler().config), 2, generator=torch.manual_seed(0))
    assert measured("generate dpm 20 steps max abs diff", np.abs(as_nhwc(actual) - expected).max()) <= TOLERANCE


def test_one_generator_per_image_with_the_sde_variant_equals_the_pipeline_given_that_list(unets):
    ours, theirs = unets
    pipeline = diffusers.DDPMPipeline(theirs, diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"))
    pipeline.set_progress_bar_config(disable=True)

    def generators():
        return [torch.Generator().manual_seed(seed) for seed in (5, 17, 2)]

    expected = pipeline(3, generator=generators(), num_inference_steps=6, output_type="np").images
    actual = generate(ours, DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), 3, generator=generators(),
                      num_inference_steps=6)
    assert np.abs(as_nhwc(actual) - expected).max() <= TOLERANCE


def test_eta_with_the_dpm_solver_is_a_value_error_naming_it(unets):
    ours, _ = unets
    with pytest.raises(ValueError, match="eta=0.5.*DPMSolverMultistepScheduler"):
        generate(ours, DPMSolverMultistepScheduler(), 1, eta=0.5, num_inference_steps=2)


@pytest.mark.parametrize(("sampler", "scheduler_class"), [("ddpm", DDPMScheduler), ("ddim", DDIMScheduler),
                                                          ("dpm", DPMSolverMultistepScheduler)])
def test_sampling_scheduler_builds_each_sampler_from_the_training_config(sampler, scheduler_class):
    config = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample").config
    scheduler = sampling_scheduler(sampler, config)
    assert type(scheduler) is scheduler_class and SAMPLERS[sampler] is scheduler_class
    assert scheduler.config["beta_schedule"] == "squaredcos_cap_v2"
    assert scheduler.config["prediction_type"] == "sample"


def test_an_unknown_sampler_is_a_value_error_naming_it_and_the_choices():
    with pytest.raises(ValueError, match=r"unknown sampler 'pndm'; choose one of \['ddpm', 'ddim', 'dpm', 'dpm-sde'\]"):
        sampling_scheduler("pndm", DDPMScheduler().config)
