"""A run killed at any moment (SIGKILL: no handler runs) and started again with the same command until it exits 0
leaves its output folder as the uninterrupted run leaves it; a finished run, started again, says so and changes
nothing; a write that fails for lack of space ends the run with one line and leaves what was written before."""

import errno
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ddpm.checkpoint
import ddpm.pipeline_io
from ddpm import load_pipeline
from ddpm.checkpoint import list_checkpoints, load_checkpoint
from test_distributed import worker_env
from test_train import image_folder, tiny_args
from train_script import TRAIN_PY, train

KILLS = 8
# what the run prints when step 24's checkpoint is written, or resumed from with its outputs unwritten
FINAL_CHECKPOINT = ("saved out/checkpoint-24", "writing the outputs due at step 24")


def command(tmp_path: Path) -> list[str]:
    """40 images in batches of 4: 10 steps an epoch, 24 steps; a grid and the pipeline at each epoch's end and at
    the end, a checkpoint every 5 steps, EMA on; the same command after every kill. It writes to out/ in the
    folder it runs in, so that both runs' checkpoints record the same arguments."""
    images = tmp_path / "images"
    if not images.exists():
        image_folder(images, 40, (8, 8))
    return [sys.executable, str(TRAIN_PY), *tiny_args(
        tmp_path, output_dir="out", train_data_dir=images, max_train_steps=24, checkpointing_steps=5,
        save_images_epochs=1, save_model_epochs=1, use_ema=True, logging_steps=4, resume_from_checkpoint="latest",
        eval_batch_size=8, ddpm_num_inference_steps=40)]  # grids of 40 steps: final saves long enough to hit


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file the run leaves, by path, but its logs (each restart appends to them)."""
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and "logs" not in path.relative_to(folder).parts}


def run_and_kill(argv: list[str], cwd: Path, log: Path, after_seconds: float | None = None,
                 after_final_checkpoint: float | None = None) -> tuple[bool, float | None]:
    """Run `argv`; SIGKILL it `after_seconds` from its start, or that long after it reports the final checkpoint
    (saved, or resumed from with its outputs unwritten): inside the final saves. Whether it was killed, and for a
    run that finished, how long its final saves took: from that report to the checkpoint's mark."""
    start, final_seen, marked = time.perf_counter(), None, None
    mark = cwd / "out" / "checkpoint-24" / ddpm.checkpoint.OUTPUTS_WRITTEN
    with open(log, "w") as output:
        process = subprocess.Popen(argv, cwd=cwd, env={**worker_env(), "PYTHONUNBUFFERED": "1"},  # lines as printed
                                   stdout=output, stderr=subprocess.STDOUT)
        while process.poll() is None:
            now = time.perf_counter()
            if final_seen is None and any(line in log.read_text() for line in FINAL_CHECKPOINT):
                final_seen = now
            if final_seen is not None and marked is None and mark.exists():
                marked = now
            if (after_seconds is not None and now - start >= after_seconds) or (
                    after_final_checkpoint is not None and final_seen is not None
                    and now - final_seen >= after_final_checkpoint):
                process.kill()  # SIGKILL: no handler runs
                process.wait()
                return True, None
            time.sleep(0.02)
    assert process.returncode == 0, log.read_text()[-2000:]
    return False, None if final_seen is None else (marked or time.perf_counter()) - final_seen


