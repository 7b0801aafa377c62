"""The shapes score (ddpm/shapes_score.py): real built-in images fit, blurred ones and noise do not; the
class statistics; and the built-in dataset's images unchanged by the renderer the score shares with it.

A model trained for a few hundred steps does not draw valid shapes within a test's time budget on this CPU,
so the trained-against-untrained ordering is shown on images whose quality is known: real > blurred > noise.
"""

import hashlib

import numpy as np
import pytest
import torch
from torchvision.transforms.functional import gaussian_blur, pil_to_tensor

from ddpm import shapes_score
from ddpm.data import make_builtin_source
from ddpm.shapes_score import CLASSES, VALID_RMSE, fit, score


def builtin_images(resolution: int, count: int, seed: int = 2) -> tuple[torch.Tensor, list[int]]:
    """`count` built-in images (N, 3, R, R) in [0, 1] and the index in CLASSES of each one's true class."""
    source = make_builtin_source(resolution, seed=seed, size=count)
    images = torch.stack([pil_to_tensor(source.get(i)) for i in range(count)]).float() / 255
    factors = [source.factors(i) for i in range(count)]
    return images, [CLASSES.index((f.shape, f.color, f.background)) for f in factors]


@pytest.fixture(scope="module")
def real_16px():
    return builtin_images(16, 96)


def test_builtin_images_are_those_drawn_before_the_renderer_took_explicit_factors():
    # SHA-256 of 512 images at 8, 16 and 32 px of seed 0, computed with the dataset's code before the refactor
    digest = hashlib.sha256()
    for resolution in (8, 16, 32):
        source = make_builtin_source(resolution, seed=0, size=512)
        for i in range(512):
            digest.update(np.asarray(source.get(i)).tobytes())
    assert digest.hexdigest() == "ec1eb3ba2cab58db0f7fed0b3bc2bea00cbf708c99a62738ba44e494f3f96adf"


def test_real_images_are_valid_and_fitted_to_their_own_class(real_16px):
    images, classes = real_16px
    found = fit(images)
    assert (found.rmse < VALID_RMSE).double().mean().item() >= 0.99
    assert found.classes.tolist() == classes


@pytest.mark.parametrize("resolution", [8, 32])
def test_real_images_are_valid_at_other_resolutions(resolution):
    images, classes = builtin_images(resolution, 24)
    found = fit(images)
    assert (found.rmse < VALID_RMSE).all() and found.classes.tolist() == classes


def test_images_blurred_by_a_gaussian_of_sigma_1px_are_mostly_invalid(real_16px):
    images, _ = real_16px
    blurred = gaussian_blur(images, kernel_size=7, sigma=1.0)
    assert shapes_score.shapes_score(blurred).valid_fraction < 0.1


def test_a_random_noise_image_is_invalid():
    noise = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert fit(noise).rmse.item() > VALID_RMSE


def test_a_shape_smaller_than_the_dataset_draws_is_invalid(real_16px):
    # the dataset's shapes span 0.4 to 0.7 of the image; one of 0.2 lies outside its factors
    images, _ = real_16px
    small = torch.nn.functional.interpolate(images[:4], scale_factor=0.5, mode="area")
    canvas = images[:4, :, :1, :1].expand(4, 3, 16, 16).clone()  # the corner pixel: the background
    canvas[:, :, 4:12, 4:12] = small
    assert (fit(canvas).rmse > VALID_RMSE).all()


def test_the_score_orders_real_above_blurred_above_noise(real_16px):
    images, _ = real_16px
    blurred = gaussian_blur(images[:32], kernel_size=7, sigma=1.0)
    noise = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    rmse = [fit(x).rmse.median().item() for x in (images[:32], blurred, noise)]
    assert rmse[0] < rmse[1] < rmse[2]


def test_classes_covered_and_tv_to_uniform_count_only_valid_samples():
    classes = torch.arange(24).repeat(2)
    rmse = torch.zeros(48)
    assert score(classes, rmse).classes_covered == 24 and score(classes, rmse).tv_to_uniform == pytest.approx(0)
    rmse[24:] = 2 * VALID_RMSE  # the second copy invalid: still one of each class among the valid
    result = score(classes, rmse)
    assert (result.valid_fraction, result.classes_covered, result.tv_to_uniform) == (0.5, 24, pytest.approx(0))


def test_median_rmse_is_over_all_samples_valid_or_not():
    assert score(torch.arange(4), torch.tensor([1.0, 2.0, 30.0, 40.0])).median_rmse == pytest.approx(16.0)


def test_one_class_only_is_23_24ths_from_uniform():
    result = score(torch.full((10,), 5), torch.zeros(10))
    assert result.classes_covered == 1 and result.tv_to_uniform == pytest.approx(23 / 24)


def test_no_valid_sample_scores_zero_valid_and_the_largest_tv():
    result = score(torch.arange(4), torch.full((4,), 2 * VALID_RMSE))
    assert (result.valid_fraction, result.classes_covered, result.tv_to_uniform) == (0.0, 0, 1.0)


def test_grey_images_are_refused_naming_the_shape():
    with pytest.raises(ValueError, match=r"\(2, 1, 16, 16\)"):
        fit(torch.zeros(2, 1, 16, 16))
