"""train.py --class_conditional: labels reach the loss, the class dropout draws after eps and t from the noise
generator (so an unconditional run's stream is as before), exact resume, DDP, the presets, the output folder
(diffusers' UNet2DModel with class_labels, class_labels.json, a grid with a row per class) and bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import ddpm.train_step as eager_step  # the module whose diffusion_loss the tests replace
from ddpm import DDPMScheduler, UNet2DModel, load_pipeline
from ddpm.class_conditional import conditional_accuracy, generate_for_labels
from ddpm.cuda_graph_step import CudaGraphStep
from ddpm.loss import diffusion_loss
from ddpm.presets import PRESETS
from ddpm.shapes_score import fit
from ddpm.train_args import parse_args
from ddpm.train_step import EagerStep
from ddpm.training_state import rank_seed
from oracle import TINY, diffusers, perturb_, single_thread  # noqa: F401  (autouse fixture)
from test_distributed import TRAIN_PY, tail, torchrun, train_args
from test_train import (TINY_UNET, assert_same_optimizer_state, assert_same_tensors, checkpoint_at, image_folder,
                        run, tiny_args)
from train_script import train

CLASSES = ["dark", "grey", "light"]  # solid images of grey level 0, 120 and 240: the pixels tell the class
LEVEL = 120
NULL = len(CLASSES)


def class_folder(root: Path, per_class: int = 6, size: tuple[int, int] = (8, 8)) -> Path:
    """`per_class` solid PNGs of each class in a subfolder of its own (torchvision ImageFolder's layout): 8x8
    images go to the training device (--device_data), 12x10 ones through a DataLoader."""
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((size[1], size[0], 3), k * LEVEL, dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def class_of_pixels(x0: torch.Tensor) -> torch.Tensor:
    """The class of each solid image of class_folder, from its first pixel in [-1, 1]."""
    return ((x0[:, 0, 0, 0] + 1) / 2 * 255 / LEVEL).round().long()


class RecordedLoss:
    """diffusion_loss, keeping each call's keyword arguments and (x0, noise, timesteps)."""

    def __init__(self):
        self.calls = []

    def __call__(self, unet, scheduler, x0, noise, timesteps, snr_gamma=None, **kwargs):
        self.calls.append((x0.clone(), noise.clone(), timesteps.clone(), kwargs))
        return diffusion_loss(unet, scheduler, x0, noise, timesteps, snr_gamma, **kwargs)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return class_folder(tmp_path_factory.mktemp("classes") / "images")


# -----------------------------------------------------------------------------
# Labels and the random streams


def test_each_image_reaches_the_loss_with_its_label_when_no_label_is_dropped(images, tmp_path, monkeypatch):
    loss = RecordedLoss()
    monkeypatch.setattr(eager_step, "diffusion_loss", loss)
    run(tmp_path, train_data_dir=images, class_conditional=True, class_dropout=0, max_train_steps=4)
    assert len(loss.calls) == 4
    for x0, _, _, kwargs in loss.calls:
        assert torch.equal(kwargs["class_labels"], class_of_pixels(x0))


def test_class_dropout_draws_one_uniform_per_label_from_the_noise_generator_after_eps_and_t(images, tmp_path,
                                                                                           monkeypatch):
    loss = RecordedLoss()
    monkeypatch.setattr(eager_step, "diffusion_loss", loss)
    run(tmp_path, train_data_dir=images, class_conditional=True, class_dropout=0.5, max_train_steps=6)
    generator = torch.Generator().manual_seed(rank_seed("noise", 0, 0))  # train.py's, rank 0, --seed 0
    dropped = 0
    for x0, noise, timesteps, kwargs in loss.calls:
        assert torch.equal(noise, torch.randn(x0.shape, generator=generator))  # Algorithm 1, line 4
        assert torch.equal(timesteps, torch.randint(0, 1000, (len(x0),), generator=generator))  # line 3
        drop = torch.rand(len(x0), generator=generator) < 0.5  # Ho & Salimans 2022, Algorithm 1, line 3
        assert torch.equal(kwargs["class_labels"], torch.where(drop, NULL, class_of_pixels(x0)))
        dropped += int(drop.sum())
    assert 0 < dropped < 6 * 4  # some labels dropped, not all


def test_an_unconditional_run_draws_eps_and_t_only_and_calls_the_loss_without_labels(tmp_path, monkeypatch):
    loss = RecordedLoss()
    monkeypatch.setattr(eager_step, "diffusion_loss", loss)
    out = run(tmp_path, max_train_steps=3, checkpointing_steps=3)
    generator = torch.Generator().manual_seed(rank_seed("noise", 0, 0))
    for x0, noise, timesteps, kwargs in loss.calls:
        assert kwargs == {}
        assert torch.equal(noise, torch.randn(x0.shape, generator=generator))
        assert torch.equal(timesteps, torch.randint(0, 1000, (len(x0),), generator=generator))
    # nothing else drew from the generator: its state after the run is the one after those draws
    assert torch.equal(checkpoint_at(out, 3)["rng"][0]["noise_generator"], generator.get_state())


def test_the_uncaptured_graph_step_with_labels_equals_the_eager_step_bit_for_bit():
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1, torch.randn(2, 3, 8, 8, generator=generator),
                torch.randint(0, 1000, (2,), generator=generator), torch.randint(0, 4, (2,), generator=generator))
               for _ in range(4)]
    results = []
    for graphed in (False, True):
        torch.manual_seed(0)
        unet = perturb_(UNet2DModel(**TINY, num_class_embeds=4)).train()
        table = unet.class_embedding.weight.detach().clone()
        # capturable both, and a learning rate a float32 tensor holds exactly, as the graph step's tensor does
        optimizer = torch.optim.AdamW(unet.parameters(), lr=2**-8, fused=True, capturable=True)
        step = (CudaGraphStep(unet, unet, DDPMScheduler(), optimizer, None, None, None, 1.0, torch.device("cpu"))
                if graphed else EagerStep(unet, unet, DDPMScheduler(), optimizer,
                                          torch.amp.GradScaler("cpu", enabled=False), None, None, None, 1.0, 1,
                                          torch.device("cpu")))
        for number, (x0, noise, timesteps, labels) in enumerate(batches):
            step.accumulate(x0, noise, timesteps, labels)
            step.update(number + 1)
        results.append(unet.state_dict())
    assert_same_tensors(*results)
    assert not torch.equal(results[0]["class_embedding.weight"], table)  # the labels reached the class table


