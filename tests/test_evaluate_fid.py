"""evaluate.py --metric fid: two folders, a model's samples against its data, the cache, torchrun, and the errors.

The network is the tiny TorchScript module of tests/fid_helpers.py, passed as --inception; models are tiny UNets at
8x8 with T = 20, sampled in 5 steps.
"""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import DDPMScheduler, UNet2DModel, generate, save_pipeline
from ddpm.data import TrainingImages, make_builtin_source
from ddpm.fid import kernel_inception_distance, quantize
from ddpm.inception import resize
from ddpm.sampling import image_generators
from fid_helpers import ACTIVE, save_tiny_inception, write_images
from oracle import ImportedAtFirstUse, perturb_, single_thread  # noqa: F401  (autouse fixture)

scipy = ImportedAtFirstUse("scipy")  # the reference FID's matrix square root: skipped without scipy

REPO = Path(__file__).resolve().parents[1]
EVALUATE_PY = REPO / "evaluate.py"
_spec = importlib.util.spec_from_file_location("evaluate", EVALUATE_PY)
evaluate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate)

pytestmark = [pytest.mark.filterwarnings("ignore:Unable to enable fault handler"),  # evaluate.main's @record
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated"),  # the tiny network's
              pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")]

TINY_UNET = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                 norm_num_groups=8)
T, STEPS, SEED = 20, 5, 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """Folders A (10 images, every fourth grey) and B (12 images), a tiny network, a tiny model, a cache."""
    tmp = tmp_path_factory.mktemp("fid")
    write_images(tmp / "A", 10, seed=1, grey_every=4)
    write_images(tmp / "B", 12, seed=2, size=(9, 11), offset=40)
    torch.manual_seed(0)
    save_pipeline(tmp / "model", perturb_(UNet2DModel(**TINY_UNET)).eval(), DDPMScheduler(num_train_timesteps=T))
    return {"tmp": tmp, "A": tmp / "A", "B": tmp / "B", "net": save_tiny_inception(tmp / "tiny.pt"),
            "model": tmp / "model", "cache": tmp / "cache"}


def run(setup: dict[str, Path], argv: list[str], capsys, json_name: str = "f.json") -> tuple[dict, str]:
    """evaluate.py with the tiny network, on the CPU: its JSON and its standard output."""
    path = setup["tmp"] / json_name
    evaluate.main([*argv, "--inception", str(setup["net"]), "--fid_cache", str(setup["cache"]), "--device", "cpu",
                   "--output_json", str(path)])
    return json.loads(path.read_text()), capsys.readouterr().out


def two_folders(setup, capsys, *extra: str) -> tuple[dict, str]:
    return run(setup, ["--metric", "fid", "--images", str(setup["A"]), "--reference", str(setup["B"]), *extra],
               capsys)


def independent_features(folder: Path, network_path: Path, mode: str = "legacy_tensorflow") -> np.ndarray:
    """Each PNG read with PIL as RGB, resized, scaled to (p - 128) / 128 and through the network, in float64."""
    network = torch.jit.load(network_path)
    rows = []
    for path in sorted(folder.glob("*.png")):
        pixels = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)
        rows.append(network((resize(pixels[None], mode) - 128) / 128)[0].detach().double().numpy())
    return np.stack(rows)


def fid_with_sqrtm(x: np.ndarray, y: np.ndarray) -> float:
    """pytorch-fid's formula in float64; the covariances' product square-rooted by scipy over the varying block."""
    diff = x.mean(axis=0) - y.mean(axis=0)
    sigma_x, sigma_y = np.cov(x[:, :ACTIVE], rowvar=False), np.cov(y[:, :ACTIVE], rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma_x @ sigma_y).real
    return float(diff @ diff + np.trace(sigma_x) + np.trace(sigma_y) - 2 * np.trace(covmean))


