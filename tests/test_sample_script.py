from __future__ import annotations  # the diffusers annotations below are not evaluated

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oracle import diffusers

SAMPLE_PY = Path(__file__).resolve().parents[1] / "sample.py"
SEED, STEPS = 3, 5


def run_sample(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SAMPLE_PY), *args], capture_output=True, text=True, env=env,
                          timeout=300)


def tiny_pipeline(channels: int) -> diffusers.DDPMPipeline:
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    # away from the initialisation, so a wrong weight mapping would show in the pixels
    with torch.no_grad():
        for param in unet.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=1000))


def diffusers_images(pipeline: diffusers.DDPMPipeline, batch_size: int) -> list[Image.Image]:
    return pipeline(batch_size=batch_size, generator=torch.manual_seed(SEED), num_inference_steps=STEPS).images


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory):
    """sample.py run once on a saved RGB pipeline: (pipeline, output folder, process)."""
    tmp = tmp_path_factory.mktemp("rgb")
    pipeline = tiny_pipeline(channels=3)
    pipeline.save_pretrained(tmp / "model")
    result = run_sample(str(tmp / "model"), "--num_images", "4", "--seed", str(SEED), "--num_inference_steps",
                        str(STEPS), "--device", "cpu", "--output", str(tmp / "grid.png"),
                        "--outdir", str(tmp / "single"))
    assert result.returncode == 0, result.stderr
    return pipeline, tmp, result


def test_single_images_equal_ddpm_pipeline_pixel_for_pixel(rgb_run):
    pipeline, tmp, _ = rgb_run
    expected = diffusers_images(pipeline, batch_size=4)
    assert sorted(p.name for p in (tmp / "single").iterdir()) == ["0000.png", "0001.png", "0002.png", "0003.png"]
    for i, image in enumerate(expected):
        ours = Image.open(tmp / "single" / f"{i:04d}.png")
        assert ours.mode == image.mode == "RGB"
        assert np.array_equal(np.asarray(ours), np.asarray(image)), f"image {i}"


def test_grid_has_ceil_sqrt_columns_of_the_images(rgb_run):
    _, tmp, _ = rgb_run
    grid = np.asarray(Image.open(tmp / "grid.png"))
    # make_grid: 2 x 2 tiles of 8 px with 2 px padding around each, 22 px, enlarged 12x to reach 256 px
    assert grid.shape == (264, 264, 3)
    bottom_right = np.asarray(Image.open(tmp / "single" / "0003.png"))
    assert np.array_equal(grid[12 * 12:20 * 12, 12 * 12:20 * 12], bottom_right.repeat(12, 0).repeat(12, 1))


def test_first_batch_equals_ddpm_pipeline_of_that_batch_size_grayscale(tmp_path):
    # batches come one after another from one generator seeded once
    pipeline = tiny_pipeline(channels=1)
    pipeline.save_pretrained(tmp_path / "model")
    result = run_sample(str(tmp_path / "model"), "--num_images", "4", "--batch_size", "3", "--seed", str(SEED),
                        "--num_inference_steps", str(STEPS), "--output", str(tmp_path / "grid.png"),
                        "--outdir", str(tmp_path / "single"))
    assert result.returncode == 0, result.stderr
    for i, image in enumerate(diffusers_images(pipeline, batch_size=3)):
        ours = Image.open(tmp_path / "single" / f"{i:04d}.png")
        assert ours.mode == image.mode == "L"
        assert np.array_equal(np.asarray(ours), np.asarray(image)), f"image {i}"
    assert (tmp_path / "single" / "0003.png").exists()
    assert Image.open(tmp_path / "grid.png").size == (264, 264)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_missing_model_dir_is_a_one_line_error(tmp_path):
    line = one_line_error(run_sample(str(tmp_path / "no" / "such_model"), "--output", str(tmp_path / "g.png")))
    assert line.startswith("sample.py: error:") and "such_model" in line and "does not exist" in line


def test_hub_repo_that_cannot_be_downloaded_is_a_one_line_error(tmp_path):
    line = one_line_error(run_sample("nobody-xyz/no-such-ddpm", "--output", str(tmp_path / "g.png")))
    assert "could not download 'nobody-xyz/no-such-ddpm' from the Hugging Face Hub" in line


@pytest.mark.parametrize("flags", [["--num_images", "0"], ["--device", "tpu"], ["--output", "grid.unknown"]])
def test_bad_flags_are_rejected_without_traceback(tmp_path, flags):
    result = run_sample(str(tmp_path), *flags)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("sample.py: error:")


def test_help_documents_every_flag_with_its_default():
    result = run_sample("--help")
    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())
    for flag, default in [("--num_images", "16"), ("--seed", "0"), ("--num_inference_steps", "1000"),
                          ("--batch_size", "num_images"), ("--device", "cuda if available"),
                          ("--output", "grid.png"), ("--outdir", "no single images")]:
        assert flag in help_text
        assert f"(default: {default}" in help_text, flag