# -----------------------------------------------------------------------------
# Resume, DDP, presets


@pytest.mark.parametrize("size, on_the_device", [((12, 10), False), ((8, 8), True)], ids=["dataloader", "device_data"])
def test_a_stopped_and_resumed_conditional_run_equals_the_uninterrupted_run_bit_for_bit(size, on_the_device,
                                                                                       tmp_path, capsys):
    # 18 images in batches of 4, 2 accumulation steps: the resume point (6 batches) lies inside the second epoch
    options = dict(model={**TINY_UNET, "dropout": 0.1}, use_ema=True, random_flip=True, class_conditional=True,
                   class_dropout=0.3, train_data_dir=class_folder(tmp_path / "images", 6, size),
                   gradient_accumulation_steps=2, max_train_steps=6, checkpointing_steps=3, save_images_epochs=1)
    uninterrupted = run(tmp_path, output_dir=tmp_path / "uninterrupted", **options)
    assert ("one uint8 tensor on cpu" in capsys.readouterr().out) == on_the_device
    resumed = tmp_path / "resumed"
    shutil.copytree(uninterrupted / "checkpoint-3", resumed / "checkpoint-3")
    run(tmp_path, output_dir=resumed, resume_from_checkpoint="latest", **options)

    a, b = checkpoint_at(uninterrupted, 6), checkpoint_at(resumed, 6)
    assert "class_embedding.weight" in a["model"]
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["ema"], b["ema"])
    assert_same_optimizer_state(a["optimizer"], b["optimizer"])
    assert_same_tensors(a["rng"][0], b["rng"][0])
    assert {**a["state"], "args": None} == {**b["state"], "args": None}


