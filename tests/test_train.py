"""train.py as a user runs it: each test trains a tiny UNet for a few steps on the CPU.

Most runs call train.main(argv) in this process (a subprocess spends seconds importing torch);
the SIGTERM test and one error test run `python train.py` to see what the user sees.
"""

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ddpm.checkpoint
import ddpm.time_budget
import ddpm.train_step as eager_step  # the module whose diffusion_loss the tests replace
from ddpm import DDPMScheduler, UNet2DModel, generate, load_pipeline
from ddpm.checkpoint import list_checkpoints, load_checkpoint
from ddpm.loss import diffusion_loss, training_target
from ddpm.presets import PRESETS
from ddpm.train_args import build_parser
from oracle import diffusers, perturb_, single_thread  # noqa: F401  (autouse fixture)
from test_idx import random_images, write_idx
from train_script import TRAIN_PY, own_signal_handlers, train


# Two levels, so any even resolution works; sample_size comes from --resolution.
TINY_UNET = {
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
}


def tiny_args(tmp_path: Path, model: dict | None = None, **options) -> list[str]:
    """argv for a tiny CPU run writing to tmp_path/out, without EMA; `options` add or override flags
    (True: a bare flag, False: its --no- form, None: left out)."""
    config = tmp_path / "unet.json"
    config.write_text(json.dumps(TINY_UNET if model is None else model))
    options = {"model_config_name_or_path": config, "output_dir": tmp_path / "out", "resolution": 8,
               "train_batch_size": 4, "eval_batch_size": 2, "ddpm_num_inference_steps": 2, "lr_warmup_steps": 1,
               "max_train_steps": 2, "device": "cpu", "use_ema": False, "score_images": 0, **options}
    argv = []
    for name, value in options.items():
        if value is None:  # not passed: the preset's value, or the flag's default
            continue
        if value is True or value is False:  # a bare flag, or its --no- form
            argv.append(f"--{name}" if value else f"--no-{name}")
        else:
            argv += [f"--{name}", str(value)]
    return argv


def run(tmp_path: Path, **options) -> Path:
    """Train in this process; returns the output folder."""
    train.main(tiny_args(tmp_path, **options))
    return Path(options.get("output_dir", tmp_path / "out"))


def image_folder(path: Path, count: int, size: tuple[int, int] = (12, 10)) -> Path:
    """`count` random RGB PNGs of size (width, height): 12x10 are resized to 9x8 and randomly cropped to 8x8 by
    training, on the host; 8x8 need no crop and go to the training device (--device_data)."""
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path / f"{i:03d}.png")
    return path


ON_THE_DEVICE = "one uint8 tensor on cpu: batches drawn there"


def loss_on_call(number: int, change):
    """A diffusion_loss whose `number`-th call (1-based) returns change(loss) instead of loss."""
    calls = []

    def patched(*args):
        loss = diffusion_loss(*args)
        calls.append(1)
        return change(loss) if len(calls) == number else loss

    return patched


