"""ddpm.DDPMScheduler against diffusers.DDPMScheduler, option by option, to 1e-6."""

import json

import pytest
import torch

from ddpm import DDPMScheduler
from oracle import (SCHEDULES, diffusers, max_abs_diff, measured, public_config, randn, single_thread,  # noqa: F401
                    step_worst_difference)

TOLERANCE = 1e-6

STEP_OPTIONS = {
    **SCHEDULES,
    "fixed_small_log": {"variance_type": "fixed_small_log"},
    "fixed_large": {"variance_type": "fixed_large"},
    "sample_prediction": {"prediction_type": "sample"},
    "v_prediction": {"prediction_type": "v_prediction"},
    "no_clip": {"clip_sample": False},
    "clip_range_0.5": {"clip_sample_range": 0.5},
    "clip_range_2": {"clip_sample_range": 2.0},
    "thresholding_over_clipping": {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
    "thresholding_max_3": {"thresholding": True, "sample_max_value": 3.0, "clip_sample": False},
    "trailing": {"timestep_spacing": "trailing"},
    "linspace": {"timestep_spacing": "linspace"},
    "leading_steps_offset_1": {"steps_offset": 1},
    "cosine_v_prediction_trailing_no_clip": {
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
        "clip_sample": False,
    },
    "sample_prediction_thresholding_fixed_large_linspace": {
        "prediction_type": "sample",
        "thresholding": True,
        "variance_type": "fixed_large",
        "timestep_spacing": "linspace",
    },
}


def pair(**config):
    return DDPMScheduler(**config), diffusers.DDPMScheduler(**config)


@pytest.mark.parametrize("method", ["add_noise", "get_velocity"])
@pytest.mark.parametrize("name", SCHEDULES)
def test_forward_process_equals_diffusers(name, method):
    ours, theirs = pair(**SCHEDULES[name])
    T = theirs.config.num_train_timesteps
    x0, noise = randn(4, 3, 8, 8, seed=0), randn(4, 3, 8, 8, seed=1)
    timesteps = torch.tensor([0, 1, T // 2, T - 1])
    difference = max_abs_diff(getattr(ours, method)(x0, noise, timesteps), getattr(theirs, method)(x0, noise, timesteps))
    assert measured(f"{method} {name} max abs diff", difference) <= TOLERANCE


def test_add_noise_works_in_the_samples_dtype():
    ours, theirs = pair()
    x0, noise = randn(2, 3, 4, 4, seed=0).double(), randn(2, 3, 4, 4, seed=1).double()
    timesteps = torch.tensor([7, 700])
    actual = ours.add_noise(x0, noise, timesteps)
    assert actual.dtype == torch.float64
    assert measured("add_noise float64 max abs diff", max_abs_diff(actual, theirs.add_noise(x0, noise, timesteps))) <= 1e-12


def test_timesteps_before_set_timesteps_count_down_from_T_minus_1():
    ours, theirs = pair()
    assert ours.timesteps.dtype == torch.int64
    assert torch.equal(ours.timesteps, theirs.timesteps)


@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("num_inference_steps", [1, 3, 7, 50, 999, 1000])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_set_timesteps_equals_diffusers(spacing, num_inference_steps, steps_offset):
    ours, theirs = pair(timestep_spacing=spacing, steps_offset=steps_offset)
    ours.set_timesteps(num_inference_steps)
    theirs.set_timesteps(num_inference_steps)
    assert ours.timesteps.dtype == torch.int64
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_set_timesteps_with_num_train_timesteps_100_equals_diffusers(spacing):
    ours, theirs = pair(num_train_timesteps=100, timestep_spacing=spacing)
    ours.set_timesteps(7)
    theirs.set_timesteps(7)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()


def test_set_timesteps_zero_raises_value_error():
    with pytest.raises(ValueError):
        DDPMScheduler().set_timesteps(0)


def test_set_timesteps_more_than_num_train_timesteps_raises_value_error_naming_the_value():
    with pytest.raises(ValueError, match="1001"):
        DDPMScheduler().set_timesteps(1001)


@pytest.mark.parametrize("name", STEP_OPTIONS)
def test_step_equals_diffusers_over_ten_steps(name):
    ours, theirs = pair(**STEP_OPTIONS[name])
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    difference = step_worst_difference(ours, theirs, theirs.timesteps)
    assert measured(f"step {name} max abs diff", difference) <= TOLERANCE


def test_step_equals_diffusers_over_all_1000_steps():
    ours, theirs = pair()
    ours.set_timesteps(1000)
    theirs.set_timesteps(1000)
    difference = step_worst_difference(ours, theirs, theirs.timesteps, shape=(1, 3, 4, 4))
    assert measured("step 1000 steps max abs diff", difference) <= TOLERANCE


def test_step_before_set_timesteps_goes_to_the_previous_training_timestep():
    ours, theirs = pair()
    difference = step_worst_difference(ours, theirs, [999, 500, 1, 0])
    assert measured("step without set_timesteps max abs diff", difference) <= TOLERANCE


def test_step_accepts_a_python_int_timestep():
    ours, theirs = pair()
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    difference = step_worst_difference(ours, theirs, theirs.timesteps, as_int=True)
    assert measured("step int timestep max abs diff", difference) <= TOLERANCE


def test_fixed_large_log_is_finite_and_equals_fixed_large():
    # x_prev = mean + exp(0.5 * log beta_t) z is mean + sqrt(beta_t) z. (diffusers' own
    # fixed_large_log returns NaN, its issue 14569, so diffusers' fixed_large is the oracle.)
    ours = DDPMScheduler(variance_type="fixed_large_log")
    theirs = diffusers.DDPMScheduler(variance_type="fixed_large")
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    difference = step_worst_difference(ours, theirs, theirs.timesteps)
    assert measured("step fixed_large_log vs fixed_large max abs diff", difference) <= TOLERANCE


def test_step_returns_a_plain_tensor():
    scheduler = DDPMScheduler()
    sample = randn(1, 3, 4, 4, seed=0)
    assert type(scheduler.step(sample, 10, sample, generator=torch.Generator().manual_seed(0))) is torch.Tensor


def test_step_draws_noise_only_when_t_is_positive():
    scheduler = DDPMScheduler()
    scheduler.set_timesteps(10)
    sample = randn(1, 3, 4, 4, seed=0)
    generator = torch.Generator().manual_seed(0)
    before = generator.get_state()
    scheduler.step(sample, scheduler.timesteps[-1], sample, generator=generator)
    assert torch.equal(generator.get_state(), before)
    scheduler.step(sample, scheduler.timesteps[-2], sample, generator=generator)
    assert not torch.equal(generator.get_state(), before)


@pytest.mark.parametrize("name", ["defaults", *STEP_OPTIONS])
def test_config_holds_every_diffusers_key_with_the_same_value(name):
    ours, theirs = pair(**STEP_OPTIONS.get(name, {}))
    assert public_config(ours.config) == public_config(theirs.config)


def test_config_is_json_serialisable_and_rebuilds_the_same_scheduler():
    scheduler = DDPMScheduler(**STEP_OPTIONS["trained_betas"])
    rebuilt = DDPMScheduler(**json.loads(json.dumps(scheduler.config)))
    x0, noise, timesteps = randn(2, 3, 4, 4, seed=0), randn(2, 3, 4, 4, seed=1), torch.tensor([3, 90])
    assert torch.equal(rebuilt.add_noise(x0, noise, timesteps), scheduler.add_noise(x0, noise, timesteps))


UNKNOWN_OPTIONS = [
    ("variance_type", "learned"),
    ("variance_type", "learned_range"),
    ("prediction_type", "foo"),
    ("beta_schedule", "foo"),
    ("timestep_spacing", "foo"),
]


@pytest.mark.parametrize(("key", "value"), UNKNOWN_OPTIONS, ids=[f"{k}={v}" for k, v in UNKNOWN_OPTIONS])
def test_unknown_option_raises_value_error_naming_it(key, value):
    with pytest.raises(ValueError, match=key):
        DDPMScheduler(**{key: value})
