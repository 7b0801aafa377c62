"""evaluate.py: the figures it prints and writes, the noise order across batches and processes, the data it reads,
and its one-line errors. Models are tiny UNets at 8x8 whose scheduler has T = 20, so a run takes seconds."""

import argparse
import contextlib
import importlib.util
import io
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import DDPMScheduler, UNet2DModel, generate, save_pipeline
from ddpm.data import HELD_OUT_SEED, TrainingImages, make_builtin_source
from ddpm.likelihood import VariationalBound, x0_from_pixels
from ddpm.sampling import sampling_scheduler
from ddpm.shapes_score import VALID_RMSE, shapes_score
from oracle import perturb_, single_thread  # noqa: F401  (autouse fixture)

REPO = Path(__file__).resolve().parents[1]
EVALUATE_PY = REPO / "evaluate.py"
_spec = importlib.util.spec_from_file_location("evaluate", EVALUATE_PY)
evaluate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate)

# evaluate.main's @record cannot install its fault handler under pytest's captured output
pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")

TINY_UNET = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                 norm_num_groups=8)
T, SEED = 20, 3


def tiny_pipeline(folder: Path, **scheduler_config) -> tuple[UNet2DModel, DDPMScheduler]:
    torch.manual_seed(0)
    unet = perturb_(UNet2DModel(**TINY_UNET)).eval()
    scheduler = DDPMScheduler(num_train_timesteps=T, **scheduler_config)
    save_pipeline(folder, unet, scheduler)
    return unet, scheduler


def worker_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def held_out_x0(count: int) -> torch.Tensor:
    """The built-in images evaluate.py reads with --builtin_data, as x_0."""
    dataset = TrainingImages(make_builtin_source(8, HELD_OUT_SEED, count), 8, 3, center_crop=True, random_flip=False)
    return x0_from_pixels(torch.stack([dataset[(i, 0)] for i in range(count)]))


def bound_per_image(unet, scheduler, x0: torch.Tensor, generator: torch.Generator, batch_size: int):
    """VariationalBound over x0 in batches of batch_size, all from one generator, in order."""
    bound = VariationalBound(scheduler, "fixed_small")
    return [bound.evaluate(unet, x0[i:i + batch_size], generator) for i in range(0, len(x0), batch_size)]


@pytest.fixture(scope="module")
def bpd_run(tmp_path_factory):
    """evaluate.py on 6 held-out built-in images in batches of 4, with --output_json and --plot: its output."""
    tmp = tmp_path_factory.mktemp("bpd")
    unet, scheduler = tiny_pipeline(tmp / "model")
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        evaluate.main([str(tmp / "model"), "--builtin_data", "--num_images", "6", "--batch_size", "4", "--seed",
                       str(SEED), "--device", "cpu", "--output_json", str(tmp / "figures.json"), "--plot",
                       str(tmp / "plot.png")])
    return unet, scheduler, tmp, output.getvalue()


def test_last_line_gives_bits_per_dim_and_its_terms_over_the_images(bpd_run):
    _, _, tmp, output = bpd_run
    figures = json.loads((tmp / "figures.json").read_text())
    assert output.strip().splitlines()[-1] == (
        f"bits/dim: {figures['bits_per_dim']:.4f} (prior {figures['prior_bpd']:.3g}, decoder L_0 "
        f"{figures['decoder_bpd']:.4f}, KL {figures['kl_bpd']:.4f}) over 6 images")


def test_json_holds_the_terms_and_they_add_up(bpd_run):
    _, _, tmp, _ = bpd_run
    figures = json.loads((tmp / "figures.json").read_text())
    assert set(figures) == {"bits_per_dim", "prior_bpd", "decoder_bpd", "kl_bpd", "num_images", "variance",
                            "per_timestep_bpd"}
    assert (figures["num_images"], figures["variance"], len(figures["per_timestep_bpd"])) == (6, "fixed_small", T)
    assert figures["decoder_bpd"] == figures["per_timestep_bpd"][0]
    assert figures["kl_bpd"] == pytest.approx(sum(figures["per_timestep_bpd"][1:]), rel=1e-12)
    assert figures["bits_per_dim"] == pytest.approx(figures["prior_bpd"] + sum(figures["per_timestep_bpd"]), rel=1e-12)