def checkpoint_at(output_dir: Path, step: int) -> dict:
    return load_checkpoint(output_dir / f"checkpoint-{step}", rank=0)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_same_optimizer_state(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index in a["state"]:
        assert_same_tensors(a["state"][index], b["state"][index])


# -----------------------------------------------------------------------------
# The loss


@pytest.fixture(scope="module")
def forward_process():
    """A batch x0, its noise and timesteps spread over [0, T)."""
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(4, 3, 8, 8, generator=generator)
    return x0, noise, torch.tensor([0, 250, 600, 999])


def test_training_target_for_epsilon_prediction_is_the_noise(forward_process):
    x0, noise, timesteps = forward_process
    scheduler = DDPMScheduler(prediction_type="epsilon")
    assert torch.equal(training_target(scheduler, x0, noise, timesteps), noise)


def test_training_target_for_sample_prediction_is_x0(forward_process):
    x0, noise, timesteps = forward_process
    scheduler = DDPMScheduler(prediction_type="sample")
    assert torch.equal(training_target(scheduler, x0, noise, timesteps), x0)


def test_training_target_for_v_prediction_equals_diffusers_get_velocity(forward_process):
    x0, noise, timesteps = forward_process
    ours = training_target(DDPMScheduler(prediction_type="v_prediction"), x0, noise, timesteps)
    theirs = diffusers.DDPMScheduler(prediction_type="v_prediction").get_velocity(x0, noise, timesteps)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_diffusion_loss_is_the_mse_between_the_unet_output_on_x_t_and_the_target(prediction_type, forward_process):
    x0, noise, timesteps = forward_process
    scheduler = DDPMScheduler(prediction_type=prediction_type)
    torch.manual_seed(0)
    unet = perturb_(UNet2DModel(**TINY_UNET, sample_size=8))
    alpha_bar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise  # Eq. 4
    target = {"epsilon": noise, "sample": x0,
              "v_prediction": alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0}[prediction_type]
    expected = F.mse_loss(unet(x_t, timesteps), target)
    torch.testing.assert_close(diffusion_loss(unet, scheduler, x0, noise, timesteps), expected, rtol=1e-6, atol=0)


# -----------------------------------------------------------------------------
# Gradient accumulation


def test_gradient_of_two_accumulated_micro_batches_equals_the_gradient_of_one_batch():
    torch.manual_seed(0)
    unet = perturb_(UNet2DModel(**TINY_UNET, sample_size=8))
    scheduler = DDPMScheduler()
    x0, noise = torch.rand(8, 3, 8, 8) * 2 - 1, torch.randn(8, 3, 8, 8)
    timesteps = torch.randint(0, 1000, (8,))

    diffusion_loss(unet, scheduler, x0, noise, timesteps).backward()
    one_batch = [p.grad.clone() for p in unet.parameters()]
    unet.zero_grad()
    for half in (slice(0, 4), slice(4, 8)):
        # train.py divides each micro-batch's loss by the number of accumulation steps
        (diffusion_loss(unet, scheduler, x0[half], noise[half], timesteps[half]) / 2).backward()
    for p, expected in zip(unet.parameters(), one_batch):
        torch.testing.assert_close(p.grad, expected, rtol=0, atol=1e-6)


def test_train_py_weights_the_loss_by_min_snr_only_with_snr_gamma(tmp_path, monkeypatch):
    gammas = []

    def recording_loss(unet, scheduler, x0, noise, timesteps, snr_gamma=None):
        gammas.append(snr_gamma)
        return diffusion_loss(unet, scheduler, x0, noise, timesteps, snr_gamma)

    monkeypatch.setattr(eager_step, "diffusion_loss", recording_loss)
    # butterflies-128 sets no snr_gamma; quickstart, the default preset, sets 10
    run(tmp_path, output_dir=tmp_path / "plain", max_train_steps=1, preset="butterflies-128", builtin_data=True,
        mixed_precision="no")
    run(tmp_path, output_dir=tmp_path / "weighted", max_train_steps=1, preset="butterflies-128", builtin_data=True,
        mixed_precision="no", snr_gamma=3)
    run(tmp_path, output_dir=tmp_path / "quickstart", max_train_steps=1)
    run(tmp_path, output_dir=tmp_path / "quickstart_unweighted", max_train_steps=1, snr_gamma=0)  # 0: off
    assert gammas == [None, 3.0, 10.0, None]


def test_train_py_accumulating_two_batches_of_4_takes_the_gradient_of_one_batch_of_8(tmp_path, monkeypatch):
    def noise_from_pixels(unet, scheduler, x0, noise, timesteps, snr_gamma=None):
        # noise and timesteps as functions of each image, so both runs give each image the same ones
        # (train.py draws them per micro-batch, so a batch of 8 and two of 4 would draw different values)
        noise = torch.sin(97 * x0 + 1)
        timesteps = ((x0[:, 0, 0, 0] + 1) * 499).long()
        return diffusion_loss(unet, scheduler, x0, noise, timesteps, snr_gamma)

    monkeypatch.setattr(eager_step, "diffusion_loss", noise_from_pixels)
    # no clipping: Adam's first step hardly depends on the gradient's scale, its moments do
    common = dict(max_train_steps=1, max_grad_norm=1e9, random_flip=True)
    accumulated = run(tmp_path, output_dir=tmp_path / "accumulated", train_batch_size=4,
                      gradient_accumulation_steps=2, **common)
    one_batch = run(tmp_path, output_dir=tmp_path / "one_batch", train_batch_size=8, **common)

    # after one step, AdamW's exp_avg is (1 - beta1) * gradient
    a = checkpoint_at(accumulated, 1)["optimizer"]["state"]
    b = checkpoint_at(one_batch, 1)["optimizer"]["state"]
    for index in b:
        torch.testing.assert_close(a[index]["exp_avg"], b[index]["exp_avg"], rtol=1e-5, atol=1e-7)


def test_lr_schedule_advances_once_per_optimizer_step_not_per_micro_batch(tmp_path):
    out = run(tmp_path, max_train_steps=3, gradient_accumulation_steps=2, lr_scheduler="linear")
    state = checkpoint_at(out, 3)["state"]
    assert (state["epoch"], state["epoch_batches"]) == (0, 6)  # micro-batches drawn
    assert state["lr_step"] == 3


# -----------------------------------------------------------------------------
# Stopping and resuming


@pytest.mark.parametrize("image_size, on_the_device", [((12, 10), False), ((8, 8), True)],
                         ids=["dataloader", "device_data"])
def test_a_stopped_and_resumed_run_equals_the_uninterrupted_run_bit_for_bit(image_size, on_the_device, tmp_path,
                                                                            capsys):
    # 20 images in batches of 4 and 2 accumulation steps: 2.5 optimizer steps per epoch, so an epoch ends
    # inside step 3 and the resume point (after 6 batches) lies one batch into the second epoch
    options = dict(model={**TINY_UNET, "dropout": 0.1}, use_ema=True, random_flip=True,
                   train_data_dir=image_folder(tmp_path / "images", 20, image_size), gradient_accumulation_steps=2,
                   max_train_steps=6, checkpointing_steps=3, save_images_epochs=1)
    uninterrupted = run(tmp_path, output_dir=tmp_path / "uninterrupted", **options)
    assert (ON_THE_DEVICE in capsys.readouterr().out) == on_the_device
    state = checkpoint_at(uninterrupted, 3)["state"]
    assert (state["epoch"], state["epoch_batches"]) == (1, 1)

    resumed = tmp_path / "resumed"
    shutil.copytree(uninterrupted / "checkpoint-3", resumed / "checkpoint-3")
    run(tmp_path, output_dir=resumed, resume_from_checkpoint="latest", **options)

    a, b = checkpoint_at(uninterrupted, 6), checkpoint_at(resumed, 6)
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["ema"], b["ema"])
    assert_same_optimizer_state(a["optimizer"], b["optimizer"])
    assert_same_tensors(a["rng"][0], b["rng"][0])
    assert {**a["state"], "args": None} == {**b["state"], "args": None}