def test_a_two_process_conditional_run_resumes_bit_for_bit_and_writes_the_class_names(images, tmp_path):
    config = tmp_path / "unet.json"
    config.write_text(json.dumps(TINY_UNET))
    common = ("--train_data_dir", str(images), "--class_conditional", "--max_train_steps", "4",
              "--checkpointing_steps", "2", "--use_ema")
    uninterrupted = tmp_path / "uninterrupted"
    result = torchrun(TRAIN_PY, *train_args(config, uninterrupted, *common))
    assert result.returncode == 0, tail(result.stdout)
    assert json.loads((uninterrupted / "class_labels.json").read_text()) == {str(k): n for k, n in enumerate(CLASSES)}
    resumed = tmp_path / "resumed"
    shutil.copytree(uninterrupted / "checkpoint-2", resumed / "checkpoint-2")
    result = torchrun(TRAIN_PY, *train_args(config, resumed, *common, "--resume_from_checkpoint", "latest"))
    assert result.returncode == 0, tail(result.stdout)
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_tensors(load_file(resumed / "checkpoint-4" / name),
                            load_file(uninterrupted / "checkpoint-4" / name))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_takes_class_conditional_and_keeps_its_unet(preset):
    args = parse_args(["--preset", preset, "--class_conditional", "--builtin_data", "--device", "cpu"])
    assert args.class_conditional and args.class_dropout == 0.1 and args.label_column == "label"
    assert "num_class_embeds" not in args.model_config  # given by the data's classes when the run starts


def test_the_quickstart_trains_conditionally_on_the_24_builtin_classes(tmp_path):
    out = run(tmp_path, class_conditional=True, max_train_steps=1, eval_batch_size=1)
    names = json.loads((out / "class_labels.json").read_text())
    assert len(names) == 24 and names["0"] == "circle-red-white"
    assert json.loads((out / "unet" / "config.json").read_text())["num_class_embeds"] == 25


def test_the_final_score_of_a_builtin_run_adds_the_conditional_accuracy_of_samples_balanced_over_classes(tmp_path,
                                                                                                         capsys):
    out = run(tmp_path, class_conditional=True, max_train_steps=1, eval_batch_size=1, score_images=5,
              guidance_scale=3)
    unet, scheduler = load_pipeline(out)  # the final weights (no EMA), those the score sampled
    labels = torch.arange(5) % 24  # sample i of class i mod 24, noise of seed + 1, as the grid's steps and scale
    samples = generate_for_labels(unet, scheduler, labels, torch.Generator().manual_seed(1), 2, 3.0)
    accuracy = conditional_accuracy(fit(samples).classes, labels)
    assert f"conditional accuracy {accuracy:.3f} (guidance scale 3)" in capsys.readouterr().out.splitlines()[-1]
    assert f"| shapes score: conditional accuracy of 5 samples | {accuracy:.4g} |" in (out / "README.md").read_text()


# -----------------------------------------------------------------------------
# The output folder


