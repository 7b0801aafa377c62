"""The model card train.py writes as output_dir/README.md with each pipeline save."""

from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from ddpm.model_card import write_model_card
from train_script import train


def card(tmp_path: Path, argv: list[str] = (), **options) -> str:
    """The card of a run with train.py's `argv`, written to tmp_path; `options` override write_model_card's."""
    args = train.parse_args(["--output_dir", str(tmp_path), "--device", "cpu", *argv])
    options = {"data": "built-in shapes dataset, 2048 images", "world_size": 1, "step": 2500, "total_steps": 2500,
               "loss": 0.0213, **options}
    return write_model_card(tmp_path, args, **options).read_text()


def test_card_metadata_loads_in_huggingface_hub_model_card(tmp_path):
    card(tmp_path)
    metadata = ModelCard.load(tmp_path / "README.md").data.to_dict()
    assert metadata == {"library_name": "diffusers", "license": "apache-2.0",
                        "tags": ["pytorch", "diffusers", "unconditional-image-generation", "diffusers:DDPMPipeline",
                                 "ddpm"]}


def test_card_metadata_names_the_hub_dataset_and_the_license_asked_for(tmp_path):
    card(tmp_path, ["--preset", "cifar10-32", "--hub_license", "mit", "--mixed_precision", "bf16"])
    metadata = ModelCard.load(tmp_path / "README.md").data
    assert (metadata.datasets, metadata.license) == (["cifar10"], "mit")


def test_card_shows_the_latest_sample_grid_by_its_relative_path(tmp_path):
    (tmp_path / "samples").mkdir()
    for epoch in (2, 10, 9):
        (tmp_path / "samples" / f"{epoch:04d}.png").write_bytes(b"")
    text = card(tmp_path)
    assert "![Samples after epoch 10](samples/0010.png)" in text
    assert "0009.png" not in text and "0002.png" not in text


def test_card_without_sample_grids_shows_no_image(tmp_path):
    assert "![" not in card(tmp_path)


def test_card_says_how_to_load_the_pipeline_with_diffusers_and_sample_py(tmp_path):
    text = card(tmp_path, repo_id="someone/shapes")
    assert 'pipeline = DDPMPipeline.from_pretrained("someone/shapes")' in text
    assert "python sample.py someone/shapes --num_images 16 --seed 0 --output grid.png" in text
    assert text.splitlines()[text.splitlines().index("---", 1) + 2] == "# shapes"


def test_card_of_a_local_run_loads_from_the_output_folder(tmp_path):
    text = card(tmp_path)
    assert f"DDPMPipeline.from_pretrained(\"{tmp_path}\")" in text and f"python sample.py {tmp_path} " in text


def test_card_lists_the_recipe(tmp_path):
    text = card(tmp_path, ["--preset", "butterflies-128", "--mixed_precision", "bf16", "--use_ema",
                           "--gradient_accumulation_steps", "2"], world_size=8, step=1200, total_steps=3150)
    for row in ("| preset | butterflies-128 |", "| resolution | 128x128 |",
                "| global batch | 16 x 8 processes x 2 accumulation = 256 |",
                "| learning rate | 0.0001, cosine schedule, 500 warmup steps |",
                "| steps | 1,200 of 3,150 optimizer steps |",
                "| EMA | max decay 0.9999 (inv_gamma 1, power 0.75) |", "| precision | bf16 autocast |",
                "| diffusion | T = 1000, linear betas, epsilon prediction |"):
        assert row in text.splitlines(), row


def test_card_without_ema_says_so(tmp_path):
    assert "| EMA | no |" in card(tmp_path, ["--no-use_ema"]).splitlines()


def test_card_shows_the_loss_and_the_evaluation_figures_it_is_given(tmp_path):
    text = card(tmp_path, loss=0.021347, evaluation={"bits/dim": 3.7, "shapes valid fraction": 0.93})
    rows = text.split("## Results")[1].splitlines()
    assert "| training loss (last logged) | 0.02135 |" in rows
    assert "| bits/dim | 3.7 |" in rows and "| shapes valid fraction | 0.93 |" in rows


@pytest.mark.parametrize("loss", [None, 0.5])
def test_card_has_a_results_section_only_with_figures(tmp_path, loss):
    assert ("## Results" in card(tmp_path, loss=loss)) == (loss is not None)


def test_card_replaces_the_previous_one(tmp_path):
    card(tmp_path, step=100)
    assert "step 200 of 2,500" in card(tmp_path, step=200)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["README.md"]  # no temporary file left