def test_a_run_resumed_at_an_epoch_end_does_not_sample_that_epoch_again(tmp_path):
    # 8 images in batches of 4: epoch 1 ends at step 2, where the checkpoint is
    options = dict(train_data_dir=image_folder(tmp_path / "images", 8), max_train_steps=4, checkpointing_steps=2,
                   save_images_epochs=1)
    uninterrupted = run(tmp_path, output_dir=tmp_path / "uninterrupted", **options)
    assert sorted(p.name for p in (uninterrupted / "samples").iterdir()) == ["0001.png", "0002.png"]

    resumed = tmp_path / "resumed"
    shutil.copytree(uninterrupted / "checkpoint-2", resumed / "checkpoint-2")
    run(tmp_path, output_dir=resumed, resume_from_checkpoint="latest", **options)
    assert sorted(p.name for p in (resumed / "samples").iterdir()) == ["0002.png"]


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing in train.py can catch it."""


def test_a_kill_while_writing_a_checkpoint_leaves_the_previous_one_to_resume_from(tmp_path, monkeypatch, capsys):
    real_save_file = ddpm.checkpoint.save_file

    def save_file_killed_in_checkpoint_4(tensors, filename):
        # dies after model.safetensors and optimizer.pt of checkpoint-4 are written, before the RNG states
        if ".checkpoint-4.tmp" in filename and "rng-rank" in filename:
            raise Killed
        real_save_file(tensors, filename)

    options = dict(max_train_steps=6, checkpointing_steps=2)
    with monkeypatch.context() as patch:
        patch.setattr(ddpm.checkpoint, "save_file", save_file_killed_in_checkpoint_4)
        with pytest.raises(Killed):
            run(tmp_path, **options)
    out = tmp_path / "out"
    assert (out / ".checkpoint-4.tmp" / "model.safetensors").is_file()
    assert not (out / "checkpoint-4").exists()
    assert list_checkpoints(out) == [out / "checkpoint-2"]
    assert checkpoint_at(out, 2)["state"]["step"] == 2
    capsys.readouterr()

    run(tmp_path, resume_from_checkpoint="latest", **options)
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in capsys.readouterr().out
    assert list_checkpoints(out) == [out / "checkpoint-2", out / "checkpoint-4", out / "checkpoint-6"]
    assert not (out / ".checkpoint-4.tmp").exists()


def test_resume_latest_without_a_checkpoint_starts_a_new_run_with_a_notice(tmp_path, capsys):
    out = run(tmp_path, resume_from_checkpoint="latest", max_train_steps=2)
    assert f"no checkpoint in {out} to resume from: starting a new run" in capsys.readouterr().out
    assert list_checkpoints(out) == [out / "checkpoint-2"]


def test_checkpoints_total_limit_keeps_only_the_newest(tmp_path):
    out = run(tmp_path, max_train_steps=5, checkpointing_steps=1, checkpoints_total_limit=2)
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-4", "checkpoint-5"]


def test_sigterm_writes_a_checkpoint_at_the_current_step_exits_0_and_the_run_resumes_to_the_end(tmp_path, capsys):
    argv = tiny_args(tmp_path, max_train_steps=40, checkpointing_steps=1000)
    out = tmp_path / "out"
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen([sys.executable, str(TRAIN_PY), *argv], stdout=stdout, stderr=stderr,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
        # the TensorBoard event file is created just before the training loop starts
        deadline = time.monotonic() + 120
        while not list(out.glob("logs/events.*")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=120)
    output = (tmp_path / "stdout").read_text() + (tmp_path / "stderr").read_text()
    assert returncode == 0, output
    [checkpoint] = list_checkpoints(out)
    stopped_at = load_checkpoint(checkpoint, rank=0)["state"]["step"]
    assert checkpoint.name == f"checkpoint-{stopped_at}" and 1 <= stopped_at < 40
    assert f"stop signal received: checkpoint written at step {stopped_at}" in output

    train.main(argv + ["--resume_from_checkpoint", "latest"])
    assert f"resumed from {checkpoint} at step {stopped_at}" in capsys.readouterr().out
    assert list_checkpoints(out)[-1] == out / "checkpoint-40"
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_a_stop_signal_during_the_last_step_still_writes_the_pipeline(tmp_path, monkeypatch):
    def sigterm(loss):
        signal.raise_signal(signal.SIGTERM)
        return loss

    monkeypatch.setattr(eager_step, "diffusion_loss", loss_on_call(2, sigterm))
    out = run(tmp_path, max_train_steps=2)
    assert list_checkpoints(out) == [out / "checkpoint-2"]
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


# -----------------------------------------------------------------------------
# Mixed precision and non-finite losses


def test_bf16_autocast_trains_on_cpu(tmp_path):
    out = run(tmp_path, mixed_precision="bf16", max_train_steps=3, checkpointing_steps=1, logging_steps=1)
    events = EventAccumulator(str(out / "logs"))
    events.Reload()
    losses = [event.value for event in events.Scalars("train/loss")]
    assert len(losses) == 3 and all(np.isfinite(losses))
    first, last = checkpoint_at(out, 1)["model"], checkpoint_at(out, 3)["model"]
    assert all(torch.isfinite(tensor).all() for tensor in last.values())
    assert not all(torch.equal(first[name], last[name]) for name in first)
    unet, _ = load_pipeline(out)
    assert_same_tensors(unet.state_dict(), last)


def test_fast_norm_changes_the_bf16_training_numbers_but_not_the_saved_config_or_weight_names(tmp_path):
    plain = run(tmp_path, mixed_precision="bf16")
    fast = run(tmp_path, mixed_precision="bf16", fast_norm=True, output_dir=tmp_path / "fast")
    assert (fast / "unet" / "config.json").read_text() == (plain / "unet" / "config.json").read_text()
    weights = "unet/diffusion_pytorch_model.safetensors"
    expected, actual = load_file(plain / weights), load_file(fast / weights)
    assert actual.keys() == expected.keys()
    assert not all(torch.equal(actual[name], expected[name]) for name in expected)


def test_compile_with_channels_last_asks_inductor_to_keep_channels_last_throughout(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **options: calls.append(options) or model)
    run(tmp_path, compile=True, max_train_steps=1)
    run(tmp_path, compile=True, channels_last=True, max_train_steps=1, output_dir=tmp_path / "channels_last")
    assert calls == [{"options": None}, {"options": {"force_layout_optimization": True}}]


class OverflowingGradient(torch.autograd.Function):
    """The identity forward; an infinite gradient backward, as when fp16 gradients overflow."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_an_fp16_overflow_step_is_skipped_and_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(eager_step, "diffusion_loss", loss_on_call(2, OverflowingGradient.apply))
    out = run(tmp_path, mixed_precision="fp16", use_ema=True, max_train_steps=3, checkpointing_steps=1)
    before, overflowed, after = (checkpoint_at(out, step) for step in (1, 2, 3))

    assert [c["state"]["skipped_steps"] for c in (before, overflowed, after)] == [0, 1, 1]
    assert_same_tensors(before["model"], overflowed["model"])
    assert_same_tensors(before["ema"], overflowed["ema"])
    assert [c["state"]["lr_step"] for c in (before, overflowed, after)] == [1, 1, 2]
    assert [c["state"]["ema_step"] for c in (before, overflowed, after)] == [1, 1, 2]
    assert overflowed["state"]["grad_scaler"]["scale"] == before["state"]["grad_scaler"]["scale"] / 2
    assert not all(torch.equal(overflowed["model"][name], after["model"][name]) for name in after["model"])