@pytest.fixture(scope="module")
def finished_run(images, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("conditional_run")
    train.main(tiny_args(tmp, train_data_dir=images, class_conditional=True, max_train_steps=2, eval_batch_size=4,
                         guidance_scale=2))
    return tmp / "out"


def test_the_folder_names_its_classes_in_label_order(finished_run):
    assert json.loads((finished_run / "class_labels.json").read_text()) == {str(k): n for k, n in enumerate(CLASSES)}
    assert json.loads((finished_run / "unet" / "config.json").read_text())["num_class_embeds"] == len(CLASSES) + 1


def test_a_finished_run_whose_class_names_were_deleted_writes_them_again_when_started_again(images, tmp_path):
    argv = tiny_args(tmp_path, train_data_dir=images, class_conditional=True, max_train_steps=2, eval_batch_size=4,
                     checkpointing_steps=2, resume_from_checkpoint="latest")
    train.main(argv)
    names = tmp_path / "out" / "class_labels.json"
    written = names.read_bytes()
    names.unlink()  # by hand, after the run ended: the rest of the pipeline is there
    train.main(argv)
    assert names.read_bytes() == written


def test_the_folders_unet_loads_in_diffusers_and_gives_our_outputs_for_class_labels(finished_run):
    theirs = diffusers.UNet2DModel.from_pretrained(finished_run / "unet").eval()
    ours, _ = load_pipeline(finished_run)
    x, t = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 300, 600, 999])
    labels = torch.tensor([0, 1, 2, NULL])
    with torch.no_grad():
        expected = theirs(x, t, class_labels=labels).sample
        assert torch.allclose(ours(x, t, labels), expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(ours(x, t, torch.tensor([1, 2, 0, 0])), expected, rtol=1e-5, atol=1e-6)


def test_the_sample_grid_has_a_row_per_class_each_as_long_as_a_row_of_the_square_grid(finished_run):
    grid = Image.open(finished_run / "samples" / "0000.png")
    # --eval_batch_size 4: rows of 2 tiles of 8 px with 2 px padding, enlarged until the short side is >= 256 px
    width, height = 2 * 10 + 2, len(CLASSES) * 10 + 2
    factor = -(-256 // min(width, height))
    assert grid.size == (width * factor, height * factor)


def test_the_model_card_names_the_classes_and_how_to_sample_a_class(finished_run):
    card = (finished_run / "README.md").read_text()
    assert "class-conditional" in card and "0 `dark`, 1 `grey`, 2 `light`" in card
    assert "--class_label 0 --guidance_scale 2" in card and "class_labels=labels" in card
    assert "diffusers:DDPMPipeline" not in card  # DDPMPipeline cannot pass the labels


# -----------------------------------------------------------------------------
# Bad input: one line


def one_line_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit:
        train.main(argv)
    if exit.value.code == 2:  # argparse's: the usage, then the one line
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err.strip().splitlines()[-1]
    message = str(exit.value.code)
    assert message.startswith("train.py: error:") and "\n" not in message
    return message


def test_a_folder_without_class_subfolders_is_a_one_line_error(tmp_path, capsys):
    folder = image_folder(tmp_path / "flat", 8, (8, 8))
    assert "no class" in one_line_error(tiny_args(tmp_path, train_data_dir=folder, class_conditional=True), capsys)


def test_a_model_config_with_a_class_table_needs_class_conditional(tmp_path, capsys):
    message = one_line_error(tiny_args(tmp_path, model={**TINY_UNET, "num_class_embeds": 4}), capsys)
    assert "num_class_embeds 4" in message and "--class_conditional" in message


def test_a_class_table_of_another_size_than_the_datas_classes_is_a_one_line_error(images, tmp_path, capsys):
    message = one_line_error(tiny_args(tmp_path, model={**TINY_UNET, "num_class_embeds": 7}, train_data_dir=images,
                                       class_conditional=True), capsys)
    assert "num_class_embeds 7" in message and "3 classes" in message


@pytest.mark.parametrize("flag, value", [("class_dropout", 1.5), ("class_dropout", -0.1), ("guidance_scale", -1)])
def test_a_class_dropout_outside_zero_one_or_a_negative_guidance_scale_is_a_one_line_error(flag, value, tmp_path,
                                                                                          capsys):
    message = one_line_error(tiny_args(tmp_path, class_conditional=True, **{flag: value}), capsys)
    assert f"--{flag}" in message and str(value) in message


def test_fid_during_a_conditional_run_is_refused_in_one_line(tmp_path, capsys):
    message = one_line_error(tiny_args(tmp_path, class_conditional=True, eval_fid_images=4), capsys)
    assert "--eval_fid_images does not sample a class-conditional model" in message


@pytest.mark.parametrize("first, then", [(False, True), (True, False)], ids=["unconditional", "conditional"])
def test_resuming_with_the_other_class_conditional_setting_is_a_one_line_error(images, first, then, tmp_path,
                                                                              capsys):
    run(tmp_path, train_data_dir=images, class_conditional=first or None, max_train_steps=2, checkpointing_steps=2)
    message = one_line_error(tiny_args(tmp_path, train_data_dir=images, class_conditional=then or None,
                                       max_train_steps=4, resume_from_checkpoint="latest"), capsys)
    assert "--class_conditional" in message and "checkpoint-2" in message
