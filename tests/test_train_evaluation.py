"""What train.py measures about the model it trains: the shapes score of each sample grid on the built-in data,
and with --eval_bpd_images an estimate of bits/dim at each pipeline save."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ddpm import generate, load_pipeline
from ddpm.data import HELD_OUT_SEED, make_builtin_source
from ddpm.idx import IdxSource
from ddpm.likelihood import VariationalBound, estimate_bits_per_dim, images_as_x0
from ddpm.shapes_score import VALID_RMSE, shapes_score
from oracle import single_thread  # noqa: F401  (autouse fixture)
from test_idx import idx_folder
from train_script import TRAIN_PY, own_signal_handlers, train


# train.main's @record cannot install its fault handler under pytest's captured output
pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")

TINY_UNET = {"block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "UpBlock2D"], "layers_per_block": 1, "norm_num_groups": 8}


def run(tmp_path: Path, *extra: str) -> Path:
    """Two steps of a tiny CPU run on 8x8 images, ending with a grid of 2 samples and a pipeline save."""
    (tmp_path / "unet.json").write_text(json.dumps(TINY_UNET))
    train.main(["--model_config_name_or_path", str(tmp_path / "unet.json"), "--output_dir", str(tmp_path / "out"),
                "--resolution", "8", "--train_batch_size", "4", "--eval_batch_size", "2",
                "--ddpm_num_inference_steps", "2", "--max_train_steps", "2", "--device", "cpu", "--score_images", "0",
                *extra])
    return tmp_path / "out"


def scalars(output_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(output_dir / "logs"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_builtin_run_logs_the_shapes_score_of_each_grid_and_prints_the_last(tmp_path, capsys):
    logged = scalars(run(tmp_path))
    # two steps of training draw noise: no sample is valid
    assert logged["samples/shapes_valid_fraction"] == [(2, 0.0)]
    assert logged["samples/shapes_classes_covered"] == [(2, 0.0)]
    assert logged["samples/shapes_tv_to_uniform"] == [(2, 1.0)]
    [(step, median_rmse)] = logged["samples/shapes_median_rmse"]
    assert step == 2 and median_rmse > VALID_RMSE
    assert "shapes score of the last sample grid: valid 0.000 (0 of 2), classes 0 of 24" in capsys.readouterr().out


def test_eval_bpd_images_logs_the_estimate_of_the_saved_model_on_held_out_images(tmp_path, capsys):
    output_dir = run(tmp_path, "--eval_bpd_images", "3")
    unet, scheduler = load_pipeline(output_dir)
    held_out = images_as_x0(make_builtin_source(8, HELD_OUT_SEED, 3), 8, 3, 3)
    expected = estimate_bits_per_dim(unet, VariationalBound(scheduler, "fixed_small"), held_out, seed=0)
    [(step, value)] = scalars(output_dir)["eval/bpd_estimate"]
    assert step == 2 and value == pytest.approx(expected, rel=1e-6)
    assert f"step 2: bits/dim estimate {expected:.4f} on 3 held-out images" in capsys.readouterr().out


def test_on_an_image_folder_the_estimate_is_on_training_images_and_tagged_so(tmp_path):
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
    logged = scalars(run(tmp_path, "--train_data_dir", str(tmp_path / "images"), "--eval_bpd_images", "2"))
    assert [step for step, _ in logged["eval/bpd_estimate_on_training_images"]] == [2]
    assert "eval/bpd_estimate" not in logged and "samples/shapes_valid_fraction" not in logged


def test_on_an_idx_folder_the_estimate_is_on_its_test_split(tmp_path, capsys):
    folder, _, _ = idx_folder(tmp_path / "idx")
    output_dir = run(tmp_path, "--train_data_dir", str(folder), "--eval_bpd_images", "2")
    unet, scheduler = load_pipeline(output_dir)
    test_images = images_as_x0(IdxSource(str(folder), "test"), 8, 3, 2)
    expected = estimate_bits_per_dim(unet, VariationalBound(scheduler, "fixed_small"), test_images, seed=0)
    [(step, value)] = scalars(output_dir)["eval/bpd_estimate"]
    assert step == 2 and value == pytest.approx(expected, rel=1e-6)
    assert f"bits/dim estimate {expected:.4f} on 2 test-split images" in capsys.readouterr().out


def test_a_negative_eval_bpd_images_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(TRAIN_PY)])
    with pytest.raises(SystemExit):
        run(tmp_path, "--eval_bpd_images", "-1")
    assert capsys.readouterr().err.strip().splitlines()[-1] == "train.py: error: --eval_bpd_images must be >= 0, got -1"


@pytest.fixture(scope="module")
def trained_and_untrained(tmp_path_factory):
    """A tiny model trained 500 steps on the built-in data at 8 px, and the same UNet untrained.

    T = 20 keeps the exact bound and sampling cheap; the cosine schedule takes x_T to noise even with so few
    steps (the linear betas of 1e-4..0.02 would leave alpha_bar_T = 0.82); 500 steps learn colours and shapes."""
    tmp_path = tmp_path_factory.mktemp("trained")
    with own_signal_handlers():  # this module-scoped fixture runs before restore_signal_handlers saves them
        output_dir = run(tmp_path, "--max_train_steps", "500", "--train_batch_size", "16", "--learning_rate", "2e-3",
                         "--ddpm_num_steps", "20", "--ddpm_beta_schedule", "squaredcos_cap_v2",
                         "--checkpointing_steps", "1000")
    trained, scheduler = load_pipeline(output_dir)
    torch.manual_seed(0)
    return trained, type(trained)(**trained.config).eval(), scheduler


def test_a_trained_model_has_a_lower_bound_in_bits_per_dim_than_an_untrained_one(trained_and_untrained):
    trained, untrained, scheduler = trained_and_untrained
    bound = VariationalBound(scheduler, "fixed_small")
    held_out = images_as_x0(make_builtin_source(8, HELD_OUT_SEED, 8), 8, 3, 8)

    def bits_per_dim(model):
        return bound.evaluate(model, held_out, torch.Generator().manual_seed(0)).total.mean().item()

    assert bits_per_dim(trained) < 0.8 * bits_per_dim(untrained)


def test_a_trained_models_samples_fit_the_shapes_far_better_than_an_untrained_ones(trained_and_untrained):
    trained, untrained, scheduler = trained_and_untrained

    def median_rmse(model):
        return shapes_score(generate(model, scheduler, 32, torch.Generator().manual_seed(0), 20)).median_rmse

    # measured: 56 against 118 levels; 500 steps draw no valid shape yet, but coloured blobs on flat backgrounds
    assert median_rmse(trained) < 0.6 * median_rmse(untrained)


def test_score_images_prints_logs_and_cards_the_score_of_that_many_samples(tmp_path, capsys):
    output_dir = run(tmp_path, "--score_images", "5")
    unet, scheduler = load_pipeline(output_dir)  # the weights the samples were drawn from (EMA)
    expected = shapes_score(generate(unet, scheduler, 5, torch.Generator().manual_seed(1), 2))
    logged = scalars(output_dir)
    assert logged["eval/shapes_valid_fraction"] == [(2, 0.0)]
    [(step, median_rmse)] = logged["eval/shapes_median_rmse"]
    assert step == 2 and median_rmse == pytest.approx(expected.median_rmse, rel=1e-5)
    assert f"shapes score of 5 samples (ddpm, 2 steps): {expected}" in capsys.readouterr().out
    assert "shapes score: valid fraction of 5 samples" in (output_dir / "README.md").read_text()