def test_a_nan_loss_in_fp32_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(eager_step, "diffusion_loss", loss_on_call(4, lambda loss: loss * float("nan")))
    with pytest.raises(SystemExit) as stopped:
        run(tmp_path, max_train_steps=6, checkpointing_steps=3, logging_steps=1)
    message = stopped.value.code
    assert message.startswith("train.py: error: the loss became NaN or infinite by step 4;")
    assert "\n" not in message
    out = tmp_path / "out"
    assert list_checkpoints(out) == [out / "checkpoint-3"]
    assert all(torch.isfinite(tensor).all() for tensor in checkpoint_at(out, 3)["model"].values())


def test_a_nan_loss_is_caught_before_an_epoch_end_saves_the_pipeline(tmp_path, monkeypatch):
    # 8 images in batches of 4: epochs end at steps 2 and 4; the loss turns NaN at step 3
    monkeypatch.setattr(eager_step, "diffusion_loss", loss_on_call(3, lambda loss: loss * float("nan")))
    with pytest.raises(SystemExit, match="by step 4"):
        run(tmp_path, train_data_dir=image_folder(tmp_path / "images", 8), max_train_steps=6,
            save_model_epochs=1, logging_steps=100, checkpointing_steps=100)
    unet, _ = load_pipeline(tmp_path / "out")  # saved at step 2
    assert all(torch.isfinite(tensor).all() for tensor in unet.state_dict().values())


# -----------------------------------------------------------------------------
# Data


def test_odd_image_modes_train_and_a_corrupt_file_is_reported_in_the_runs_output(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8)).save(images / "grey.png")  # L
    Image.fromarray(rng.integers(0, 256, (10, 10, 4), dtype=np.uint8)).save(images / "alpha.png")  # RGBA
    Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).convert("P").save(images / "palette.png")
    Image.fromarray(rng.integers(0, 65536, (10, 10), dtype=np.uint16)).save(images / "sixteen_bit.png")  # I;16
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    assert [Image.open(images / name).mode for name in ("grey.png", "alpha.png", "palette.png", "sixteen_bit.png")] \
        == ["L", "RGBA", "P", "I;16"]

    # a batch of 5 reads every file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as PYTHONWARNINGS=ignore: the report is not a Python warning
        out = run(tmp_path, train_data_dir=images, train_batch_size=5, max_train_steps=2)
    assert list_checkpoints(out) == [out / "checkpoint-2"]
    assert all(torch.isfinite(tensor).all() for tensor in checkpoint_at(out, 2)["model"].values())
    log = capsys.readouterr().out
    assert log.count("skipping unreadable image") == 1 and f"skipping unreadable image {images / 'broken.png'}" in log
    assert f"imagefolder {images}: 5 images (decoded, one uint8 tensor on cpu: batches drawn there), " \
           "1 unreadable skipped;" in log