def test_batches_draw_their_noise_in_order_from_one_generator_seeded_with_seed(bpd_run):
    unet, scheduler, tmp, _ = bpd_run
    figures = json.loads((tmp / "figures.json").read_text())
    terms = bound_per_image(unet, scheduler, held_out_x0(6), torch.Generator().manual_seed(SEED), batch_size=4)
    assert figures["bits_per_dim"] == pytest.approx(torch.cat([t.total for t in terms]).mean().item(), rel=1e-10)
    per_timestep = torch.cat([t.terms for t in terms]).mean(dim=0)
    np.testing.assert_allclose(figures["per_timestep_bpd"], per_timestep.numpy(), rtol=1e-10)


def test_plot_is_written_as_an_image(bpd_run):
    _, _, tmp, _ = bpd_run
    assert Image.open(tmp / "plot.png").size[0] > 100


def run_in_process(argv: list[str], capsys) -> str:
    """evaluate.main(argv) in this process: its standard output."""
    evaluate.main([*argv, "--device", "cpu"])
    return capsys.readouterr().out


def test_variance_defaults_to_the_scheduler_configs_and_can_be_overridden(tmp_path, capsys):
    tiny_pipeline(tmp_path / "model", variance_type="fixed_large_log")
    argv = [str(tmp_path / "model"), "--builtin_data", "--num_images", "2", "--output_json", str(tmp_path / "f.json")]
    run_in_process(argv, capsys)
    large = json.loads((tmp_path / "f.json").read_text())
    run_in_process([*argv, "--variance", "fixed_small"], capsys)
    small = json.loads((tmp_path / "f.json").read_text())
    assert (large["variance"], small["variance"]) == ("fixed_large", "fixed_small")
    assert large["decoder_bpd"] == small["decoder_bpd"] and large["kl_bpd"] != small["kl_bpd"]


def write_parquet_splits(folder: Path, splits: dict[str, int]) -> None:
    """A local Hub-format dataset with `splits[name]` one-colour 12x10 images in each split."""
    datasets = pytest.importorskip("datasets")

    (folder / "data").mkdir(parents=True)
    for split, count in splits.items():
        images = [Image.new("RGB", (12, 10), (40 * i, 100, 200)) for i in range(count)]
        datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()})) \
            .to_parquet(folder / "data" / f"{split}.parquet")


def test_a_hub_dataset_is_read_from_the_split_asked_for(tmp_path, capsys):
    tiny_pipeline(tmp_path / "model")
    write_parquet_splits(tmp_path / "ds", {"train": 3, "test": 2})
    out = run_in_process([str(tmp_path / "model"), "--dataset_name", str(tmp_path / "ds"), "--split", "test",
                          "--num_images", "5"], capsys)
    assert f"Hub dataset {tmp_path / 'ds'} (test): 2 images: evaluating all 2 images" in out
    assert out.strip().splitlines()[-1].endswith("over 2 images")


def test_a_folder_of_images_is_evaluated(tmp_path, capsys):
    tiny_pipeline(tmp_path / "model")
    (tmp_path / "images").mkdir()
    for i in range(3):
        Image.new("RGB", (20, 16), (10, 80 * i, 30)).save(tmp_path / "images" / f"{i}.png")
    out = run_in_process([str(tmp_path / "model"), "--train_data_dir", str(tmp_path / "images")], capsys)
    assert out.strip().splitlines()[-1].endswith("over 3 images")


def test_a_folder_of_idx_files_is_read_from_the_split_asked_for_by_default_the_test_split(tmp_path, capsys):
    from test_idx import write_idx, random_images
    tiny_pipeline(tmp_path / "model")
    write_idx(tmp_path / "idx" / "train-images-idx3-ubyte.gz", random_images(3, size=8), gz=True)
    write_idx(tmp_path / "idx" / "t10k-images-idx3-ubyte.gz", random_images(2, size=8), gz=True)
    for split, count in (("test", 2), ("train", 3), (None, 2)):
        out = run_in_process([str(tmp_path / "model"), "--train_data_dir", str(tmp_path / "idx"), "--num_images", "5",
                              *(["--split", split] if split else [])], capsys)
        assert out.strip().splitlines()[-1].endswith(f"over {count} images")


def test_a_folder_of_idx_files_without_a_test_split_is_read_from_its_train_split_by_default(tmp_path, capsys):
    from test_idx import write_idx, random_images
    tiny_pipeline(tmp_path / "model")
    write_idx(tmp_path / "idx" / "train-images-idx3-ubyte", random_images(3, size=8), gz=False)
    out = run_in_process([str(tmp_path / "model"), "--train_data_dir", str(tmp_path / "idx"), "--num_images", "5"],
                         capsys)
    assert out.strip().splitlines()[-1].endswith("over 3 images")


