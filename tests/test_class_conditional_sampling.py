"""Sampling a class-conditional model: guided DDIM and DPM-Solver++ steps against diffusers' schedulers guided by hand,
ddpm/class_conditional.py's batches and grid, sample.py --class_label/--guidance_scale in grid and many-images mode,
and the model card's diffusers code giving sample.py's pixels."""

from __future__ import annotations  # the diffusers annotations below are not evaluated

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel, generate, save_pipeline
from ddpm.class_conditional import balanced_labels, generate_for_labels, grid_labels, images_per_class
from ddpm.guidance import GuidedUNet
from ddpm.model_card import write_model_card
from ddpm.sampling import image_generators, sample_grid, sampling_scheduler
from ddpm.train_args import parse_args
from oracle import MICRO, diffusers, measured, micro_unets, single_thread  # noqa: F401  (autouse fixture)
from test_sample_script import run_sample

CLASSES = ["cat", "dog", "owl"]
NULL = len(CLASSES)
STEPS = 4


@pytest.fixture(scope="module")
def unets() -> tuple[UNet2DModel, diffusers.UNet2DModel]:
    """Ours and diffusers' class-conditional MICRO model, holding the same (perturbed) weights."""
    return micro_unets(num_class_embeds=len(CLASSES) + 1)


@pytest.fixture(scope="module")
def folder(unets, tmp_path_factory) -> Path:
    """Our class-conditional model saved as train.py saves it: the pipeline and class_labels.json."""
    path = tmp_path_factory.mktemp("conditional") / "model"
    save_pipeline(path, unets[0], DDPMScheduler(), CLASSES)
    return path


def guided_loop_in_diffusers(unet: diffusers.UNet2DModel, scheduler, labels: torch.Tensor, scale: float, seed: int,
                             steps: int) -> torch.Tensor:
    """DDPMPipeline's loop (DDIMPipeline's with eta 0), eps_uncond + s (eps_cond - eps_uncond) from two calls."""
    generator = torch.manual_seed(seed)
    x = diffusers.utils.torch_utils.randn_tensor((len(labels), 3, 8, 8), generator=generator)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            conditional = unet(x, t, class_labels=labels).sample
            unconditional = unet(x, t, class_labels=torch.full_like(labels, NULL)).sample
            eps = unconditional + scale * (conditional - unconditional)
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_guided_ddim_and_dpm_solver_sampling_equals_diffusers_schedulers_guided_by_hand(unets, sampler, scale):
    ours, theirs = unets
    labels = torch.tensor([2, 0])
    theirs_scheduler = {"ddim": diffusers.DDIMScheduler, "dpm": diffusers.DPMSolverMultistepScheduler}[sampler]()
    expected = guided_loop_in_diffusers(theirs, theirs_scheduler, labels, scale, 4, 6)
    scheduler = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}[sampler]()
    actual = generate_for_labels(ours, scheduler, labels, torch.manual_seed(4), 6, scale)
    assert measured(f"guided {sampler} s={scale} max abs diff", (actual - expected).abs().max().item()) <= 1e-4


def test_batches_draw_from_one_generator_in_turn_as_one_call_per_batch(unets):
    ours, _ = unets
    labels, generator = torch.tensor([0, 1, 2, 1, 0]), torch.Generator().manual_seed(2)
    expected = torch.cat([generate(GuidedUNet(ours, labels[:2], 2.0), DDPMScheduler(), 2, generator, STEPS),
                          generate(GuidedUNet(ours, labels[2:4], 2.0), DDPMScheduler(), 2, generator, STEPS),
                          generate(GuidedUNet(ours, labels[4:], 2.0), DDPMScheduler(), 1, generator, STEPS)])
    actual = generate_for_labels(ours, DDPMScheduler(), labels, torch.Generator().manual_seed(2), STEPS, 2.0,
                                 batch_size=2)
    assert torch.equal(actual, expected)


def test_a_generator_per_image_makes_each_image_independent_of_the_batch(unets):
    ours, _ = unets
    labels = torch.tensor([2, 0, 1])
    together = generate_for_labels(ours, DDPMScheduler(), labels, image_generators(5, [0, 1, 2]), STEPS, 2.0)
    alone = generate_for_labels(ours, DDPMScheduler(), labels[1:2], image_generators(5, [1]), STEPS, 2.0)
    assert (together[1] - alone[0]).abs().max() <= 1e-5


def test_balanced_labels_cycle_through_the_classes_by_image_index():
    assert balanced_labels(range(5, 12), 3).tolist() == [2, 0, 1, 2, 0, 1, 2]
    assert grid_labels(3, 2).tolist() == [0, 0, 1, 1, 2, 2]
    assert [images_per_class(n) for n in (1, 4, 16, 17)] == [1, 2, 4, 5]


def test_the_class_grid_puts_each_class_on_a_row_of_its_own():
    images = torch.stack([torch.full((3, 8, 8), k / 2) for k in range(3) for _ in range(4)])  # class k: grey k / 2
    grid = sample_grid(images, min_side=1, per_row=4)
    assert grid.shape == (3, 3 * 10 + 2, 4 * 10 + 2)
    for k in range(3):
        row = grid[:, 2 + 10 * k:10 + 10 * k, 2:-2]
        assert torch.all((row == k / 2) | (row == 0))  # the tiles of class k, and the padding between them