def test_an_unreadable_file_read_by_a_dataloader_worker_is_reported_once_with_warnings_ignored(tmp_path, capfd):
    images = image_folder(tmp_path / "images", 4)
    (images / "broken.png").write_bytes(b"not a png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # streamed, so the worker process decodes; a batch of 5 draws every file in each of the 3 epochs
        run(tmp_path, train_data_dir=images, train_batch_size=5, max_train_steps=3, cache_images=False,
            dataloader_num_workers=1)
    assert capfd.readouterr().out.count(f"skipping unreadable image {images / 'broken.png'}: ") == 1


# -----------------------------------------------------------------------------
# Bad input: one line, "train.py: error: ...", naming the value


def folder(path: Path) -> Path:
    path.mkdir()
    return path


def truncated_test_split(path: Path) -> Path:
    """A folder of IDX files whose train split reads and whose test split is cut short."""
    write_idx(path / "train-images-idx3-ubyte", random_images(8), gz=False)
    test_file = write_idx(path / "t10k-images-idx3-ubyte", random_images(3), gz=False)
    test_file.write_bytes(test_file.read_bytes()[:-10])
    return path


BAD_INPUTS = {
    "missing_data_folder": lambda tmp: (dict(train_data_dir=tmp / "nowhere"), "nowhere"),
    "empty_data_folder": lambda tmp: (dict(train_data_dir=folder(tmp / "empty")), "empty"),
    "dataset_smaller_than_the_batch": lambda tmp: (
        dict(train_data_dir=image_folder(tmp / "three", 3), train_batch_size=4), "3 images"),
    "resolution_not_divisible_by_2_to_the_levels_minus_1": lambda tmp: (dict(resolution=9), "--resolution 9"),
    "resolution_other_than_the_model_sample_size": lambda tmp: (
        dict(resolution=16, model={**TINY_UNET, "sample_size": 8}), "sample_size 8"),
    "zero_batch_size": lambda tmp: (dict(train_batch_size=0), "--train_batch_size must be >= 1, got 0"),
    "negative_batch_size": lambda tmp: (dict(train_batch_size=-2), "--train_batch_size must be >= 1, got -2"),
    "zero_learning_rate": lambda tmp: (dict(learning_rate=0), "--learning_rate must be > 0, got 0.0"),
    "negative_snr_gamma": lambda tmp: (dict(snr_gamma=-1), "--snr_gamma must be > 0, got -1.0"),
    "negative_warmup": lambda tmp: (dict(lr_warmup_steps=-1), "--lr_warmup_steps must be >= 0, got -1"),
    "negative_seed": lambda tmp: (dict(seed=-1), "--seed must be >= 0, got -1"),
    "eval_bpd_images_with_one_timestep": lambda tmp: (
        dict(eval_bpd_images=2, ddpm_num_steps=1, ddpm_num_inference_steps=1), "at least 2 timesteps"),
    "eval_bpd_images_with_a_truncated_test_split": lambda tmp: (
        dict(eval_bpd_images=2, train_data_dir=truncated_test_split(tmp / "idx")), "truncated"),
    "unknown_lr_scheduler": lambda tmp: (dict(lr_scheduler="cosine_restarts"), "'cosine_restarts'"),
    "more_inference_steps_than_diffusion_steps": lambda tmp: (
        dict(ddpm_num_steps=10, ddpm_num_inference_steps=20), "(20)"),
    "resume_from_a_folder_that_is_not_a_checkpoint": lambda tmp: (
        dict(resume_from_checkpoint=folder(tmp / "not-a-checkpoint")), "not-a-checkpoint"),
    "unsupported_model_config_value": lambda tmp: (dict(model={**TINY_UNET, "act_fn": "gelu"}), "'gelu'"),
    "unknown_model_config_key": lambda tmp: (dict(model={**TINY_UNET, "attention_dropout": 0.1}),
                                             "attention_dropout"),
    "cuda_graph_with_accumulation": lambda tmp: (dict(cuda_graph=True, gradient_accumulation_steps=2),
                                                 "--cuda_graph records one micro-step per optimizer step: it cannot "
                                                 "run with --gradient_accumulation_steps 2"),
    "cuda_graph_with_fp16": lambda tmp: (dict(cuda_graph=True, mixed_precision="fp16"),
                                         "--cuda_graph cannot run with --mixed_precision fp16"),
    "cuda_graph_with_gradient_checkpointing": lambda tmp: (dict(cuda_graph=True, gradient_checkpointing=True),
                                                           "--cuda_graph cannot run with --gradient_checkpointing"),
    "cuda_graph_on_the_cpu": lambda tmp: (dict(cuda_graph=True), "--cuda_graph needs a CUDA GPU; this run is on "
                                                                 "--device cpu"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_ends_the_run_with_a_one_line_error_naming_the_value(case, tmp_path, monkeypatch, capsys):
    options, value = BAD_INPUTS[case](tmp_path)
    monkeypatch.setattr(sys, "argv", [str(TRAIN_PY)])  # argparse names the program after argv[0]
    with pytest.raises(SystemExit) as stopped:
        run(tmp_path, **options)
    code = stopped.value.code
    assert code not in (0, None)
    # argparse prints usage and the error and exits 2; fail() exits with the message, which Python prints
    stderr = capsys.readouterr().err + (code if isinstance(code, str) else "")
    # what a terminal shows last: after a progress bar's clearing (carriage return, cursor up) on the same line
    last_line = re.split(r"\r|\x1b\[A", stderr.strip().splitlines()[-1])[-1]
    assert last_line.startswith("train.py: error: ")
    assert value in last_line
    assert not (tmp_path / "out" / "checkpoint-2").exists()


def test_a_bad_input_exits_with_the_error_and_no_traceback(tmp_path):
    argv = tiny_args(tmp_path, train_data_dir=tmp_path / "nowhere")
    result = subprocess.run([sys.executable, str(TRAIN_PY), *argv], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"train.py: error: --train_data_dir {str(tmp_path / 'nowhere')!r} is not a folder; "
        "pass a folder that contains images")


# -----------------------------------------------------------------------------
# The output folder


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """The output folder of a finished 3-step run, logging every step."""
    tmp_path = tmp_path_factory.mktemp("finished")
    with own_signal_handlers():  # this module-scoped fixture runs before restore_signal_handlers saves them
        return run(tmp_path, max_train_steps=3, logging_steps=1, use_ema=True)


def test_output_folder_samples_in_diffusers_ddpm_pipeline_as_in_generate(finished_run):
    pipeline = diffusers.DDPMPipeline.from_pretrained(finished_run)
    pipeline.set_progress_bar_config(disable=True)
    theirs = pipeline(batch_size=2, generator=torch.manual_seed(3), num_inference_steps=2, output_type="np").images
    unet, scheduler = load_pipeline(finished_run)
    ours = generate(unet, scheduler, 2, torch.manual_seed(3), num_inference_steps=2)
    assert theirs.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(ours.permute(0, 2, 3, 1).numpy(), theirs, rtol=0, atol=1e-5)


def test_output_folder_holds_the_ema_weights(finished_run):
    weights = load_file(str(finished_run / "unet" / "diffusion_pytorch_model.safetensors"))
    assert_same_tensors(weights, checkpoint_at(finished_run, 3)["ema"])


def test_a_sample_grid_png_is_written(finished_run):
    [grid] = (finished_run / "samples").glob("*.png")
    with Image.open(grid) as image:
        # make_grid: 2 images of 8x8 side by side with 2-pixel padding, 22 x 12 px, enlarged 22x to reach 256 px
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (22 * 22, 12 * 22))


def test_tensorboard_logs_loss_lr_grad_norm_and_throughput_each_logging_step(finished_run):
    events = EventAccumulator(str(finished_run / "logs"))
    events.Reload()
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/images_per_s"):
        assert [event.step for event in events.Scalars(tag)] == [1, 2, 3], tag
        assert all(np.isfinite(event.value) for event in events.Scalars(tag)), tag


def test_the_model_card_shows_the_last_logged_loss_and_the_folder_with_it_loads_in_diffusers(finished_run):
    events = EventAccumulator(str(finished_run / "logs"))
    events.Reload()
    text = (finished_run / "README.md").read_text()
    assert f"| training loss (last logged) | {events.Scalars('train/loss')[-1].value:.4g} |" in text.splitlines()
    assert "![Samples after epoch 0](samples/0000.png)" in text
    diffusers.DDPMPipeline.from_pretrained(finished_run)


def test_resuming_with_another_seed_ends_with_an_error_naming_both_seeds(tmp_path):
    out = run(tmp_path, max_train_steps=2, checkpointing_steps=1)
    with pytest.raises(SystemExit, match="seed 0, this run has 7"):
        run(tmp_path, max_train_steps=4, seed=7, resume_from_checkpoint="latest", output_dir=out)


def test_a_run_saved_without_fp16_resumes_under_fp16(tmp_path):
    out = run(tmp_path, max_train_steps=2, checkpointing_steps=1)
    run(tmp_path, max_train_steps=3, mixed_precision="fp16", resume_from_checkpoint="latest", output_dir=out)
    assert checkpoint_at(out, 3)["state"]["grad_scaler"]["scale"] > 0


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    for step in (8, 9):  # newer than the one being written
        (tmp_path / f"checkpoint-{step}").mkdir()
    ddpm.checkpoint.save_checkpoint(tmp_path, 4, {"w": torch.zeros(1)}, None, {}, [({"r": torch.zeros(1)}, {})], {},
                                    total_limit=2)
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-9"]


def test_resuming_from_an_earlier_checkpoint_sets_the_newer_ones_aside(tmp_path, capsys):
    out = run(tmp_path, max_train_steps=4, checkpointing_steps=1, checkpoints_total_limit=2)
    for newer in ("checkpoint-8", "checkpoint-9"):  # newer checkpoints of the run that is being redone
        shutil.copytree(out / "checkpoint-4", out / newer)
    run(tmp_path, max_train_steps=4, checkpointing_steps=1, checkpoints_total_limit=2,
        resume_from_checkpoint=str(out / "checkpoint-3"), output_dir=out)
    assert "set aside 3 checkpoint(s) of the run this one replaces, after step 3" in capsys.readouterr().out
    assert [path.name for path in list_checkpoints(out)] == ["checkpoint-3", "checkpoint-4"]
    assert sorted(path.name for path in out.glob("abandoned-*")) == [
        "abandoned-checkpoint-4", "abandoned-checkpoint-8", "abandoned-checkpoint-9"]
    # a later `latest` continues this run, not the abandoned one at step 9
    run(tmp_path, max_train_steps=5, resume_from_checkpoint="latest", output_dir=out)
    assert f"resumed from {out / 'checkpoint-4'} at step 4" in capsys.readouterr().out


def test_every_preset_parses_with_a_mixed_precision_setting(tmp_path):
    for preset in PRESETS:
        args = train.parse_args(["--preset", preset, "--output_dir", str(tmp_path)])
        assert args.mixed_precision in ("no", "fp16", "bf16")


def test_a_new_run_in_a_folder_with_checkpoints_warns_that_it_starts_anew(tmp_path, capsys):
    out = run(tmp_path, max_train_steps=2, checkpointing_steps=1)
    capsys.readouterr()
    (out / "checkpoint-7").mkdir()  # stands for a longer earlier run
    run(tmp_path, max_train_steps=2, checkpointing_steps=1, output_dir=out)
    log = capsys.readouterr().out
    assert "holds checkpoints of an earlier run" in log and "set aside 3 checkpoint(s)" in log
    # the earlier run's checkpoints are kept under other names; `latest` now means this run's last
    assert sorted(path.name for path in out.glob("abandoned-*")) == [
        "abandoned-checkpoint-1", "abandoned-checkpoint-2", "abandoned-checkpoint-7"]
    assert [path.name for path in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]


def test_an_image_folder_replaces_the_presets_hub_dataset(tmp_path):
    args = train.parse_args(["--preset", "butterflies-128", "--train_data_dir", str(tmp_path), "--resolution", "64"])
    assert args.dataset_name is None and args.train_data_dir == str(tmp_path)
    assert args.model_config["sample_size"] == 64


def test_builtin_data_replaces_the_presets_hub_dataset(tmp_path):
    args = train.parse_args(["--preset", "cifar10-32", "--builtin_data"])
    assert args.dataset_name is None and args.train_data_dir is None
    assert args.model_config["block_out_channels"] == [128, 256, 256, 256]


@pytest.mark.parametrize("other", [["--dataset_name", "cifar10"], ["--train_data_dir", "images"]])
def test_builtin_data_with_another_dataset_is_a_one_line_error(other, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--builtin_data", *other])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.endswith(f"error: --builtin_data and {other[0]} name two datasets; pass one")


def test_training_on_cached_and_streamed_images_is_identical(tmp_path):
    options = dict(train_data_dir=image_folder(tmp_path / "images", 8), max_train_steps=3, random_flip=True)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    cached = run(tmp_path / "a", **options)
    streamed = run(tmp_path / "b", cache_images=False, **options)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert_same_tensors(load_file(cached / weights), load_file(streamed / weights))


def test_fp16_on_the_cpu_warns_that_it_is_slow(capsys):
    train.parse_args(["--preset", "butterflies-128", "--device", "cpu"])  # the preset trains in fp16
    assert "warning: --mixed_precision fp16 (preset butterflies-128) on the CPU is about 80x slower" in \
        capsys.readouterr().err
    train.parse_args(["--device", "cpu", "--mixed_precision", "bf16"])
    assert "warning" not in capsys.readouterr().err


def test_a_checkpoint_set_aside_twice_keeps_both_copies(tmp_path):
    for name in ("checkpoint-2", "checkpoint-9", "abandoned-checkpoint-9"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "origin").write_text(name)
    moved = ddpm.checkpoint.set_aside_checkpoints_after(tmp_path, 2)
    assert [path.name for path in moved] == ["abandoned-checkpoint-9-1"]
    assert (tmp_path / "abandoned-checkpoint-9" / "origin").read_text() == "abandoned-checkpoint-9"
    assert (tmp_path / "abandoned-checkpoint-9-1" / "origin").read_text() == "checkpoint-9"
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-2"]


# -----------------------------------------------------------------------------
# A time budget (--max_train_minutes)


def test_the_quickstart_trains_for_a_time_budget_that_a_typed_step_count_replaces():
    assert train.parse_args([]).max_train_minutes == PRESETS["quickstart"]["max_train_minutes"]
    assert train.parse_args(["--max_train_steps", "5"]).max_train_minutes is None
    assert train.parse_args(["--num_epochs", "2"]).max_train_minutes is None
    both = train.parse_args(["--max_train_steps", "5", "--max_train_minutes", "2"])
    assert (both.max_train_steps, both.max_train_minutes) == (5, 2.0)


def test_a_time_budget_of_zero_minutes_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--max_train_minutes", "0"])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("error: --max_train_minutes must be > 0, got 0.0")


BUDGET_RUN = dict(max_train_steps=None, max_train_minutes=0.1, lr_warmup_steps=30, checkpointing_steps=40,
                  learning_rate=1e-3, lr_scheduler="cosine")


@contextlib.contextmanager
def counting_clock(seconds_per_step=lambda step: 1 / 64):
    """The budget's clock counts seconds_per_step(k) for each step k done, so that a loaded machine fits the same
    counts as an idle one (binary fractions of a second: the rates and counts come out exact)."""
    done = []  # the steps this process has done (a resumed run's clock counts from its first)
    after_step = ddpm.time_budget.TimeBudget.after_step

    def counting_after_step(self, step):
        done.append(step)
        after_step(self, step)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ddpm.time_budget.TimeBudget, "after_step", counting_after_step)
        patch.setattr(ddpm.time_budget, "clock", lambda: sum(map(seconds_per_step, done)))
        yield


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory) -> tuple[Path, str]:
    """6 seconds of training at 1/64 s a step on the counting clock, the count fitted at step 30 (384):
    (output folder, what the run printed)."""
    tmp_path = tmp_path_factory.mktemp("budget")
    printed = io.StringIO()
    with counting_clock(), contextlib.redirect_stdout(printed):
        out = run(tmp_path, **BUDGET_RUN)
    return out, printed.getvalue()


def test_a_time_budget_fixes_the_step_count_at_the_end_of_the_warmup_and_the_lr_decays_to_0_there(budget_run):
    out, printed = budget_run
    assert "as many optimizer steps as fit in 0.1 min (counted at the end of the LR warmup, and again as the run goes)" in printed
    fitted = re.search(r"(\d+) optimizer steps fit in the time budget of 0.1 min \(\S+ steps/s over steps 5-30,", printed)
    assert fitted, printed
    total = int(fitted[1])
    assert total == 384  # 64 steps/s on the counting clock, 5.53 s left at step 30: 354 steps more
    assert list_checkpoints(out)[-1] == out / f"checkpoint-{total}"
    state = checkpoint_at(out, total)["state"]
    assert state["total_steps"] == total and state["steps_fitted_to_budget"]
    events = EventAccumulator(str(out / "logs"))
    events.Reload()
    lrs = {event.step: event.value for event in events.Scalars("train/lr")}
    assert lrs[30] == pytest.approx(1e-3) and lrs[total] == pytest.approx(0, abs=1e-12)


def test_a_run_resumed_after_its_budget_fixed_the_count_ends_as_the_uninterrupted_run(budget_run, tmp_path):
    uninterrupted, printed = budget_run
    total = checkpoint_at(uninterrupted, 40)["state"]["total_steps"]
    resumed = tmp_path / "resumed"
    shutil.copytree(uninterrupted / "checkpoint-40", resumed / "checkpoint-40")
    with counting_clock():  # as fast as before: fitted again, the count holds
        run(tmp_path, output_dir=resumed, resume_from_checkpoint="latest", **BUDGET_RUN)
    assert list_checkpoints(resumed)[-1] == resumed / f"checkpoint-{total}"
    a, b = checkpoint_at(uninterrupted, total), checkpoint_at(resumed, total)
    assert_same_tensors(a["model"], b["model"])
    assert_same_optimizer_state(a["optimizer"], b["optimizer"])
    ignored = {"args": None, "train_seconds": None}
    assert {**a["state"], **ignored} == {**b["state"], **ignored}


def test_a_machine_slowing_after_the_fit_gets_the_count_fitted_again_and_the_lr_goes_on_without_a_jump(tmp_path,
                                                                                                      capsys):
    # 1/64 s a step, then from step 100 on 1/32: 1.56 s for the first 100 steps, the 4.44 s left hold 142 more
    with counting_clock(lambda step: 1 / 64 if step <= 100 else 1 / 32):
        out = run(tmp_path, **BUDGET_RUN)
    printed = capsys.readouterr().out
    assert re.search(r"384 optimizer steps fit in the time budget of 0.1 min", printed), printed
    assert re.search(r"\d+ optimizer steps fit now \(step \d+\) in the time budget of 0.1 min \(32.00 steps/s", printed)
    total = int(list_checkpoints(out)[-1].name.split("-")[1])
    assert total == 242
    events = EventAccumulator(str(out / "logs"))
    events.Reload()
    lrs = [event.value for event in events.Scalars("train/lr")]
    assert lrs[-1] == pytest.approx(0, abs=1e-12)
    # every 10 steps the cosine falls by at most pi/2 x 10/(the steps the decay has left) of the peak 1e-3 
    assert max(a - b for a, b in zip(lrs[2:], lrs[3:])) < 1e-3 * 0.1


def test_a_budget_spent_during_the_warmup_ends_the_run_there_with_a_checkpoint(tmp_path, capsys):
    out = run(tmp_path, max_train_steps=None, max_train_minutes=0.02, lr_warmup_steps=100_000, logging_steps=5)
    printed = capsys.readouterr().out
    ended = re.search(r"the time budget of 0.02 min was used up at step (\d+), during the LR warmup: training ends "
                      r"here", printed)
    assert ended, printed
    step = int(ended[1])
    assert step % 5 == 0 and list_checkpoints(out) == [out / f"checkpoint-{step}"]
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


# -----------------------------------------------------------------------------
# Data on the training device (--device_data) and the device-dependent precision


def test_square_images_are_batched_on_the_device_as_the_dataloader_batches_them(tmp_path, monkeypatch, capsys):
    # 8 images in batches of 4: the 3 steps cross an epoch, with flips
    options = dict(train_data_dir=image_folder(tmp_path / "images", 8, (8, 8)), max_train_steps=3, random_flip=True)
    with_dataloader = run(tmp_path, output_dir=tmp_path / "dataloader", device_data=False, **options)

    def no_dataloader(*args, **kwargs):
        raise AssertionError("train.py built a DataLoader")

    monkeypatch.setattr(train, "DataLoader", no_dataloader)
    on_device = run(tmp_path, output_dir=tmp_path / "device", **options)
    assert ON_THE_DEVICE in capsys.readouterr().out
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert_same_tensors(load_file(with_dataloader / weights), load_file(on_device / weights))


def test_images_over_the_memory_limit_are_batched_by_a_dataloader_saying_why_in_one_line(tmp_path, monkeypatch,
                                                                                         capsys):
    monkeypatch.setattr(train, "CACHE_BYTES", 8 * 3 * 8 * 8 - 1)  # one byte short of 8 images of 3x8x8
    out = run(tmp_path, train_data_dir=image_folder(tmp_path / "images", 8, (8, 8)), max_train_steps=2)
    log = capsys.readouterr().out
    [line] = [line for line in log.splitlines() if "DataLoader" in line]
    assert line.startswith("the batches come from a DataLoader, not from the device: the decoded images are not in "
                           "memory")
    assert ON_THE_DEVICE not in log
    assert list_checkpoints(out) == [out / "checkpoint-2"]


def test_images_that_need_random_crops_are_batched_by_a_dataloader_saying_why(tmp_path, capsys):
    run(tmp_path, train_data_dir=image_folder(tmp_path / "images", 8), max_train_steps=1)
    assert ("the batches come from a DataLoader, not from the device: " + str(tmp_path / "images" / "000.png") +
            " is 9x8 after resizing, not 8x8, so each batch needs random crops") in capsys.readouterr().out


def test_the_cifar10_preset_trains_in_bf16_on_a_gpu_that_has_it_and_in_fp32_otherwise(monkeypatch):
    assert train.parse_args(["--preset", "cifar10-32", "--device", "cpu"]).mixed_precision == "no"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for has_bf16, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: has_bf16)
        assert train.parse_args(["--preset", "cifar10-32", "--device", "cuda"]).mixed_precision == expected
    given = train.parse_args(["--preset", "cifar10-32", "--device", "cuda", "--mixed_precision", "fp16"])
    assert given.mixed_precision == "fp16"