def test_folder_against_folder_fid_equals_an_independent_float64_computation(setup, capsys):
    figures, _ = two_folders(setup, capsys)
    x, y = independent_features(setup["A"], setup["net"]), independent_features(setup["B"], setup["net"])
    assert (x[:, ACTIVE:] == 0).all() and (y[:, ACTIVE:] == 0).all()  # the rest of the 2048 add nothing
    assert figures["fid"] == pytest.approx(fid_with_sqrtm(x, y), rel=1e-6)
    assert (figures["kid_mean"], figures["kid_std"]) == pytest.approx(kernel_inception_distance(x, y), rel=1e-5)
    assert (figures["num_images"], figures["num_reference"], figures["kid_subset_size"]) == (10, 12, 10)


def test_json_holds_the_figures_and_what_they_were_computed_with(setup, capsys):
    figures, out = two_folders(setup, capsys)
    assert {"fid", "kid_mean", "kid_std", "num_images", "num_reference", "reference", "resize",
            "inception"} <= set(figures)
    assert figures["inception"] == hashlib.sha256(setup["net"].read_bytes()).hexdigest()
    assert figures["resize"] == figures["reference"]["resize"] == "legacy_tensorflow"
    assert figures["reference"]["data"] == f"imagefolder {setup['B'].resolve()}"
    assert Path(figures["reference"]["path"]).parent == setup["cache"]
    assert out.strip().splitlines()[-1].startswith(f"FID {figures['fid']:.3f}, KID {figures['kid_mean']:.5f} +- ")


def test_the_resize_changes_the_figure_and_is_recorded(setup, capsys):
    tf1, _ = two_folders(setup, capsys)
    clean, _ = two_folders(setup, capsys, "--resize", "clean")
    x, y = (independent_features(setup[k], setup["net"], "clean") for k in "AB")
    assert clean["fid"] == pytest.approx(fid_with_sqrtm(x, y), rel=1e-6) and clean["fid"] != tf1["fid"]
    assert (clean["resize"], clean["reference"]["resize"]) == ("clean", "clean")


def test_the_cached_npz_as_reference_gives_the_same_figures(setup, capsys):
    from_folder, _ = two_folders(setup, capsys)
    npz = from_folder["reference"]["path"]
    from_npz, _ = run(setup, ["--metric", "fid", "--images", str(setup["A"]), "--reference", npz], capsys)
    assert (from_npz["fid"], from_npz["kid_mean"]) == (from_folder["fid"], from_folder["kid_mean"])


def test_a_pytorch_fid_npz_gives_the_fid_and_no_kid(setup, capsys):
    from_folder, _ = two_folders(setup, capsys)
    with np.load(from_folder["reference"]["path"]) as f:
        np.savez(setup["tmp"] / "pytorch_fid.npz", mu=f["mu"], sigma=f["sigma"])
    figures, out = run(setup, ["--metric", "fid", "--images", str(setup["A"]), "--reference",
                               str(setup["tmp"] / "pytorch_fid.npz")], capsys)
    assert figures["fid"] == pytest.approx(from_folder["fid"], rel=1e-12)
    assert figures["kid_mean"] is None and "KID n/a" in out


def samples_as_sample_py_draws_them(model: Path, count: int, batch_size: int, folder: Path) -> None:
    """Image i from its own generator seeded from (SEED, i), as sample.py --outdir, saved as PNG."""
    from ddpm import load_pipeline
    unet, scheduler = load_pipeline(model)
    folder.mkdir(exist_ok=True)
    for start in range(0, count, batch_size):
        indices = list(range(start, min(start + batch_size, count)))
        images = quantize(generate(unet, scheduler, len(indices), image_generators(SEED, indices), STEPS))
        for i, image in zip(indices, images):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:06d}.png")