# -----------------------------------------------------------------------------
# sample.py


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def as_pixels(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] as sample.py writes them: (x * 255).round() as uint8, (N, H, W, 3)."""
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy().astype(np.int16)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm"])
def test_sample_py_draws_the_class_asked_for_by_name_with_every_sampler(folder, unets, sampler, tmp_path):
    result = run_sample(str(folder), "--class_label", "owl", "--guidance_scale", "2.5", "--sampler", sampler,
                        "--num_images", "3", "--num_inference_steps", str(STEPS), "--seed", "7", "--device", "cpu",
                        "--output", str(tmp_path / "grid.png"), "--outdir", str(tmp_path / "single"))
    assert result.returncode == 0, result.stderr
    scheduler = sampling_scheduler(sampler, DDPMScheduler().config)
    expected = generate(GuidedUNet(unets[0], 2, 2.5), scheduler, 3, torch.manual_seed(7), STEPS)
    found = np.stack([png(tmp_path / "single" / f"{i:04d}.png") for i in range(3)])
    assert np.abs(found - as_pixels(expected)).max() <= 1


def test_sample_py_without_a_label_draws_a_grid_with_a_row_per_class(folder, unets, tmp_path):
    result = run_sample(str(folder), "--num_images", "4", "--num_inference_steps", str(STEPS), "--seed", "1",
                        "--device", "cpu", "--output", str(tmp_path / "grid.png"), "--outdir", str(tmp_path / "one"))
    assert result.returncode == 0, result.stderr
    labels = grid_labels(len(CLASSES), 2)  # --num_images 4: rows of 2, as the square grid of 4
    expected = generate(GuidedUNet(unets[0], labels, 1.0), DDPMScheduler(), len(labels), torch.manual_seed(1),
                        STEPS)
    found = np.stack([png(tmp_path / "one" / f"{i:04d}.png") for i in range(len(labels))])
    assert np.abs(found - as_pixels(expected)).max() <= 1
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size[0] * (len(CLASSES) * 10 + 2) == grid.size[1] * (2 * 10 + 2)  # 3 rows of 2 tiles


@pytest.mark.parametrize("label", [None, "1"], ids=["balanced", "one class"])
def test_many_images_mode_gives_image_i_its_own_noise_and_class(folder, unets, label, tmp_path):
    given = ["--class_label", label] if label else []
    result = run_sample(str(folder), *given, "--guidance_scale", "2", "--num_images", "5", "--batch_size", "2",
                        "--num_inference_steps", str(STEPS), "--seed", "3", "--device", "cpu",
                        "--outdir", str(tmp_path / "many"))
    assert result.returncode == 0, result.stderr
    for i in range(5):
        cls = int(label) if label else i % len(CLASSES)
        expected = generate(GuidedUNet(unets[0], cls, 2.0), DDPMScheduler(), 1, image_generators(3, [i]), STEPS)
        assert np.abs(png(tmp_path / "many" / f"{i:06d}.png") - as_pixels(expected)[0]).max() <= 1


def test_sample_py_refuses_a_folder_of_other_guidance_settings_in_many_images_mode(folder, tmp_path):
    common = ["--num_images", "1", "--num_inference_steps", "1", "--device", "cpu", "--outdir", str(tmp_path / "d")]
    assert run_sample(str(folder), *common, "--guidance_scale", "2").returncode == 0
    result = run_sample(str(folder), *common, "--guidance_scale", "3")
    assert result.returncode != 0 and "other settings" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--class_label", "horse"], "no class 'horse': give a name or a number of 0 cat, 1 dog, 2 owl"),
    (["--class_label", "3"], "no class '3'"),
    (["--guidance_scale", "-1"], "--guidance_scale must be >= 0"),
], ids=["unknown name", "the null label", "negative scale"])
def test_a_bad_class_or_scale_is_a_one_line_error(folder, args, message, tmp_path):
    result = run_sample(str(folder), *args, "--device", "cpu", "--output", str(tmp_path / "g.png"))
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_a_class_label_for_an_unconditional_model_is_a_one_line_error(tmp_path):
    save_pipeline(tmp_path / "plain", UNet2DModel(**MICRO), DDPMScheduler())
    result = run_sample(str(tmp_path / "plain"), "--class_label", "0", "--device", "cpu")
    assert result.returncode != 0 and "needs a class-conditional model" in result.stderr
    assert "Traceback" not in result.stderr


# -----------------------------------------------------------------------------
# The model card's code


def test_the_model_cards_diffusers_code_gives_the_pixels_of_its_sample_py_command(folder, tmp_path):
    args = parse_args(["--device", "cpu", "--resolution", "8", "--ddpm_num_inference_steps", str(STEPS),
                       "--class_conditional"])
    card = write_model_card(folder, args, data="test", world_size=1, step=1, total_steps=1, loss=None,
                            class_names=CLASSES).read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S)[1]
    namespace = {}
    exec(code, namespace)  # the card's own lines, run with diffusers
    command = re.search(r"python sample\.py (.*--class_label .*)", card)[1].split()
    assert command[0] == str(folder) and command[-2] == "--output"
    result = run_sample(*command[:-1], str(tmp_path / "grid.png"), "--device", "cpu",
                        "--outdir", str(tmp_path / "single"))
    assert result.returncode == 0, result.stderr
    found = np.stack([png(tmp_path / "single" / f"{i:04d}.png") for i in range(16)])
    assert np.abs(found - as_pixels(namespace["images"])).max() <= 1
    (folder / "README.md").unlink()