def test_killed_at_random_moments_and_restarted_the_run_ends_as_the_uninterrupted_one(tmp_path):
    (tmp_path / "reference").mkdir()
    (tmp_path / "killed").mkdir()
    reference, killed = tmp_path / "reference" / "out", tmp_path / "killed" / "out"
    log = tmp_path / "run.log"
    start = time.perf_counter()
    _, final_saves = run_and_kill(command(tmp_path), reference.parent, log)
    duration = time.perf_counter() - start

    # the same command until it exits 0: first killed at random moments of the first half of a run's time, then
    # at random moments of the first half of its final saves (as long as the uninterrupted run's), then let finish
    rng = random.Random(0)
    during_training = sum(run_and_kill(command(tmp_path), killed.parent, log,
                                       after_seconds=rng.uniform(0, duration / 2))[0] for _ in range(KILLS // 2))
    during_final_saves = sum(run_and_kill(command(tmp_path), killed.parent, log,
                                          after_final_checkpoint=rng.uniform(0, final_saves / 2))[0]
                             for _ in range(KILLS // 2))
    assert not run_and_kill(command(tmp_path), killed.parent, log)[0]
    print(f"[kill] {during_training} kills during training, {during_final_saves} in the final saves "
          f"({final_saves:.1f} s), of a {duration:.1f} s run")
    assert during_training >= 2 and during_final_saves >= 2

    expected, found = folder_bytes(reference), folder_bytes(killed)
    assert sorted(found) == sorted(expected)  # the same files: pipeline, card, grids, checkpoints, no temporaries
    assert [name for name in expected if found[name] != expected[name]] == []  # each bit for bit, the card too

    # started again, the finished run says so in one line and writes nothing
    mtimes = {path: path.stat().st_mtime_ns for path in killed.rglob("*")}
    again = subprocess.run(command(tmp_path), cwd=killed.parent, env=worker_env(), capture_output=True, text=True,
                           check=True)
    assert "is complete: 24 of 24 steps" in again.stdout + again.stderr
    assert {path: path.stat().st_mtime_ns for path in killed.rglob("*")} == mtimes


def test_outputs_left_unwritten_by_a_kill_after_the_checkpoint_are_written_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    argv = tiny_args(tmp_path, output_dir=out, train_data_dir=image_folder(tmp_path / "images", 40, (8, 8)),
                     max_train_steps=10, checkpointing_steps=10, save_images_epochs=1, save_model_epochs=1,
                     resume_from_checkpoint="latest")
    train.main(argv)
    weights = load_pipeline(out)[0].state_dict()
    # as a kill between the final checkpoint and the final saves leaves the folder
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "samples/0001.png"):
        (out / name).unlink()
    (out / "checkpoint-10" / ddpm.checkpoint.OUTPUTS_WRITTEN).unlink()
    train.main(argv)
    assert (out / "samples" / "0001.png").is_file()
    for name, tensor in load_pipeline(out)[0].state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    assert (out / "checkpoint-10" / ddpm.checkpoint.OUTPUTS_WRITTEN).is_file()


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_checkpoint_that_finds_the_disk_full_ends_the_run_with_one_line_and_keeps_the_one_before(
        tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = tiny_args(tmp_path, output_dir=out, max_train_steps=4, checkpointing_steps=2, use_ema=True)
    saved = ddpm.checkpoint.save_file
    calls = []

    def full_from_the_second_checkpoint(tensors, path, *args, **kwargs):
        calls.append(path)
        if "checkpoint-4" in path:
            no_space()
        return saved(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ddpm.checkpoint, "save_file", full_from_the_second_checkpoint)
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    message = str(exit_info.value.code)
    assert message.startswith(f"train.py: error: cannot write checkpoint-4 in {out}: no space left on the device")
    assert "\n" not in message
    assert [path.name for path in list_checkpoints(out)] == ["checkpoint-2"]
    assert load_checkpoint(out / "checkpoint-2", rank=0)["state"]["step"] == 2  # whole and loadable
    assert not [path for path in out.iterdir() if path.name.startswith(".")]  # no half-written folder left


def test_a_pipeline_save_that_finds_the_disk_full_leaves_the_earlier_pipeline_whole(tmp_path, monkeypatch):
    out = tmp_path / "out"
    images = image_folder(tmp_path / "images", 8, (8, 8))  # 2 steps an epoch: a pipeline at steps 2 and 4
    argv = tiny_args(tmp_path, output_dir=out, train_data_dir=images, max_train_steps=4, save_model_epochs=1,
                     save_images_epochs=100, checkpointing_steps=2)
    saved, saves = ddpm.pipeline_io.save_file, []

    def full_at_the_second_save(tensors, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            no_space()
        return saved(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ddpm.pipeline_io, "save_file", full_at_the_second_save)
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert str(exit_info.value.code).startswith(f"train.py: error: cannot write the pipeline in {out}: no space "
                                                "left on the device")
    unet = load_pipeline(out)[0]  # whole: the step-2 pipeline, the weights of checkpoint-2
    step_2 = load_checkpoint(out / "checkpoint-2", rank=0)["model"]
    for name, tensor in unet.state_dict().items():
        assert torch.equal(tensor, step_2[name]), name
    assert not list(out.rglob(".*tmp*"))