def test_a_models_fid_is_the_fid_of_its_samples_drawn_as_sample_py_draws_them(setup, capsys):
    card = "# model\n\nA DDPM UNet at 8x8, trained on shapes; step 1,200 of 5,000.\n"  # as train.py writes it
    (setup["model"] / "README.md").write_text(card)
    figures, out = run(setup, [str(setup["model"]), "--metric", "fid", "--reference", str(setup["B"]), "--num_images",
                               "6", "--batch_size", "4", "--num_inference_steps", str(STEPS), "--seed", str(SEED)],
                       capsys)
    samples_as_sample_py_draws_them(setup["model"], 6, 4, setup["tmp"] / "samples")
    x, y = independent_features(setup["tmp"] / "samples", setup["net"]), independent_features(setup["B"], setup["net"])
    assert figures["fid"] == pytest.approx(fid_with_sqrtm(x, y), rel=1e-6)
    assert (figures["sampler"], figures["steps"], figures["seed"], figures["model_step"]) == ("ddpm", STEPS, SEED, 1200)
    assert "6 samples (ddpm, 5 steps, seed 3)" in out.strip().splitlines()[-1]


def test_a_models_fid_against_its_data_uses_the_training_images_at_its_resolution_cached(setup, capsys):
    argv = [str(setup["model"]), "--metric", "fid", "--builtin_data", "--num_reference", "10", "--num_images", "4",
            "--num_inference_steps", str(STEPS)]
    first, out = run(setup, argv, capsys)
    assert "computed and cached" in out
    dataset = TrainingImages(make_builtin_source(8, 0, 10), 8, 3, center_crop=True, random_flip=False)
    network = torch.jit.load(setup["net"])
    pixels = torch.stack([dataset.decoded(i) for i in range(10)])  # the 2,048 train.py draws begin with these
    expected = network((resize(pixels, "legacy_tensorflow") - 128) / 128).detach().double().numpy().mean(axis=0)
    with np.load(first["reference"]["path"]) as f:
        np.testing.assert_allclose(f["mu"], expected, rtol=1e-5, atol=1e-7)
    assert (first["reference"]["data"], first["reference"]["resolution"]) == ("built-in shapes, seed 0", 8)
    second, out = run(setup, argv, capsys)
    assert "from the cache" in out and second["fid"] == first["fid"]


def test_a_grey_models_fid_uses_the_train_split_of_an_idx_folder_repeated_to_three_channels(setup, capsys):
    from test_idx import random_images, write_idx
    train, test = random_images(9, size=8, seed=1), random_images(4, size=8, seed=2)
    write_idx(setup["tmp"] / "idx" / "train-images-idx3-ubyte.gz", train, gz=True)
    write_idx(setup["tmp"] / "idx" / "t10k-images-idx3-ubyte.gz", test, gz=True)
    torch.manual_seed(0)
    grey = dict(TINY_UNET, in_channels=1, out_channels=1)
    save_pipeline(setup["tmp"] / "grey", perturb_(UNet2DModel(**grey)).eval(), DDPMScheduler(num_train_timesteps=T))
    argv = [str(setup["tmp"] / "grey"), "--metric", "fid", "--train_data_dir", str(setup["tmp"] / "idx"),
            "--num_images", "3", "--num_inference_steps", str(STEPS)]
    figures, _ = run(setup, argv, capsys)
    reference = figures["reference"]
    assert (reference["split"], reference["channels"], figures["num_reference"]) == ("train", 1, 9)
    network = torch.jit.load(setup["net"])
    pixels = torch.from_numpy(train)[:, None].repeat(1, 3, 1, 1)  # each grey pixel in all three channels
    expected = network((resize(pixels, "legacy_tensorflow") - 128) / 128).detach().double().numpy().mean(axis=0)
    with np.load(figures["reference"]["path"]) as f:
        np.testing.assert_allclose(f["mu"], expected, rtol=1e-5, atol=1e-7)


