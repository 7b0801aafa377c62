"""ddpm.DDIMScheduler against diffusers.DDIMScheduler: config, set_timesteps and step for every option, to 1e-6."""

import pytest
import torch

from ddpm import DDIMScheduler, DDPMScheduler, load_pipeline
from ddpm.ddim import DEFAULT_CONFIG as DDIM_DEFAULTS
from ddpm.scheduler import DEFAULT_CONFIG as DDPM_DEFAULTS
from oracle import (MICRO, SCHEDULES, diffusers, diffusers_unet, max_abs_diff, measured, public_config,  # noqa: F401
                    randn, single_thread, step_worst_difference)

TOLERANCE = 1e-6

OPTIONS = {
    **SCHEDULES,
    "set_alpha_to_one_false": {"set_alpha_to_one": False},
    "steps_offset_1": {"steps_offset": 1},
    "trailing": {"timestep_spacing": "trailing"},
    "linspace": {"timestep_spacing": "linspace"},
    "sample_prediction": {"prediction_type": "sample"},
    "v_prediction": {"prediction_type": "v_prediction"},
    "no_clip": {"clip_sample": False},
    "clip_range_0.5": {"clip_sample_range": 0.5},
    "thresholding": {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
    "zero_snr_v_prediction_trailing": {
        "rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
    },
    "cosine_sample_linspace_no_alpha_one": {
        "beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample", "timestep_spacing": "linspace",
        "set_alpha_to_one": False,
    },
}


def pair(**config):
    return DDIMScheduler(**config), diffusers.DDIMScheduler(**config)


def ddim_worst_difference(ours, theirs, num_inference_steps: int, shape=(2, 3, 8, 8), **step) -> float:
    """The largest |ours - diffusers| of a DDIM step over `num_inference_steps` steps (oracle.step_worst_difference)."""
    ours.set_timesteps(num_inference_steps)
    theirs.set_timesteps(num_inference_steps)
    return step_worst_difference(ours, theirs, theirs.timesteps, shape, **step)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("name", OPTIONS)
def test_step_equals_diffusers_over_ten_steps(name, eta):
    ours, theirs = pair(**OPTIONS[name])
    difference = ddim_worst_difference(ours, theirs, 10, eta=eta)
    assert measured(f"ddim step {name} eta={eta} max abs diff", difference) <= TOLERANCE


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("name", ["linear", "sample_prediction", "v_prediction", "clip_range_0.5", "thresholding"])
def test_step_with_clipped_model_output_equals_diffusers(name, eta):
    ours, theirs = pair(**OPTIONS[name])
    difference = ddim_worst_difference(ours, theirs, 10, eta=eta, use_clipped_model_output=True)
    assert measured(f"ddim step {name} clipped eps eta={eta} max abs diff", difference) <= TOLERANCE


@pytest.mark.parametrize("num_inference_steps", [1, 7, 1000])
def test_step_equals_diffusers_for_other_step_counts(num_inference_steps):
    ours, theirs = pair()
    difference = ddim_worst_difference(ours, theirs, num_inference_steps, shape=(1, 3, 4, 4), eta=0.3)
    assert measured(f"ddim step {num_inference_steps} steps max abs diff", difference) <= TOLERANCE


def test_step_accepts_a_python_int_timestep():
    ours, theirs = pair()
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    sample, model_output = randn(1, 3, 4, 4, seed=0), randn(1, 3, 4, 4, seed=1)
    expected = theirs.step(model_output, 500, sample).prev_sample
    assert max_abs_diff(ours.step(model_output, 500, sample), expected) <= TOLERANCE


def test_step_with_eta_draws_noise_at_every_step_the_last_included_as_diffusers():
    # RNG order: one draw of the sample's shape per step when eta > 0, even where sigma_t = 0
    ours, theirs = pair()
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(5)
    sample = randn(2, 3, 4, 4, seed=0)
    generators = {}
    for name, scheduler, unpack in [("ours", ours, lambda out: out), ("theirs", theirs, lambda out: out.prev_sample)]:
        generator = torch.Generator().manual_seed(9)
        for t in scheduler.timesteps:
            unpack(scheduler.step(sample, t, sample, eta=0.7, generator=generator))
        generators[name] = generator
    assert torch.equal(generators["ours"].get_state(), generators["theirs"].get_state())
    reference = torch.Generator().manual_seed(9)
    torch.randn((5, 2, 3, 4, 4), generator=reference)
    assert torch.equal(generators["ours"].get_state(), reference.get_state())


def test_step_with_eta_zero_draws_no_noise():
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    sample = randn(1, 3, 4, 4, seed=0)
    generator = torch.Generator().manual_seed(0)
    before = generator.get_state()
    scheduler.step(sample, scheduler.timesteps[0], sample, generator=generator)
    assert torch.equal(generator.get_state(), before)


def test_step_before_set_timesteps_raises_value_error():
    sample = randn(1, 3, 4, 4, seed=0)
    with pytest.raises(ValueError, match="set_timesteps"):
        DDIMScheduler().step(sample, 10, sample)


@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("num_inference_steps", [1, 3, 7, 50, 999, 1000])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_set_timesteps_equals_diffusers(spacing, num_inference_steps, steps_offset):
    ours, theirs = pair(timestep_spacing=spacing, steps_offset=steps_offset)
    ours.set_timesteps(num_inference_steps)
    theirs.set_timesteps(num_inference_steps)
    assert ours.timesteps.dtype == torch.int64
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()


def test_set_timesteps_more_than_num_train_timesteps_raises_value_error_naming_the_value():
    with pytest.raises(ValueError, match="1001"):
        DDIMScheduler().set_timesteps(1001)


@pytest.mark.parametrize("name", OPTIONS)
def test_config_holds_every_diffusers_key_with_the_same_value(name):
    ours, theirs = pair(**OPTIONS[name])
    assert public_config(ours.config) == public_config(theirs.config)


@pytest.mark.parametrize("ddpm_config", [{}, {"variance_type": "fixed_large", "beta_schedule": "squaredcos_cap_v2",
                                              "prediction_type": "v_prediction", "timestep_spacing": "trailing"}])
def test_from_config_of_a_ddpm_scheduler_equals_diffusers(ddpm_config):
    ddpm_config = diffusers.DDPMScheduler(**ddpm_config).config
    expected = diffusers.DDIMScheduler.from_config(ddpm_config)
    # diffusers also records the DDPM-only keys (variance_type) in the new config, unused; we drop them
    expected_config = {key: value for key, value in public_config(expected.config).items() if key in DDIM_DEFAULTS}
    ours = DDIMScheduler.from_config(DDPMScheduler(**public_config(ddpm_config)).config)
    assert public_config(ours.config) == expected_config
    assert max_abs_diff(ours.alphas_cumprod, expected.alphas_cumprod) == 0
    assert public_config(DDIMScheduler.from_config(ddpm_config).config) == expected_config


def test_ddpm_scheduler_from_a_ddim_config_equals_diffusers():
    ddim_config = diffusers.DDIMScheduler(set_alpha_to_one=False, clip_sample=False).config
    expected = diffusers.DDPMScheduler.from_config(ddim_config)
    expected_config = {key: value for key, value in public_config(expected.config).items() if key in DDPM_DEFAULTS}
    assert public_config(DDPMScheduler.from_config(ddim_config).config) == expected_config


@pytest.mark.parametrize(("key", "value"), [("prediction_type", "foo"), ("timestep_spacing", "foo"),
                                            ("variance_type", "fixed_small")])
def test_unknown_option_raises_value_error_naming_it(key, value):
    with pytest.raises(ValueError, match=key):
        DDIMScheduler(**{key: value})


@pytest.mark.parametrize("pipeline_class", ["DDPMPipeline", "DDIMPipeline"])
def test_load_pipeline_builds_the_ddim_scheduler_ddim_pipeline_would(tmp_path, pipeline_class):
    scheduler = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False)
    getattr(diffusers, pipeline_class)(unet=diffusers_unet(MICRO), scheduler=scheduler).save_pretrained(tmp_path)
    expected = diffusers.DDIMPipeline.from_pretrained(tmp_path).scheduler
    _, ours = load_pipeline(tmp_path, scheduler_class=DDIMScheduler)
    assert isinstance(ours, DDIMScheduler)
    assert public_config(ours.config) == {key: value for key, value in public_config(expected.config).items()
                                          if key in DDIM_DEFAULTS}
