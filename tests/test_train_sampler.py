"""train.py --sampler ddim or dpm: the sample grids come from DDIM (50 steps) or DPM-Solver++ (20 steps), unless
--ddpm_num_inference_steps is given."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.sampling import sample_grid
from oracle import diffusers, single_thread  # noqa: F401  (autouse fixture)
from train_script import train


TINY_UNET = {"block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
             "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1, "norm_num_groups": 8}


# quickstart's DDPM grids take 100 strided steps (docs/quickstart.md); cifar10-32's the paper's 1000
@pytest.mark.parametrize(("flags", "steps"), [([], 100), (["--preset", "cifar10-32"], 1000),
                                              (["--sampler", "ddim"], 50),
                                              (["--sampler", "ddim", "--ddpm_num_inference_steps", "7"], 7),
                                              (["--sampler", "dpm"], 20)])
def test_ddim_grids_take_50_steps_unless_steps_are_given(flags, steps):
    assert train.parse_args(flags).ddpm_num_inference_steps == steps


def train_with_grids_by(sampler: str, tmp_path) -> None:
    """2 steps of a tiny UNet into tmp_path/out, its final grid of 2 images drawn by `sampler` with seed 4."""
    config = tmp_path / "unet.json"
    config.write_text(json.dumps(TINY_UNET))
    train.main(["--model_config_name_or_path", str(config), "--output_dir", str(tmp_path / "out"),
                "--resolution", "8", "--train_batch_size", "4", "--eval_batch_size", "2", "--max_train_steps", "2",
                "--lr_warmup_steps", "1", "--device", "cpu", "--no-use_ema", "--sampler", sampler, "--seed", "4"])


def test_a_ddim_grid_holds_ddim_pipelines_images_of_the_saved_weights(tmp_path):
    train_with_grids_by("ddim", tmp_path)
    pipeline = diffusers.DDIMPipeline.from_pretrained(tmp_path / "out")
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(2, generator=torch.manual_seed(4), output_type="pt").images  # 50 steps
    # the grid (enlarged to 256 px) as torchvision's save_image wrote it: x * 255 + 0.5, clamped, truncated
    expected = sample_grid(images).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    [grid] = (tmp_path / "out" / "samples").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(grid)), expected)


@pytest.mark.parametrize(("sampler", "options"), [
    ("dpm", {}), ("dpm-sde", {"algorithm_type": "sde-dpmsolver++", "timestep_spacing": "trailing"})])
def test_a_dpm_grid_holds_the_images_of_ddpm_pipeline_with_diffusers_dpm_solver(tmp_path, sampler, options):
    train_with_grids_by(sampler, tmp_path)
    pipeline = diffusers.DDPMPipeline.from_pretrained(tmp_path / "out")
    pipeline.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config, **options)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(2, generator=torch.manual_seed(4), num_inference_steps=20, output_type="np").images
    images = torch.from_numpy(images).permute(0, 3, 1, 2)
    expected = sample_grid(images).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    [grid] = (tmp_path / "out" / "samples").glob("*.png")
    assert np.abs(np.asarray(Image.open(grid)).astype(int) - expected).max() <= 1  # float rounding at .5