def test_two_processes_give_the_figures_of_one(setup, capsys):
    argv = [str(setup["model"]), "--metric", "fid", "--reference", str(setup["B"]), "--num_images", "5",
            "--batch_size", "2", "--num_inference_steps", str(STEPS), "--seed", str(SEED)]
    one, _ = run(setup, argv, capsys)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(EVALUATE_PY),
               *argv, "--inception", str(setup["net"]), "--fid_cache", str(setup["cache"]), "--device", "cpu",
               "--output_json", str(setup["tmp"] / "two.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert sum(line.startswith("FID ") for line in result.stdout.splitlines()) == 1  # printed by rank 0 only
    two = json.loads((setup["tmp"] / "two.json").read_text())
    assert (two["fid"], two["kid_mean"], two["num_images"]) == (one["fid"], one["kid_mean"], 5)


def npz_of_another_resize(tmp: Path) -> str:
    np.savez(tmp / "other.npz", mu=np.zeros(2048), sigma=np.eye(2048), data="x", split="", count=2, resolution=0,
             channels=3, resize="clean", network="0" * 64, fingerprint="")
    return str(tmp / "other.npz")


BAD_INPUTS = {
    "images_without_reference": lambda s: (["--metric", "fid", "--images", str(s["A"])],
                                           "--images A needs --reference"),
    "images_with_a_model": lambda s: ([str(s["model"]), "--metric", "fid", "--images", str(s["A"]), "--reference",
                                       str(s["B"])], "it takes no MODEL_DIR"),
    "no_reference": lambda s: ([str(s["model"]), "--metric", "fid"], "--metric fid needs a reference"),
    "two_references": lambda s: ([str(s["model"]), "--metric", "fid", "--reference", str(s["B"]), "--builtin_data"],
                                 "--reference and --builtin_data both name the reference"),
    "missing_reference": lambda s: ([str(s["model"]), "--metric", "fid", "--reference", str(s["tmp"] / "none")],
                                    "no such folder or file"),
    "fid_flag_with_bpd": lambda s: ([str(s["model"]), "--builtin_data", "--reference", str(s["B"])],
                                    "--reference goes with --metric fid"),
    "one_sample": lambda s: ([str(s["model"]), "--metric", "fid", "--reference", str(s["B"]), "--num_images", "1"],
                             "at least 2 for fid"),
    "no_model": lambda s: (["--metric", "fid", "--builtin_data"], "MODEL_DIR is missing"),
    "npz_of_another_resize": lambda s: (["--metric", "fid", "--images", str(s["A"]), "--reference",
                                         npz_of_another_resize(s["tmp"])],
                                        "compare only within one network and resize"),
    "npz_without_statistics": lambda s: (["--metric", "fid", "--images", str(s["A"]), "--reference",
                                          str(np.savez(s["tmp"] / "empty.npz", x=0) or s["tmp"] / "empty.npz")],
                                         "has no mu and sigma"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_ends_with_a_one_line_error_naming_the_value(case, setup, monkeypatch, capsys):
    argv, value = BAD_INPUTS[case](setup)
    monkeypatch.setattr(sys, "argv", [str(EVALUATE_PY)])  # argparse names the program after argv[0]
    with pytest.raises(SystemExit) as stopped:
        evaluate.main([*argv, "--inception", str(setup["net"]), "--fid_cache", str(setup["cache"]), "--device", "cpu"])
    code = stopped.value.code
    assert code not in (0, None)
    stderr = capsys.readouterr().err + (code if isinstance(code, str) else "")
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("evaluate.py: error: ") and value in last_line


def test_an_inception_path_that_is_no_file_is_a_one_line_error(setup, monkeypatch, capsys):
    with pytest.raises(SystemExit) as stopped:
        evaluate.main(["--metric", "fid", "--images", str(setup["A"]), "--reference", str(setup["B"]),
                       "--inception", str(setup["tmp"] / "missing.pt"), "--device", "cpu"])
    assert "evaluate.py: error: --inception" in str(stopped.value.code) and "no such file" in str(stopped.value.code)
