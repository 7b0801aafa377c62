"""train.py --eval_fid_images: FID and KID of samples at each pipeline save, against the training data's cached
reference statistics; --keep_best fid: the pipeline of the lowest FID in best/, kept over a resumed run."""

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ddpm import load_pipeline
from ddpm.data import load_images
from ddpm.fid import ReferenceImages, fid_of_samples, reference_statistics
from ddpm.inception import load_inception
from ddpm.sampling import generate, image_generators, sampling_scheduler
from ddpm.train_args import parse_args
from fid_helpers import save_tiny_inception, write_images
from oracle import single_thread  # noqa: F401  (autouse fixture)
from train_script import own_signal_handlers, train

# train.main's @record cannot install its fault handler under pytest's captured output
pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")

TINY_UNET = {"block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "UpBlock2D"], "layers_per_block": 1, "norm_num_groups": 8}


def run(tmp_path: Path, steps: int, *extra: str) -> Path:
    """A tiny CPU run on 8 images (an epoch of 2 steps), a pipeline save and a checkpoint every epoch, FID of 4
    samples (DDIM, 2 steps) under a tiny Inception, --keep_best fid."""
    if not (tmp_path / "images").is_dir():
        write_images(tmp_path / "images", 8, seed=0)
        save_tiny_inception(tmp_path / "inception.pt")
        (tmp_path / "unet.json").write_text(json.dumps(TINY_UNET))
    with own_signal_handlers():
        train.main(["--model_config_name_or_path", str(tmp_path / "unet.json"), "--output_dir", str(tmp_path / "out"),
                    "--train_data_dir", str(tmp_path / "images"), "--resolution", "8", "--train_batch_size", "4",
                    "--eval_batch_size", "2", "--sampler", "ddim", "--ddpm_num_inference_steps", "2",
                    "--max_train_steps", str(steps), "--save_model_epochs", "1", "--save_images_epochs", "100",
                    "--checkpointing_steps", "2", "--device", "cpu", "--eval_fid_images", "4",
                    "--fid_inception", str(tmp_path / "inception.pt"), "--keep_best", "fid", *extra])
    return tmp_path / "out"


def scalars(output_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(output_dir / "logs"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_eval_fid_images_logs_the_fid_of_the_saved_model_as_evaluate_py_computes_it(tmp_path):
    output_dir = run(tmp_path, 4)
    logged = scalars(output_dir)
    assert [step for step, _ in logged["eval/fid"]] == [2, 4]
    assert [step for step, _ in logged["eval/kid_mean"]] == [2, 4]
    # the last save's FID, recomputed from the saved pipeline: 4 samples seeded as evaluate.py seeds them
    unet, scheduler = load_pipeline(output_dir)
    network = load_inception(str(tmp_path / "inception.pt"))
    samples = generate(unet, sampling_scheduler("ddim", scheduler.config), 4, image_generators(0, [0, 1, 2, 3]), 2)
    cache = output_dir / "fid-reference"
    assert len(list(cache.glob("*.npz"))) == 1  # computed once, reused at the second save
    source = load_images(None, None, str(tmp_path / "images"), None, 8, seed=0)
    reference = reference_statistics(ReferenceImages.of_data(source, 8, 3), network, "legacy_tensorflow", cache)
    expected = fid_of_samples(samples, reference, network)
    assert logged["eval/fid"][-1][1] == pytest.approx(expected["fid"], rel=1e-5)
    assert logged["eval/kid_mean"][-1][1] == pytest.approx(expected["kid_mean"], rel=1e-4, abs=1e-6)
    assert "FID of 4 samples (ddim, 2 steps) against 8 training images" in (output_dir / "README.md").read_text()


def fids(monkeypatch, values: list[float]) -> None:
    """Make each FID computed by a run the next of `values`."""
    queue = iter(values)
    monkeypatch.setattr("ddpm.run_evaluation.fid_of_samples",
                        lambda *a, **k: {"fid": next(queue), "kid_mean": 0.0, "num_reference": 8})


def test_best_keeps_the_lowest_fid_and_a_resumed_run_keeps_it_until_a_lower_one(tmp_path, monkeypatch):
    fids(monkeypatch, [5.0, 3.0, 4.0])
    output_dir = run(tmp_path, 6)
    best = output_dir / "best"
    assert json.loads((best / "best.json").read_text()) == {"fid": 3.0, "step": 4}
    assert "step 4 of 6" in (best / "README.md").read_text()
    load_pipeline(best)  # a whole pipeline folder
    weights = (best / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert weights != (output_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()

    fids(monkeypatch, [3.5, 2.0])  # resumed at step 6: worse at step 8, better at step 10
    run(tmp_path, 8, "--resume_from_checkpoint", "latest")
    assert json.loads((best / "best.json").read_text()) == {"fid": 3.0, "step": 4}
    assert (best / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    run(tmp_path, 10, "--resume_from_checkpoint", "latest")
    assert json.loads((best / "best.json").read_text()) == {"fid": 2.0, "step": 10}
    assert (best / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (output_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()


@pytest.mark.parametrize("argv, error", [
    (["--eval_fid_images", "-1"], "--eval_fid_images must be >= 0, got -1"),
    (["--eval_fid_images", "1"], "--eval_fid_images must be 0 or at least 2"),
    (["--keep_best", "fid"], "--keep_best fid needs --eval_fid_images"),
    (["--eval_fid_images", "4", "--fid_inception", "/no/such.pt"], "--fid_inception '/no/such.pt': no such file"),
    (["--eval_fid_images", "4", "--class_conditional"], "does not sample a class-conditional model yet"),
])
def test_bad_fid_flags_are_one_line_errors(argv, error, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu", *argv])
    assert error in capsys.readouterr().err
