"""Shared pieces of the oracle tests, which compare ddpm with diffusers itself.

Tiny UNet configs, diffusers-built reference models with weights moved away from their
initial values, and the measurements the tests assert on. Run `pytest -s` to see every
measured difference printed as `[oracle] <what>: <value>`.
"""

from __future__ import annotations  # annotations naming diffusers' classes are not evaluated: no import for them

import importlib
from pathlib import Path
from typing import Any

import pytest
import torch

from ddpm import UNet2DModel


class ImportedAtFirstUse:
    """The module `name`, imported when a test first reads one of its attributes: where it is not installed, that
    test is skipped (pytest.importorskip), or the whole file if it reads it while being collected. So a machine
    without diffusers (a GPU lease) collects and runs every test that does not compare with it."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("_"):  # pytest's and Python's own probes (_pytestfixturefunction, __wrapped__...)
            raise AttributeError(attribute)
        module = pytest.importorskip(self.name)
        try:
            return getattr(module, attribute)
        except AttributeError:  # a submodule not imported yet: diffusers.training_utils
            return importlib.import_module(f"{self.name}.{attribute}")


diffusers = ImportedAtFirstUse("diffusers")

TINY = dict(
    sample_size=8,
    block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
)

# The diffusers training tutorial's model (128x128, 113,673,219 parameters).
TUTORIAL = dict(
    sample_size=128,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
)
# The same block types with channels small enough for a CPU test.
TUTORIAL_LAYOUT = dict(TUTORIAL, sample_size=32, block_out_channels=(16, 16, 32, 32, 64, 64), norm_num_groups=8)

# google/ddpm-cifar10-32 (35,746,307 parameters).
CIFAR10 = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_eps=1e-6,
    norm_num_groups=32,
    mid_block_scale_factor=1,
)
CIFAR10_LAYOUT = dict(CIFAR10, sample_size=16, block_out_channels=(16, 32, 32, 32), norm_num_groups=8)

# Every layout and option of UNet2DModel that ddpm supports, each small enough for a CPU test.
FORWARD_CONFIGS = {
    "tiny": TINY,
    "tutorial_layout": TUTORIAL_LAYOUT,
    "cifar10_layout": CIFAR10_LAYOUT,
    "no_mid_block_attention": dict(TINY, add_attention=False),
    "two_layers_per_block": dict(TINY, layers_per_block=2),
    "sixteen_heads": dict(TINY, block_out_channels=(32, 64), attention_head_dim=4),
    "attention_in_first_block": dict(
        TINY,
        block_out_channels=(16, 32, 32),
        down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
        attention_head_dim=None,
    ),
    "center_input_sample": dict(TINY, center_input_sample=True),
    "one_channel": dict(TINY, in_channels=1, out_channels=1),
    "dropout_in_eval_mode": dict(TINY, dropout=0.1),
    "mid_block_scale_factor": dict(TINY, mid_block_scale_factor=2),
    "no_mid_block": dict(TINY, mid_block_type=None),
    "attn_norm_num_groups": dict(TINY, attn_norm_num_groups=4),
    "time_embedding_dim": dict(TINY, time_embedding_dim=48),
    "num_train_timesteps_recorded": dict(TINY, num_train_timesteps=1000),
}

# Small enough that 1000 sampling steps take seconds.
MICRO = dict(TINY, block_out_channels=(8, 16), norm_num_groups=4)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The models here are tiny: on a shared CPU, extra threads cost far more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> torch.nn.Module:
    """Add scale * N(0, 1) to every parameter, so layers initialised to zero cannot hide a bug."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model


def diffusers_unet(config: dict, seed: int = 0) -> diffusers.UNet2DModel:
    """diffusers' own UNet2DModel for `config`, perturbed away from its init, in eval mode."""
    torch.manual_seed(seed)
    return perturb_(diffusers.UNet2DModel(**config), seed).eval()


def micro_unets(**config) -> tuple[UNet2DModel, diffusers.UNet2DModel]:
    """Ours (in eval mode) and diffusers' perturbed MICRO model (with `config`'s keys changed), holding the same
    weights."""
    theirs = diffusers_unet(dict(MICRO, **config))
    ours = UNet2DModel(**dict(MICRO, **config))
    ours.load_state_dict(theirs.state_dict())
    return ours.eval(), theirs


def save_diffusers_pipeline(directory: Path, unet: diffusers.UNet2DModel, **scheduler_config) -> None:
    """Write the folder that `DDPMPipeline(unet, DDPMScheduler(**scheduler_config)).save_pretrained` writes."""
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**scheduler_config)).save_pretrained(directory)


def plain(value: Any) -> Any:
    """Tuples as lists, recursively, the way a config looks after a JSON round trip."""
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return value


def public_config(config) -> dict:
    """A config without diffusers' bookkeeping keys (`_class_name`, `_diffusers_version`, ...)."""
    return {key: plain(value) for key, value in dict(config).items() if not key.startswith("_")}


def max_abs_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    return max_abs_diff(actual, expected) / expected.double().abs().max().item()


def measured(what: str, value: float) -> float:
    """Print a measured difference (visible with `pytest -s`) and return it for the assertion."""
    print(f"[oracle] {what}: {value:.3g}")
    return value


# Noise schedules both schedulers' oracle tests run through (test_scheduler.py, test_ddim.py)
TRAINED_BETAS = (torch.linspace(0.01, 0.2, 100) ** 2).tolist()
SCHEDULES = {
    "linear": {},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
    "trained_betas": {"num_train_timesteps": 100, "trained_betas": TRAINED_BETAS},
}


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def step_worst_difference(ours, theirs, timesteps, shape=(2, 3, 8, 8), seed=0, as_int=False, **step) -> float:
    """Step our scheduler and diffusers' through `timesteps` from the same x_t, model outputs and noise seed.

    Each step starts from diffusers' x_t, so one step's error is not carried into the next; `step` holds extra
    arguments of both step methods. Returns the largest |ours - diffusers| over all steps.
    """
    sample = 1.5 * randn(*shape, seed=seed)
    model_outputs = torch.Generator().manual_seed(seed + 1)
    noise_ours, noise_theirs = torch.Generator().manual_seed(seed + 2), torch.Generator().manual_seed(seed + 2)
    worst = 0.0
    for t in timesteps:
        model_output = 1.5 * torch.randn(shape, generator=model_outputs)
        expected = theirs.step(model_output, t, sample, generator=noise_theirs, **step).prev_sample
        actual = ours.step(model_output, int(t) if as_int else t, sample, generator=noise_ours, **step)
        assert type(actual) is torch.Tensor and actual.shape == expected.shape and actual.dtype == expected.dtype
        worst = max(worst, max_abs_diff(actual, expected))
        sample = expected
    return worst