def test_shapes_metric_prints_the_score_of_the_samples(tmp_path, capsys):
    tiny_pipeline(tmp_path / "model")
    out = run_in_process([str(tmp_path / "model"), "--metric", "shapes", "--num_images", "3", "--num_inference_steps",
                          "2", "--output_json", str(tmp_path / "f.json")], capsys)
    # an untrained model draws noise
    figures = json.loads((tmp_path / "f.json").read_text())
    assert out.strip().splitlines()[-1] == (
        f"shapes score: valid 0.000 (0 of 3), classes 0 of 24, TV to uniform 1.000, median fit RMSE "
        f"{figures['median_rmse']:.1f} over 3 samples (ddpm, 2 denoising steps)")
    assert (figures["valid_fraction"], figures["classes_covered"], figures["num_images"]) == (0.0, 0, 3)
    assert figures["median_rmse"] > VALID_RMSE


@pytest.mark.parametrize("sampler", ["ddim", "dpm", "dpm-sde"])
def test_shapes_metric_with_another_sampler_scores_the_samples_it_draws(tmp_path, capsys, sampler):
    unet, scheduler = tiny_pipeline(tmp_path / "model")
    run_in_process([str(tmp_path / "model"), "--metric", "shapes", "--sampler", sampler, "--num_images", "3",
                    "--num_inference_steps", "4", "--seed", "5", "--output_json", str(tmp_path / "f.json")], capsys)
    figures = json.loads((tmp_path / "f.json").read_text())
    expected = {}
    for name, scheduler_of in ((sampler, sampling_scheduler(sampler, scheduler.config)), ("ddpm", scheduler)):
        expected[name] = shapes_score(generate(unet, scheduler_of, 3, torch.Generator().manual_seed(5), 4)).median_rmse
    assert expected[sampler] != expected["ddpm"]  # the two samplers draw different images from the same noise
    assert (figures["sampler"], figures["num_inference_steps"]) == (sampler, 4)
    assert figures["median_rmse"] == pytest.approx(expected[sampler], abs=1e-4)


def folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def unet_folder(path: Path, **config) -> Path:
    save_pipeline(path, UNet2DModel(**{**TINY_UNET, **config}), DDPMScheduler(num_train_timesteps=T))
    return path


