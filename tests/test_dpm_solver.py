"""ddpm.DPMSolverMultistepScheduler against diffusers.DPMSolverMultistepScheduler: config, set_timesteps and step
for every option we support, to 1e-6 (fp32, one thread)."""

import pytest
import torch

from ddpm import DDPMScheduler, DPMSolverMultistepScheduler
from ddpm.dpm_solver import DEFAULT_CONFIG as DPM_DEFAULTS
from oracle import (SCHEDULES, diffusers, max_abs_diff, measured, public_config, randn, single_thread,  # noqa: F401
                    step_worst_difference)

TOLERANCE = 1e-6
DPMSOLVER = {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}  # noise prediction needs a last sigma > 0

OPTIONS = {
    **SCHEDULES,
    "order_1": {"solver_order": 1},
    "order_3": {"solver_order": 3},
    "heun": {"solver_type": "heun"},
    "dpmsolver": DPMSOLVER,
    "dpmsolver_order_3": {**DPMSOLVER, "solver_order": 3},
    "dpmsolver_heun": {**DPMSOLVER, "solver_type": "heun"},
    "sde_dpmsolver++": {"algorithm_type": "sde-dpmsolver++"},
    "sde_dpmsolver++_heun_order_3": {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun", "solver_order": 3},
    "no_lower_order_final": {"lower_order_final": False, "solver_order": 3},
    "euler_at_final_sigma_min": {"euler_at_final": True, "final_sigmas_type": "sigma_min"},
    "final_sigma_min": {"final_sigmas_type": "sigma_min"},
    "sample_prediction": {"prediction_type": "sample"},
    "v_prediction": {"prediction_type": "v_prediction"},
    "dpmsolver_sample_prediction": {**DPMSOLVER, "prediction_type": "sample"},
    "dpmsolver_v_prediction": {**DPMSOLVER, "prediction_type": "v_prediction"},
    "thresholding": {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
    "dpmsolver_thresholding": {**DPMSOLVER, "thresholding": True, "sample_max_value": 1.5},
    "leading": {"timestep_spacing": "leading"},
    "leading_steps_offset_1": {"timestep_spacing": "leading", "steps_offset": 1},
    "trailing": {"timestep_spacing": "trailing"},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "lu_lambdas": {"use_lu_lambdas": True},
    "lambda_min_clipped": {"lambda_min_clipped": -5.1},
    "zero_snr_v_prediction_trailing": {
        "rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
    },
    # the quickstart's: x_0 prediction on the cosine schedule, from a DDPMScheduler config (leading spacing)
    "cosine_sample_leading": {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample",
                              "timestep_spacing": "leading"},
    "cosine_karras_order_3": {"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True, "solver_order": 3},
}


def pair(**config):
    return DPMSolverMultistepScheduler(**config), diffusers.DPMSolverMultistepScheduler(**config)


def dpm_worst_difference(ours, theirs, num_inference_steps: int, shape=(2, 3, 8, 8), **step) -> float:
    """The largest |ours - diffusers| of a step over a whole sampling loop (oracle.step_worst_difference)."""
    ours.set_timesteps(num_inference_steps)
    theirs.set_timesteps(num_inference_steps)
    theirs.set_begin_index(0)  # as ours: start at the first index even where the first timestep repeats
    return step_worst_difference(ours, theirs, theirs.timesteps, shape, **step)


@pytest.mark.parametrize("num_inference_steps", [1, 4, 10, 20])
@pytest.mark.parametrize("name", OPTIONS)
def test_step_equals_diffusers_over_a_whole_loop(name, num_inference_steps):
    ours, theirs = pair(**OPTIONS[name])
    difference = dpm_worst_difference(ours, theirs, num_inference_steps)
    assert measured(f"dpm step {name} {num_inference_steps} steps max abs diff", difference) <= TOLERANCE


@pytest.mark.parametrize("name", ["linear", "order_3", "dpmsolver", "sde_dpmsolver++", "karras"])
def test_step_equals_diffusers_over_a_thousand_steps(name):
    ours, theirs = pair(**OPTIONS[name])
    difference = dpm_worst_difference(ours, theirs, 1000, shape=(1, 3, 4, 4))
    assert measured(f"dpm step {name} 1000 steps max abs diff", difference) <= TOLERANCE


def test_a_bf16_model_output_is_stepped_in_fp32_and_returned_in_bf16_as_diffusers():
    ours, theirs = pair(solver_order=3)
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(6)
    sample = randn(1, 3, 4, 4, seed=0).bfloat16()
    for i, t in enumerate(theirs.timesteps):
        model_output = randn(1, 3, 4, 4, seed=i + 1).bfloat16()
        expected = theirs.step(model_output, t, sample).prev_sample
        actual = ours.step(model_output, t, sample)
        assert actual.dtype == torch.bfloat16
        assert torch.equal(actual, expected)
        sample = expected


def test_set_timesteps_starts_a_new_loop_from_scratch():
    # the multistep history of one loop must not leak into the next (generate calls set_timesteps per batch)
    scheduler = DPMSolverMultistepScheduler(solver_order=3)
    results = []
    for _ in range(2):
        scheduler.set_timesteps(8)
        sample = randn(1, 3, 4, 4, seed=0)
        for i, t in enumerate(scheduler.timesteps):
            sample = scheduler.step(randn(1, 3, 4, 4, seed=i + 1), t, sample)
        results.append(sample)
    assert torch.equal(results[0], results[1])


def test_sde_variant_draws_noise_at_every_step_the_last_included_as_diffusers():
    ours, theirs = pair(algorithm_type="sde-dpmsolver++")
    sample = randn(2, 3, 4, 4, seed=0)
    states = []
    for scheduler, unpack in [(ours, lambda out: out), (theirs, lambda out: out.prev_sample)]:
        scheduler.set_timesteps(5)
        generator = torch.Generator().manual_seed(9)
        for t in scheduler.timesteps:
            unpack(scheduler.step(sample, t, sample, generator=generator))
        states.append(generator.get_state())
    reference = torch.Generator().manual_seed(9)
    torch.randn((5, 2, 3, 4, 4), generator=reference)
    assert torch.equal(states[0], states[1]) and torch.equal(states[0], reference.get_state())


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
def test_ode_variants_draw_no_noise(algorithm):
    scheduler = DPMSolverMultistepScheduler(**(DPMSOLVER if algorithm == "dpmsolver" else {}))
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(0)
    before = generator.get_state()
    sample = randn(1, 3, 4, 4, seed=0)
    for t in scheduler.timesteps:
        sample = scheduler.step(sample, t, sample, generator=generator)
    assert torch.equal(generator.get_state(), before)


def test_first_order_dpm_solver_plus_plus_is_ddim():
    # DPM-Solver++1 is DDIM with eta = 0 (DPM-Solver++ Sec. 4.1): the same x_{t_i} from the same timesteps
    scheduler = DPMSolverMultistepScheduler(solver_order=1, final_sigmas_type="sigma_min")
    scheduler.set_timesteps(5)
    abar = scheduler.alphas_cumprod
    sample, eps = randn(1, 3, 4, 4, seed=0), randn(1, 3, 4, 4, seed=1)
    t, prev_t = scheduler.timesteps[0], scheduler.timesteps[1]
    x0 = (sample - (1 - abar[t]) ** 0.5 * eps) / abar[t] ** 0.5
    ddim = abar[prev_t] ** 0.5 * x0 + (1 - abar[prev_t]) ** 0.5 * eps  # DDIM Eq. 12, sigma_t = 0
    # diffusers interpolates sigma at integer timesteps, so abar itself comes back up to fp32 rounding
    assert max_abs_diff(scheduler.step(eps, t, sample), ddim) <= 1e-4


@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("num_inference_steps", [1, 3, 7, 20, 999, 1000])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_set_timesteps_and_sigmas_equal_diffusers(spacing, num_inference_steps, steps_offset):
    ours, theirs = pair(timestep_spacing=spacing, steps_offset=steps_offset)
    ours.set_timesteps(num_inference_steps)
    theirs.set_timesteps(num_inference_steps)
    assert ours.timesteps.dtype == torch.int64
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    assert torch.equal(ours.sigmas, theirs.sigmas)


@pytest.mark.parametrize("num_inference_steps", [2, 5, 20, 100])
@pytest.mark.parametrize("name", ["karras", "exponential", "lu_lambdas", "cosine_karras_order_3", "final_sigma_min",
                                  "lambda_min_clipped"])
def test_noise_schedules_equal_diffusers(name, num_inference_steps):
    ours, theirs = pair(**OPTIONS[name])
    ours.set_timesteps(num_inference_steps)
    theirs.set_timesteps(num_inference_steps)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    assert torch.equal(ours.sigmas, theirs.sigmas)


def test_a_timestep_not_in_the_schedule_is_a_value_error_naming_it():
    scheduler = DPMSolverMultistepScheduler()
    scheduler.set_timesteps(4)
    sample = randn(1, 3, 4, 4, seed=0)
    with pytest.raises(ValueError, match="timestep 5 is not in the schedule"):
        scheduler.step(sample, 5, sample)


def test_step_before_set_timesteps_raises_value_error():
    sample = randn(1, 3, 4, 4, seed=0)
    with pytest.raises(ValueError, match="set_timesteps"):
        DPMSolverMultistepScheduler().step(sample, 10, sample)


@pytest.mark.parametrize("num_inference_steps", [0, 1001])
def test_set_timesteps_out_of_range_raises_value_error_naming_the_value(num_inference_steps):
    with pytest.raises(ValueError, match=f"got {num_inference_steps}"):
        DPMSolverMultistepScheduler().set_timesteps(num_inference_steps)


@pytest.mark.parametrize("name", OPTIONS)
def test_config_holds_every_diffusers_key_with_the_same_value(name):
    ours, theirs = pair(**OPTIONS[name])
    assert public_config(ours.config) == public_config(theirs.config)


def diffusers_from_config_without_unused_keys(config) -> dict:
    # diffusers also records the keys DPM-Solver has no use for (clip_sample) in the new config; we drop them
    expected = diffusers.DPMSolverMultistepScheduler.from_config(config)
    return {key: value for key, value in public_config(expected.config).items() if key in DPM_DEFAULTS}


@pytest.mark.parametrize("ddpm_config", [{}, {"variance_type": "fixed_large", "beta_schedule": "squaredcos_cap_v2",
                                              "prediction_type": "sample", "timestep_spacing": "trailing"}])
def test_from_config_of_a_saved_ddpm_scheduler_equals_diffusers(ddpm_config, tmp_path):
    # a folder's scheduler_config.json: every key given, so the DDPM timestep_spacing ("leading") carries over
    diffusers.DDPMScheduler(**ddpm_config).save_pretrained(tmp_path)
    loaded = diffusers.DDPMScheduler.from_pretrained(tmp_path).config
    expected = diffusers_from_config_without_unused_keys(loaded)
    ours = DPMSolverMultistepScheduler.from_config(DDPMScheduler(**ddpm_config).config)
    assert public_config(ours.config) == expected
    assert public_config(DPMSolverMultistepScheduler.from_config(loaded).config) == expected


def test_from_config_of_a_diffusers_config_in_memory_leaves_its_defaults_to_dpm_solver():
    # diffusers marks the keys a scheduler left at their defaults, and from_config does not pass them on
    config = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").config
    ours = DPMSolverMultistepScheduler.from_config(config)
    assert ours.config["timestep_spacing"] == "linspace" and ours.config["beta_schedule"] == "squaredcos_cap_v2"
    assert public_config(ours.config) == diffusers_from_config_without_unused_keys(config)


def test_from_config_takes_overrides_as_diffusers():
    config = DDPMScheduler(beta_schedule="squaredcos_cap_v2").config
    ours = DPMSolverMultistepScheduler.from_config(config, solver_order=3, timestep_spacing="trailing")
    theirs = diffusers.DPMSolverMultistepScheduler.from_config(config, solver_order=3, timestep_spacing="trailing")
    assert public_config(ours.config) == {key: value for key, value in public_config(theirs.config).items()
                                          if key in DPM_DEFAULTS}


UNSUPPORTED = {
    "sde_dpmsolver": ({"algorithm_type": "sde-dpmsolver"}, "algorithm_type='sde-dpmsolver'"),
    "order_4": ({"solver_order": 4}, "solver_order=4"),
    "solver_type": ({"solver_type": "bh2"}, "solver_type='bh2'"),
    "beta_sigmas": ({"use_beta_sigmas": True}, "use_beta_sigmas=True"),
    "flow_sigmas": ({"use_flow_sigmas": True}, "use_flow_sigmas=True"),
    "dynamic_shifting": ({"use_dynamic_shifting": True}, "use_dynamic_shifting=True"),
    "learned_variance": ({"variance_type": "learned_range"}, "variance_type='learned_range'"),
    "flow_prediction": ({"prediction_type": "flow_prediction"}, "prediction_type='flow_prediction'"),
    "two_sigma_schedules": ({"use_karras_sigmas": True, "use_lu_lambdas": True}, "at most one of"),
    "dpmsolver_to_zero": ({"algorithm_type": "dpmsolver"}, "final_sigmas_type='zero'"),
    "unknown_key": ({"clip_sample": True}, "unknown config key"),
}


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_option_is_a_one_line_value_error_naming_it(name):
    config, message = UNSUPPORTED[name]
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as error:
        DPMSolverMultistepScheduler(**config)
    assert "\n" not in str(error.value)
