"""sample.py --sampler dpm: the grid equals diffusers' DDPMPipeline with DPMSolverMultistepScheduler swapped in
(20 steps unless told), and many-images mode draws image i from its own (seed, i) generator as with ddpm."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import DPMSolverMultistepScheduler, UNet2DModel, generate
from ddpm.sampling import image_generators
from oracle import MICRO, diffusers, diffusers_unet, single_thread  # noqa: F401  (autouse fixture)

REPO = Path(__file__).resolve().parents[1]
SAMPLE_PY = REPO / "sample.py"
SEED = 3


def run_sample(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SAMPLE_PY), *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A DDPMPipeline folder of diffusers' perturbed MICRO UNet, x_0-predicting on the cosine schedule (as the
    quickstart's)."""
    directory = tmp_path_factory.mktemp("model")
    scheduler = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample")
    diffusers.DDPMPipeline(unet=diffusers_unet(MICRO), scheduler=scheduler).save_pretrained(directory)
    return directory


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def test_dpm_grid_equals_ddpm_pipeline_with_the_dpm_solver_and_its_default_20_steps(model_dir, tmp_path):
    result = run_sample(str(model_dir), "--sampler", "dpm", "--num_images", "3", "--seed", str(SEED), "--device", "cpu",
                        "--output", str(tmp_path / "grid.png"), "--outdir", str(tmp_path / "single"))
    assert result.returncode == 0, result.stderr
    pipeline = diffusers.DDPMPipeline.from_pretrained(model_dir)
    pipeline.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(3, generator=torch.manual_seed(SEED), num_inference_steps=20).images
    for i, image in enumerate(expected):
        assert np.array_equal(pixels(tmp_path / "single" / f"{i:04d}.png"), np.asarray(image)), f"image {i}"


def test_dpm_many_images_mode_draws_image_i_from_its_own_generator(model_dir, tmp_path):
    outdir = tmp_path / "samples"
    result = run_sample(str(model_dir), "--sampler", "dpm", "--num_images", "3", "--seed", str(SEED),
                        "--num_inference_steps", "8", "--batch_size", "2", "--device", "cpu", "--outdir", str(outdir))
    assert result.returncode == 0, result.stderr
    settings = json.loads((outdir / "sample_settings.json").read_text())
    assert (settings["sampler"], settings["num_inference_steps"]) == ("dpm", 8)
    unet = UNet2DModel(**MICRO)
    unet.load_state_dict(diffusers.UNet2DModel.from_pretrained(model_dir / "unet").state_dict())
    scheduler = DPMSolverMultistepScheduler.from_config(diffusers.DDPMScheduler.from_pretrained(model_dir / "scheduler")
                                                        .config)
    for i in range(3):
        alone = generate(unet, scheduler, 1, image_generators(SEED, [i]), 8)[0]
        expected = (alone * 255).round().permute(1, 2, 0).numpy().astype(int)
        actual = pixels(outdir / f"{i:06d}.png")
        # a batched forward pass rounds differently from a batch of one: a value may differ by 1/255
        assert np.abs(actual - expected).max() <= 1 and (actual == expected).mean() >= 0.99, f"image {i}"


def test_eta_with_the_dpm_sampler_is_a_one_line_error(tmp_path):
    result = run_sample(str(tmp_path), "--sampler", "dpm", "--eta", "0.5")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("sample.py: error: --eta 0.5 needs --sampler ddim")