BAD_INPUTS = {
    "folder_without_a_pipeline": lambda tmp: ([str(folder(tmp / "empty")), "--builtin_data"], "unet/config.json"),
    "missing_folder": lambda tmp: ([str(tmp / "no" / "such"), "--builtin_data"], "does not exist"),
    "zero_images": lambda tmp: ([str(unet_folder(tmp / "m")), "--builtin_data", "--num_images", "0"],
                                "--num_images must be at least 1, got 0"),
    "folder_with_no_images": lambda tmp: ([str(unet_folder(tmp / "m")), "--train_data_dir", str(folder(tmp / "d"))],
                                          "no images in --train_data_dir"),
    "resolution_the_levels_cannot_take": lambda tmp: (
        [str(unet_folder(tmp / "m", sample_size=9)), "--builtin_data"], "sample_size 9"),
    "no_sample_size": lambda tmp: ([str(unet_folder(tmp / "m", sample_size=None)), "--builtin_data"],
                                   "no sample_size"),
    "hub_dataset_without_network": lambda tmp: (
        [str(unet_folder(tmp / "m")), "--dataset_name", "ddpm-tests/no-such-dataset"], "(offline?)"),
    "no_data": lambda tmp: ([str(unet_folder(tmp / "m"))], "needs data"),
    "two_datasets": lambda tmp: ([str(unet_folder(tmp / "m")), "--builtin_data", "--dataset_name", "cifar10"],
                                 "--dataset_name and --builtin_data"),
    "plot_with_the_shapes_metric": lambda tmp: ([str(unet_folder(tmp / "m")), "--metric", "shapes", "--plot", "p.png"],
                                                "--plot"),
    "plot_to_an_unknown_format": lambda tmp: ([str(unet_folder(tmp / "m")), "--builtin_data", "--plot", "p.xyz"],
                                              "'p.xyz'"),
    "split_of_a_folder_of_images": lambda tmp: (
        [str(unet_folder(tmp / "m")), "--train_data_dir", str(folder(tmp / "d")), "--split", "test"],
        "a folder of images has no splits"),
    "split_without_a_hub_dataset": lambda tmp: ([str(unet_folder(tmp / "m")), "--builtin_data", "--split", "test"],
                                                "--split 'test'"),
    "more_denoising_steps_than_timesteps": lambda tmp: (
        [str(unet_folder(tmp / "m")), "--metric", "shapes", "--num_inference_steps", "50"], "exceeds the 20"),
    "sampler_with_the_bpd_metric": lambda tmp: ([str(unet_folder(tmp / "m")), "--builtin_data", "--sampler", "ddim"],
                                                "--sampler ddim"),
    "a_schedule_of_one_timestep": lambda tmp: (
        [str(save_pipeline(tmp / "m", UNet2DModel(**TINY_UNET), DDPMScheduler(num_train_timesteps=1)) or tmp / "m"),
         "--builtin_data"], "at least 2 timesteps"),
    "shapes_score_of_a_grey_model": lambda tmp: (
        [str(unet_folder(tmp / "m", in_channels=1, out_channels=1)), "--metric", "shapes"], "1 channel"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_ends_with_a_one_line_error_naming_the_value(case, tmp_path, monkeypatch, capsys):
    argv, value = BAD_INPUTS[case](tmp_path)
    monkeypatch.setattr(sys, "argv", [str(EVALUATE_PY)])  # argparse names the program after argv[0]
    with pytest.raises(SystemExit) as stopped:
        evaluate.main([*argv, "--device", "cpu"])
    code = stopped.value.code
    assert code not in (0, None)
    stderr = capsys.readouterr().err + (code if isinstance(code, str) else "")
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("evaluate.py: error: ") and value in last_line


def test_two_processes_split_the_images_and_gather_the_figures(tmp_path):
    unet, scheduler = tiny_pipeline(tmp_path / "model")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(EVALUATE_PY),
               str(tmp_path / "model"), "--builtin_data", "--num_images", "5", "--batch_size", "2", "--seed",
               str(SEED), "--device", "cpu", "--output_json", str(tmp_path / "f.json")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=worker_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("bits/dim:") == 1  # printed by rank 0 only
    figures = json.loads((tmp_path / "f.json").read_text())
    # rank 0 takes images 0-1 with the generator seeded SEED, rank 1 images 2-4 with its own seed
    x0 = held_out_x0(5)
    rank_1_seed = random.Random(f"evaluate/{SEED}/1").getrandbits(63)
    terms = (bound_per_image(unet, scheduler, x0[:2], torch.Generator().manual_seed(SEED), batch_size=2)
             + bound_per_image(unet, scheduler, x0[2:], torch.Generator().manual_seed(rank_1_seed), batch_size=2))
    assert figures["num_images"] == 5
    assert figures["bits_per_dim"] == pytest.approx(torch.cat([t.total for t in terms]).mean().item(), rel=1e-10)


def test_a_write_that_fails_leaves_the_earlier_json_and_plot_whole_and_prints_the_figures(tmp_path, monkeypatch,
                                                                                        capsys):
    """--output_json and --plot are replaced whole or not at all: a disk that fills halfway through the write
    (simulated) leaves the earlier run's files as they were, with no temporary file beside them; the run prints
    its figures, then ends with one line."""
    out_json, plot = tmp_path / "bpd.json", tmp_path / "bpd.png"
    args = argparse.Namespace(output_json=str(out_json), plot=str(plot))
    draw = lambda values: lambda path: evaluate.plot_bits_per_timestep(values, 0.01, path)  # noqa: E731
    evaluate.write_outputs(args, {"bits_per_dim": 4.06}, "bits/dim: 4.06", plot=draw([1.0, 0.5, 0.25]))
    assert capsys.readouterr().out.splitlines()[-1] == "bits/dim: 4.06"  # the figure is the last line
    before = out_json.read_bytes(), plot.read_bytes()

    real_write_text = Path.write_text

    def half_then_full_disk(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    from matplotlib.figure import Figure

    def half_a_png(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    full = f"^evaluate.py: error: cannot write bpd.{{}} in {re.escape(str(tmp_path))}: no space left on the device$"
    monkeypatch.setattr(Figure, "savefig", half_a_png)
    with pytest.raises(SystemExit, match=full.format("png")):  # the JSON written, then the plot fails
        evaluate.write_outputs(args, {"bits_per_dim": 3.98}, "bits/dim: 3.98", plot=draw([2.0, 1.0, 0.5]))
    assert capsys.readouterr().out.splitlines()[-1] == "bits/dim: 3.98"
    monkeypatch.setattr(Path, "write_text", half_then_full_disk)
    with pytest.raises(SystemExit, match=full.format("json")):
        evaluate.write_outputs(args, {"bits_per_dim": 3.97, "per_timestep": list(range(100))}, "bits/dim: 3.97")
    assert capsys.readouterr().out.splitlines()[-1] == "bits/dim: 3.97"
    assert json.loads(out_json.read_text()) == {"bits_per_dim": 3.98} and plot.read_bytes() == before[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bpd.json", "bpd.png"]