def test_the_cifar10_preset_compiles_on_a_gpu_only_unless_told(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert train.parse_args(["--preset", "cifar10-32", "--device", "cuda"]).compile is True
    assert train.parse_args(["--preset", "cifar10-32", "--device", "cuda", "--no-compile"]).compile is False
    assert train.parse_args(["--preset", "cifar10-32", "--device", "cpu"]).compile is False
    assert train.parse_args(["--preset", "cifar10-32", "--device", "cpu", "--compile"]).compile is True
    assert train.parse_args(["--device", "cuda"]).compile is False


def test_the_device_dependent_precision_is_stated_in_help_and_in_the_start_summary(tmp_path, capsys):
    assert "auto (the cifar10-32 preset's): bf16 on a GPU that has it, else no (fp32)" in \
        " ".join(build_parser().format_help().split())
    run(tmp_path, mixed_precision="auto", max_train_steps=1)
    assert "on cpu, fp32 (--mixed_precision auto: bf16 on a GPU that has it, else fp32)" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_py_steps_between_logging_and_checkpoint_steps_never_wait_for_the_gpu(tmp_path, monkeypatch):
    calls = []

    def loss_checking_syncs(*args):
        # "error" from the loss of step 3 to the loss of step 7: the whole of steps 3-6 but their batches, and
        # the batches of steps 4-7 (40 images in batches of 4: no epoch ends, which checks the loss once)
        calls.append(1)
        torch.cuda.set_sync_debug_mode("error" if 3 <= len(calls) < 7 else "default")
        return diffusion_loss(*args)

    monkeypatch.setattr(eager_step, "diffusion_loss", loss_checking_syncs)
    try:
        run(tmp_path, device="cuda", train_data_dir=image_folder(tmp_path / "images", 40, (8, 8)), max_train_steps=8,
            logging_steps=100, checkpointing_steps=100, use_ema=True, mixed_precision="bf16", random_flip=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(calls) == 8


def test_resuming_a_checkpoint_of_another_batch_size_or_without_ema_is_refused_in_one_line(tmp_path):
    out = run(tmp_path, max_train_steps=2, checkpointing_steps=2)
    for options, expected in ((dict(train_batch_size=2), "it was written with train_batch_size 4, this run has 2"),
                              (dict(use_ema=True), "--use_ema is on but it holds no EMA weights")):
        with pytest.raises(SystemExit) as exit_info:
            train.main(tiny_args(tmp_path, max_train_steps=4, resume_from_checkpoint="latest", **options))
        message = str(exit_info.value.code)
        assert message.startswith(f"train.py: error: cannot resume from {str(out / 'checkpoint-2')!r}: {expected}")
        assert "\n" not in message
