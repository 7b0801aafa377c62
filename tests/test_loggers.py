"""--logger tensorboard|wandb: the same scalars and grids, written inside output_dir.

wandb runs offline (WANDB_MODE=offline), its settings and caches in tmp_path: no test touches the network.
"""

import contextlib
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ddpm.presets import PRESETS
from oracle import single_thread  # noqa: F401  (autouse fixture)
from test_train import TRAIN_PY, image_folder, own_signal_handlers, tiny_args, train

SCALARS = {"train/loss", "train/lr", "train/grad_norm", "train/images_per_s", "train/skipped_steps"}


@contextlib.contextmanager
def offline_wandb(home: Path):
    """wandb without network, its settings and caches in `home`; records each run.log and each wandb.init config."""
    wandb = pytest.importorskip("wandb")  # an optional extra: its tests are skipped where it is not installed
    recorded = SimpleNamespace(logs=[], configs=[])  # logs: (run id, step, data)
    log, init = wandb.Run.log, wandb.init

    def recording_log(run, data, step=None, **kwargs):
        recorded.logs.append((run.id, step, dict(data)))
        return log(run, data, step=step, **kwargs)

    def recording_init(**kwargs):
        recorded.configs.append(kwargs["config"])
        return init(**kwargs)

    with pytest.MonkeyPatch.context() as monkeypatch:
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            monkeypatch.setenv(name, str(home))
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setattr(wandb.Run, "log", recording_log)
        monkeypatch.setattr(wandb, "init", recording_init)
        yield recorded


@pytest.fixture
def wandb_offline(tmp_path):
    with offline_wandb(tmp_path / "wandb-home") as recorded:
        yield recorded


def wandb_run(tmp_path: Path, **options) -> Path:
    """4 steps on 8 images in batches of 4, logging each step: a grid at the end of each epoch (steps 2 and 4)."""
    images = tmp_path / "images"
    if not images.exists():
        image_folder(images, 8)
    options = {"max_train_steps": 4, **options}
    train.main(tiny_args(tmp_path, train_data_dir=images, logging_steps=1, save_images_epochs=1, logger="wandb",
                         **options))
    return tmp_path / "out"


def run_folders(out: Path) -> list[Path]:
    return sorted((out / "logs" / "wandb").glob("offline-run-*"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """(output folder, what wandb recorded) of a finished run with --logger wandb, offline."""
    tmp_path = tmp_path_factory.mktemp("wandb")
    with own_signal_handlers(), offline_wandb(tmp_path / "wandb-home") as recorded:
        return wandb_run(tmp_path, hub_token="hf_secret"), recorded


def test_wandb_offline_writes_its_run_inside_output_dir(finished_run):
    out, _ = finished_run
    [folder] = run_folders(out)
    run_id = (out / "logs" / "wandb_run_id").read_text()
    assert folder.name.endswith(f"-{run_id}") and (folder / f"run-{run_id}.wandb").stat().st_size > 0
    assert not (out.parent / "wandb").exists() and not (Path.cwd() / "wandb").exists()


def test_wandb_gets_the_scalars_tensorboard_gets_at_each_logging_step(finished_run):
    _, recorded = finished_run
    scalars = [(step, set(data)) for _, step, data in recorded.logs if "samples" not in data]
    assert scalars == [(1, SCALARS), (2, SCALARS), (3, SCALARS), (4, SCALARS)]


def test_wandb_gets_the_sample_grids_as_saved(finished_run):
    out, recorded = finished_run
    grids = [(step, data["samples"]) for _, step, data in recorded.logs if "samples" in data]
    assert [step for step, _ in grids] == [2, 4]
    saved = [np.asarray(Image.open(out / "samples" / name)) for name in ("0001.png", "0002.png")]
    for (_, logged), grid in zip(grids, saved):
        np.testing.assert_array_equal(np.asarray(logged.image), grid)
    assert len(list(run_folders(out)[0].glob("files/media/images/samples_*.png"))) == 2


def test_wandb_config_is_the_runs_arguments_without_the_hub_token(finished_run):
    _, recorded = finished_run
    [config] = recorded.configs
    # the default preset's learning rate, and the max_train_steps the run was given
    assert config["max_train_steps"] == 4 and config["learning_rate"] == PRESETS["quickstart"]["learning_rate"]
    assert config["logger"] == "wandb"
    assert "hub_token" not in config


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, wandb_offline):
    out = wandb_run(tmp_path, max_train_steps=2)
    wandb_run(tmp_path, resume_from_checkpoint="latest", output_dir=out)
    first, resumed = run_folders(out)
    run_id = (out / "logs" / "wandb_run_id").read_text()
    # wandb names a run's folder run-<time>-<id>, adding -1 when a resume starts within the same second
    assert all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", run.name) for run in (first, resumed))
    assert {run for run, _, _ in wandb_offline.logs} == {run_id}
    assert [step for _, step, data in wandb_offline.logs if "samples" not in data] == [1, 2, 3, 4]


def test_a_new_run_in_the_same_folder_starts_a_new_wandb_run(tmp_path, wandb_offline):
    out = wandb_run(tmp_path)
    wandb_run(tmp_path)
    assert len({run for run, _, _ in wandb_offline.logs}) == 2 and len(run_folders(out)) == 2


def test_wandb_not_installed_is_a_one_line_error_naming_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails
    monkeypatch.setattr(sys, "argv", [str(TRAIN_PY)])
    with pytest.raises(SystemExit):
        train.parse_args(["--logger", "wandb"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "train.py: error: --logger wandb needs the wandb package, which is not installed: pip install -e '.[wandb]'")


def test_wandb_that_cannot_start_stops_the_run_with_one_line_before_training(tmp_path, wandb_offline, monkeypatch):
    wandb = pytest.importorskip("wandb")

    def refuse(**kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.raises(SystemExit) as stopped:
        wandb_run(tmp_path)
    assert stopped.value.code == ("train.py: error: wandb could not start: No API key configured. Use `wandb login` "
                                  "to log in. (`wandb login`, or WANDB_MODE=offline to log without network)")
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_tensorboard_gets_the_sample_grids(tmp_path):
    train.main(tiny_args(tmp_path, train_data_dir=image_folder(tmp_path / "images", 8), max_train_steps=4,
                         save_images_epochs=1))
    events = EventAccumulator(str(tmp_path / "out" / "logs"))
    events.Reload()
    assert [event.step for event in events.Images("samples")] == [2, 4]
    assert SCALARS <= set(events.Tags()["scalars"])
