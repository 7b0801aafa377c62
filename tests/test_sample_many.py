"""sample.py with --sampler ddim, and its many-images mode (--outdir without --output): image i fixed by
(seed, i) whatever the batch size or number of processes, a 2-process torchrun, resuming a stopped run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import DDIMScheduler, DDPMScheduler, UNet2DModel, generate
from ddpm.sampling import image_generators
from oracle import MICRO, diffusers, diffusers_unet, single_thread  # noqa: F401  (autouse fixture)

REPO = Path(__file__).resolve().parents[1]
SAMPLE_PY = REPO / "sample.py"
SEED, NUM_IMAGES, STEPS = 3, 5, 10


def run_sample(*args: str, launcher: list[str] | None = None, cwd: Path = REPO,
               **env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, *(["-m", "torch.distributed.run", *launcher] if launcher else []), str(SAMPLE_PY), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A DDPMPipeline folder of diffusers' perturbed MICRO UNet."""
    directory = tmp_path_factory.mktemp("model")
    diffusers.DDPMPipeline(unet=diffusers_unet(MICRO), scheduler=diffusers.DDPMScheduler()).save_pretrained(directory)
    return directory


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def reference_pixels(model_dir: Path, indices, steps: int = STEPS, scheduler=None) -> list[np.ndarray]:
    """Image i drawn alone (a batch of one) with its (seed, i) generator, as the PNG holds it."""
    unet = UNet2DModel(**MICRO)
    unet.load_state_dict(diffusers.UNet2DModel.from_pretrained(model_dir / "unet").state_dict())
    images = [generate(unet, scheduler or DDPMScheduler(), 1, image_generators(SEED, [i]), steps)[0] for i in indices]
    return [(image * 255).round().permute(1, 2, 0).numpy().astype(int) for image in images]


def many_images_args(model_dir: Path, outdir: Path, batch_size: int) -> list[str]:
    return [str(model_dir), "--num_images", str(NUM_IMAGES), "--seed", str(SEED), "--num_inference_steps", str(STEPS),
            "--batch_size", str(batch_size), "--device", "cpu", "--outdir", str(outdir)]


def assert_equal_up_to_batch_rounding(actual: np.ndarray, expected: np.ndarray) -> None:
    # a batched forward pass rounds differently from a batch of one: a value may differ by 1/255
    assert np.abs(actual - expected).max() <= 1
    assert (actual == expected).mean() >= 0.99


@pytest.fixture(scope="module")
def one_process_run(model_dir, tmp_path_factory) -> Path:
    outdir = tmp_path_factory.mktemp("one") / "samples"
    result = run_sample(*many_images_args(model_dir, outdir, batch_size=2), cwd=outdir.parent)
    assert result.returncode == 0, result.stderr
    return outdir


def test_many_images_mode_writes_one_png_per_image_its_settings_and_no_grid(one_process_run):
    pngs = [f"{i:06d}.png" for i in range(NUM_IMAGES)]
    assert sorted(os.listdir(one_process_run)) == pngs + ["sample_settings.json"]
    assert os.listdir(one_process_run.parent) == ["samples"]  # the working directory: no grid.png


def test_image_i_is_fixed_by_seed_and_i_whatever_the_batch_size(one_process_run, model_dir):
    # drawn in batches of 2 by sample.py, alone here
    for i, expected in enumerate(reference_pixels(model_dir, range(NUM_IMAGES))):
        assert_equal_up_to_batch_rounding(pixels(one_process_run / f"{i:06d}.png"), expected)


def test_two_torchrun_processes_draw_the_images_one_process_draws(one_process_run, model_dir, tmp_path):
    outdir = tmp_path / "samples"
    result = run_sample(*many_images_args(model_dir, outdir, batch_size=3),
                        launcher=["--standalone", "--nproc_per_node=2"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(os.listdir(outdir)) == sorted(os.listdir(one_process_run))
    for name in (path.name for path in outdir.glob("*.png")):
        assert_equal_up_to_batch_rounding(pixels(outdir / name), pixels(one_process_run / name))


def test_a_stopped_run_started_again_draws_only_the_missing_images(model_dir, tmp_path):
    outdir, steps, count = tmp_path / "samples", 100, 6
    args = [str(model_dir), "--num_images", str(count), "--seed", str(SEED), "--num_inference_steps", str(steps),
            "--batch_size", "1", "--sampler", "ddim", "--device", "cpu", "--outdir", str(outdir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([sys.executable, str(SAMPLE_PY), *args], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list(outdir.glob("*.png")) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        run.send_signal(signal.SIGKILL)  # stopped with no chance to clean up
    finally:
        run.kill()
        run.wait()
    written = {path.name: path.stat().st_mtime_ns for path in outdir.glob("*.png")}
    assert 1 <= len(written) < count, "the run was not stopped midway"
    (outdir / ".000005.png.tmp-12345").write_bytes(b"\x89PNG half")  # as a kill during a write leaves it

    result = subprocess.run([sys.executable, str(SAMPLE_PY), *args], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{len(written)} of {count} images already in" in result.stderr
    assert sorted(os.listdir(outdir)) == [f"{i:06d}.png" for i in range(count)] + ["sample_settings.json"]
    assert {name: (outdir / name).stat().st_mtime_ns for name in written} == written  # not drawn again
    for i, expected in enumerate(reference_pixels(model_dir, range(count), steps, DDIMScheduler())):
        assert np.array_equal(pixels(outdir / f"{i:06d}.png"), expected), f"image {i}"


def test_continuing_a_folder_with_another_seed_is_a_one_line_error(one_process_run, model_dir):
    result = run_sample(*many_images_args(model_dir, one_process_run, batch_size=2), "--seed", str(SEED + 1))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"sample.py: error: {one_process_run}/ holds images drawn with other settings")


def test_ddim_grid_equals_ddim_pipeline_with_its_default_50_steps(model_dir, tmp_path):
    result = run_sample(str(model_dir), "--sampler", "ddim", "--eta", "0.5", "--num_images", "3", "--seed", str(SEED),
                        "--device", "cpu", "--output", str(tmp_path / "grid.png"), "--outdir", str(tmp_path / "single"))
    assert result.returncode == 0, result.stderr
    pipeline = diffusers.DDIMPipeline.from_pretrained(model_dir)
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(3, generator=torch.manual_seed(SEED), eta=0.5).images
    for i, image in enumerate(expected):
        assert np.array_equal(pixels(tmp_path / "single" / f"{i:04d}.png"), np.asarray(image)), f"image {i}"


BAD_INPUT = {
    "eta_above_1": (["--sampler", "ddim", "--eta", "1.5"], {}, "--eta must be in [0, 1], got 1.5"),
    "eta_with_ddpm": (["--eta", "0.5"], {}, "--eta 0.5 needs --sampler ddim"),
    "unknown_sampler": (["--sampler", "pndm"], {}, "invalid choice: 'pndm'"),
    "cuda_graph_on_cpu": (["--device", "cpu", "--cuda_graph"], {}, "--cuda_graph needs a CUDA GPU"),
    "grid_under_torchrun": ([], {"WORLD_SIZE": "2"}, "under torchrun, give --outdir without --output"),
}


@pytest.mark.parametrize("name", BAD_INPUT)
def test_bad_input_is_a_one_line_error_naming_it(name, tmp_path):
    flags, env, message = BAD_INPUT[name]
    result = run_sample(str(tmp_path), *flags, **env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("sample.py: error:") and message in last, last
