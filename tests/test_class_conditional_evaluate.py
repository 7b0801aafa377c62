"""evaluate.py --metric shapes on a class-conditional model: samples balanced over the 24 classes, guided with
--guidance_scale, and the conditional accuracy (the fraction whose fitted class is the class asked for) beside the
valid fraction; and the accuracy itself on the built-in images, whose classes are known."""

import json
from pathlib import Path

import pytest
import torch

from ddpm import DDPMScheduler, UNet2DModel, save_pipeline
from ddpm.class_conditional import balanced_labels, conditional_accuracy, generate_for_labels
from ddpm.data import ShapesSource
from ddpm.sampling import generate
from ddpm.shapes_score import fit, pixels_of
from oracle import perturb_, single_thread  # noqa: F401  (autouse fixture)
from test_evaluate import TINY_UNET, evaluate, pytestmark  # noqa: F401  (pytestmark: the fault-handler warning)

STEPS = 3


def conditional_model(folder: Path, classes: int = 24) -> UNet2DModel:
    torch.manual_seed(0)
    unet = perturb_(UNet2DModel(**TINY_UNET, num_class_embeds=classes + 1)).eval()
    save_pipeline(folder, unet, DDPMScheduler(), [f"class-{k}" for k in range(classes)])
    return unet


def builtin_images(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` built-in 16 px images in [0, 1] and their class labels."""
    source = ShapesSource(16, seed=0, size=count)
    return torch.stack([pixels_of(source.get(i)) / 255 for i in range(count)]), source.classes()[1]


def test_the_conditional_accuracy_of_built_in_images_with_their_own_labels_is_one_and_with_others_zero():
    images, labels = builtin_images(24)
    fitted = fit(images).classes
    assert conditional_accuracy(fitted, labels) == 1.0
    assert conditional_accuracy(fitted, (labels + 1) % 24) == 0.0
    half = torch.where(torch.arange(24) < 12, labels, (labels + 1) % 24)
    assert conditional_accuracy(fitted, half) == 0.5


def test_evaluate_reports_the_conditional_accuracy_of_samples_balanced_over_the_classes(tmp_path, capsys):
    unet = conditional_model(tmp_path / "model")
    evaluate.main([str(tmp_path / "model"), "--metric", "shapes", "--num_images", "5", "--batch_size", "2",
                   "--num_inference_steps", str(STEPS), "--guidance_scale", "2", "--seed", "4", "--device", "cpu",
                   "--output_json", str(tmp_path / "f.json")])
    figures = json.loads((tmp_path / "f.json").read_text())
    # the same samples drawn here: image i of class i mod 24, batches of 2 from one generator seeded with --seed
    labels = balanced_labels(range(5), 24)
    samples = generate_for_labels(unet, DDPMScheduler(), labels, torch.Generator().manual_seed(4), STEPS, 2.0,
                                  batch_size=2)
    found = fit(samples)
    assert figures["conditional_accuracy"] == conditional_accuracy(found.classes, labels)
    assert figures["valid_fraction"] == (found.rmse < figures["valid_rmse"]).double().mean().item()
    assert figures["guidance_scale"] == 2.0 and figures["num_images"] == 5
    assert sorted(figures["conditional_accuracy_per_class"]) == sorted(ShapesSource.CLASS_NAMES[:5])
    assert "conditional accuracy" in capsys.readouterr().out


def test_the_guidance_scale_changes_the_samples_and_defaults_to_the_conditional_model(tmp_path, monkeypatch):
    conditional_model(tmp_path / "model")
    scales = []
    monkeypatch.setattr(evaluate, "generate_for_labels", lambda *args, **kwargs: scales.append(args[5]) or
                        torch.zeros(len(args[2]), 3, 8, 8))
    for extra in ([], ["--guidance_scale", "4"]):
        evaluate.main([str(tmp_path / "model"), "--metric", "shapes", "--num_images", "2", "--device", "cpu",
                       "--num_inference_steps", "1", *extra])
    assert scales == [1.0, 4.0]


def test_an_unconditional_model_is_scored_as_before_without_an_accuracy(tmp_path):
    torch.manual_seed(0)
    unet = perturb_(UNet2DModel(**TINY_UNET)).eval()
    save_pipeline(tmp_path / "model", unet, DDPMScheduler())
    evaluate.main([str(tmp_path / "model"), "--metric", "shapes", "--num_images", "2", "--device", "cpu",
                   "--num_inference_steps", "2", "--output_json", str(tmp_path / "f.json")])
    figures = json.loads((tmp_path / "f.json").read_text())
    assert "conditional_accuracy" not in figures
    expected = fit(generate(unet, DDPMScheduler(), 2, torch.Generator().manual_seed(0), 2))
    assert figures["median_rmse"] == expected.rmse.quantile(0.5).item()


@pytest.mark.parametrize("classes, argv, message", [
    (None, ["--guidance_scale", "2"], "--guidance_scale needs a class-conditional model"),
    (10, [], "the shapes score asks for the 24 classes of the built-in shapes; this class-conditional UNet has 10"),
], ids=["unconditional", "other classes"])
def test_a_model_the_conditional_score_does_not_fit_is_a_one_line_error(classes, argv, message, tmp_path):
    if classes is None:
        save_pipeline(tmp_path / "model", UNet2DModel(**TINY_UNET), DDPMScheduler())
    else:
        conditional_model(tmp_path / "model", classes)
    with pytest.raises(SystemExit) as exit:
        evaluate.main([str(tmp_path / "model"), "--metric", "shapes", "--device", "cpu", *argv])
    assert message in str(exit.value.code) and "\n" not in str(exit.value.code)


def test_a_guidance_scale_for_another_metric_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.main([str(tmp_path), "--builtin_data", "--guidance_scale", "2", "--device", "cpu"])
    assert "--guidance_scale guides the samples of --metric shapes, not bpd" in capsys.readouterr().err

