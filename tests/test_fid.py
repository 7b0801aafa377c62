"""FID, KID, the resize to 299 and the reference cache (ddpm/fid.py, ddpm/inception.py).

FID against pytorch-fid's formula (scipy's sqrtm), KID against its definition, each resize against the formula it
reproduces, the network's input and output, and the cache reused and recomputed. The network is a tiny TorchScript
module with the Inception's interface (tests/fid_helpers.py), so nothing here needs the 87 MB weights.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.data import DataError
from ddpm.fid import (KID_SEED, FeatureStatistics, ReferenceImages, ReferenceStatistics, cache_path,
                      features_of_images, fid_of_samples, frechet_distance, kernel_inception_distance, quantize,
                      reference_statistics)
from ddpm.inception import InceptionError, load_inception, resize, resize_bilinear_tf1, resize_clean
from fid_helpers import save_tiny_inception, write_images
from oracle import ImportedAtFirstUse, single_thread  # noqa: F401  (autouse fixture)

scipy = ImportedAtFirstUse("scipy")  # the reference FID's matrix square root: skipped without scipy

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # the tests' networks are scripted


def pytorch_fid(x: np.ndarray, y: np.ndarray) -> float:
    """pytorch-fid's calculate_frechet_distance on the features' statistics: scipy's sqrtm, its real part."""
    mu_x, mu_y = x.mean(axis=0), y.mean(axis=0)
    sigma_x, sigma_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma_x @ sigma_y)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma_x)) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma_x + offset) @ (sigma_y + offset))
    diff = mu_x - mu_y
    return float(diff @ diff + np.trace(sigma_x) + np.trace(sigma_y) - 2 * np.trace(covmean.real))


def fid(x: np.ndarray, y: np.ndarray) -> float:
    a, b = FeatureStatistics.of(x), FeatureStatistics.of(y)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


@pytest.mark.parametrize("n, m, d", [(300, 200, 48), (40, 30, 64)], ids=["full_rank", "rank_deficient"])
def test_frechet_distance_equals_pytorch_fids_sqrtm_formula(n, m, d):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3
    y = rng.standard_normal((m, d)) @ rng.standard_normal((d, d)) * 0.3 + 0.2
    assert fid(x, y) == pytest.approx(pytorch_fid(x, y), rel=1e-7)


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # scipy's sqrtm of the product of singular covariances
def test_frechet_distance_leaves_out_only_coordinates_constant_in_both_sets():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((50, 20)), rng.standard_normal((40, 20)) * 1.5 + 0.1
    # constant columns: 0 in both, 3 in x and 5 in y (a mean shift), and one that varies in y only
    pad_x = np.column_stack([x, np.zeros(50), np.full(50, 3.0), np.zeros(50)])
    pad_y = np.column_stack([y, np.zeros(40), np.full(40, 5.0), rng.standard_normal(40)])
    assert fid(pad_x, pad_y) == pytest.approx(pytorch_fid(pad_x, pad_y), rel=1e-7)
    last = pad_y[:, -1]  # its mean and variance in y, against 0 and 0 in x
    assert fid(pad_x, pad_y) == pytest.approx(fid(x, y) + 2**2 + last.mean() ** 2 + last.var(ddof=1), rel=1e-9)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(2).standard_normal((60, 30))
    assert abs(fid(x, x)) < 1e-9


def kid_by_definition(x: np.ndarray, y: np.ndarray, subsets: int, s: int, seed: int) -> tuple[float, float]:
    """The unbiased MMD^2 with k(a, b) = (a . b / d + 1)^3, term by term, over the same draws as ddpm.fid."""
    rng, d = np.random.RandomState(seed), x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    estimates = []
    for _ in range(subsets):
        a, b = x[rng.choice(len(x), s, replace=False)], y[rng.choice(len(y), s, replace=False)]
        within = sum(k(a[i], a[j]) + k(b[i], b[j]) for i in range(s) for j in range(s) if i != j)
        across = sum(k(a[i], b[j]) for i in range(s) for j in range(s))
        estimates.append(within / (s * (s - 1)) - 2 * across / s**2)
    return float(np.mean(estimates)), float(np.std(estimates))


def test_kid_is_the_mean_and_std_over_subsets_of_the_unbiased_mmd():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((30, 8)), rng.standard_normal((25, 8)) * 1.2 + 0.3
    mean, std = kernel_inception_distance(x, y, subsets=4, subset_size=12, seed=7)
    expected = kid_by_definition(x, y, 4, 12, 7)
    assert (mean, std) == pytest.approx(expected, rel=1e-10)
    assert std > 0  # the subsets differ


def test_kid_subsets_are_never_larger_than_either_set():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((9, 5)), rng.standard_normal((15, 5))
    assert kernel_inception_distance(x, y, subsets=3) == pytest.approx(kid_by_definition(x, y, 3, 9, KID_SEED))
    assert kernel_inception_distance(x[:1], y) is None  # one image: no unbiased estimate


def test_kid_equals_torch_fidelitys():
    metric_kid = pytest.importorskip("torch_fidelity.metric_kid")
    rng = np.random.default_rng(5)
    x, y = rng.random((120, 16), dtype=np.float32), rng.random((100, 16), dtype=np.float32) + 0.05
    theirs = metric_kid.kid_features_to_metric(torch.from_numpy(x), torch.from_numpy(y), kid_subsets=10,
                                               kid_subset_size=50, kid_kernel="poly", kid_kernel_poly_degree=3,
                                               kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1, rng_seed=2020,
                                               verbose=False)
    mean, std = kernel_inception_distance(x, y, subsets=10, subset_size=50)
    assert mean == pytest.approx(theirs[metric_kid.KEY_METRIC_KID_MEAN], rel=1e-5)
    assert std == pytest.approx(theirs[metric_kid.KEY_METRIC_KID_STD], rel=1e-4)


def test_tf1_bilinear_reads_pixel_i_at_i_times_in_over_out_without_half_pixel_offset():
    row = torch.tensor([10.0, 50.0, 20.0, 200.0]).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    out = resize_bilinear_tf1(row, 8)[0, 0, 0]
    # out[2k] = in[k], out[2k + 1] halfway to in[k + 1], the last pixel's neighbour clamped to itself
    assert out.tolist() == [10.0, 30.0, 50.0, 35.0, 20.0, 110.0, 200.0, 200.0]


def test_tf1_bilinear_equals_torch_fidelitys_bit_exact_port():
    port = pytest.importorskip("torch_fidelity.interpolate_compat_tensorflow")
    images = torch.randint(0, 256, (2, 3, 28, 20), generator=torch.Generator().manual_seed(0)).float()
    expected = port.interpolate_bilinear_2d_like_tensorflow1x(images, size=(299, 299), align_corners=False)
    assert torch.equal(resize(images.to(torch.uint8), "legacy_tensorflow"), expected)


def pil_bicubic(channel: np.ndarray, size: int) -> np.ndarray:
    """PIL's separable bicubic (a = -0.5) resampling, horizontal then vertical, in float64: the coefficients of
    Pillow's Resample.c (the window's weights normalised to sum to 1 at the edges)."""
    def cubic(x):
        x = abs(x)
        return ((1.5 * x - 2.5) * x * x + 1) if x < 1 else ((((x - 5) * x + 8) * x - 4) * -0.5 if x < 2 else 0.0)

    def matrix(length):
        scale = length / size
        support = 2 * max(scale, 1)
        weights = np.zeros((size, length))
        for o in range(size):
            center = (o + 0.5) * scale
            lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), length)
            w = np.array([cubic((i - center + 0.5) / max(scale, 1)) for i in range(lo, hi)])
            weights[o, lo:hi] = w / w.sum()
        return weights

    return matrix(channel.shape[0]) @ (channel.astype(np.float64) @ matrix(channel.shape[1]).T)


def test_clean_resize_is_pil_bicubic_per_channel_in_float_clipped_not_rounded():
    image = torch.zeros(3, 12, 10, dtype=torch.uint8)
    image[:, :, 5:] = 255  # a hard edge: bicubic overshoots past 0 and 255 beside it
    image[1] = torch.randint(0, 256, (12, 10), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    out = resize_clean(image)
    assert out.shape == (3, 299, 299) and out.dtype == torch.float32
    for c in range(3):
        expected = pil_bicubic(image[c].numpy(), 299)
        np.testing.assert_allclose(out[c].numpy(), expected.clip(0, 255), atol=2e-3)
    assert pil_bicubic(image[0].numpy(), 299).max() > 255 and out.max() == 255  # clipped
    assert (out != out.round()).any()  # not quantized back to uint8


def test_legacy_pytorch_resize_is_half_pixel_bilinear():
    image = torch.tensor([[0, 255]], dtype=torch.uint8).expand(3, 2, 2)[None]
    out = resize(image, "legacy_pytorch")[0, 0, 0]
    source = ((torch.arange(299) + 0.5) * 2 / 299 - 0.5).clamp(0, 1)  # align_corners=False, clamped at the edges
    torch.testing.assert_close(out, source * 255, atol=1e-3, rtol=0)


@pytest.mark.parametrize("mode", ["legacy_tensorflow", "clean", "legacy_pytorch"])
def test_grey_images_are_repeated_to_three_channels(mode):
    grey = torch.randint(0, 256, (2, 1, 9, 9), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    assert torch.equal(resize(grey, mode), resize(grey.repeat(1, 3, 1, 1), mode))


def test_quantize_rounds_as_a_saved_png_and_keeps_uint8():
    images = torch.tensor([0.0, 0.5 / 255, 0.51 / 255, 0.2, 1.0, 1.2]).view(1, 1, 2, 3)
    assert quantize(images).flatten().tolist() == [0, 0, 1, 51, 255, 255]
    pixels = torch.arange(6, dtype=torch.uint8).view(1, 1, 2, 3)
    assert quantize(pixels) is pixels


def test_the_network_sees_each_pixel_p_as_p_minus_128_over_128_at_299(tmp_path):
    class FirstPixels(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :2048]

    torch.jit.script(FirstPixels()).save(tmp_path / "first.pt")
    images = torch.randint(0, 256, (2, 3, 7, 7), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    features = features_of_images(images, load_inception(str(tmp_path / "first.pt")), "legacy_pytorch")
    expected = (resize(images, "legacy_pytorch").flatten(1)[:, :2048] - 128) / 128
    np.testing.assert_allclose(features, expected.numpy(), rtol=0, atol=1e-6)


def test_a_network_of_another_output_shape_is_refused(tmp_path):
    class Pooled(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    torch.jit.script(Pooled()).save(tmp_path / "pooled.pt")
    with pytest.raises(InceptionError, match=r"returned \(1, 3\) for 1 images"):
        features_of_images(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), load_inception(str(tmp_path / "pooled.pt")),
                           "clean")


def test_a_file_that_is_not_torchscript_is_refused(tmp_path):
    (tmp_path / "weights.pt").write_bytes(b"not a network")
    with pytest.raises(InceptionError, match="is not a TorchScript file"):
        load_inception(str(tmp_path / "weights.pt"))


@pytest.fixture
def random_torch_fidelity(monkeypatch):
    """torch-fidelity's FeatureExtractorInceptionV3 with its initial (random) weights, and their state dict."""
    tf_inception = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: None)
    load = tf_inception.FeatureExtractorInceptionV3.load_state_dict
    monkeypatch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    torch.manual_seed(0)
    extractor = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    monkeypatch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", load)
    return extractor


def test_the_default_network_is_torch_fidelitys_pool3_from_the_hub_cache(random_torch_fidelity, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    weights = tmp_path / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    weights.parent.mkdir()
    torch.save(random_torch_fidelity.state_dict(), weights)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *args, **kwargs: pytest.fail("downloaded"))
    network = load_inception(None)
    images = torch.randint(0, 256, (2, 3, 16, 16), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    (expected,) = random_torch_fidelity(images)  # its own resize and scaling, then the layers to pool_3
    np.testing.assert_allclose(features_of_images(images, network, "legacy_tensorflow"), expected.numpy(),
                               rtol=1e-4, atol=1e-5)
    import hashlib
    assert network.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_without_network_or_torch_fidelity_weights_the_error_names_inception(tmp_path, monkeypatch):
    pytest.importorskip("torch_fidelity")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(InceptionError, match="without network pass --inception PATH"):
        load_inception(None)


@pytest.fixture
def tiny(tmp_path):
    return load_inception(str(save_tiny_inception(tmp_path / "tiny.pt")))


def test_reference_npz_has_pytorch_fids_keys_and_what_it_was_computed_from(tiny, tmp_path):
    write_images(tmp_path / "ref", 6, seed=0)
    reference = reference_statistics(ReferenceImages.of_folder(tmp_path / "ref"), tiny, "clean", tmp_path / "cache",
                                     progress=False)
    with np.load(reference.path) as f:
        assert {"mu", "sigma", "kid_features", "data", "split", "count", "resolution", "resize", "network"} <= set(f)
        assert (f["mu"].shape, f["sigma"].shape, f["kid_features"].shape) == ((2048,), (2048, 2048), (6, 2048))
        assert (f["count"].item(), f["resize"].item(), f["network"].item()) == (6, "clean", tiny.sha256)


def test_reference_statistics_are_reused_from_the_cache_when_everything_matches(tiny, tmp_path, capsys):
    write_images(tmp_path / "ref", 6, seed=0)
    first = reference_statistics(ReferenceImages.of_folder(tmp_path / "ref"), tiny, "clean", tmp_path, progress=False)
    written = first.path.stat().st_mtime_ns
    second = reference_statistics(ReferenceImages.of_folder(tmp_path / "ref"), tiny, "clean", tmp_path,
                                  progress=False)
    assert "from the cache" in capsys.readouterr().out
    assert second.path == first.path and second.path.stat().st_mtime_ns == written
    np.testing.assert_array_equal(second.statistics.sigma, first.statistics.sigma)


def test_reference_statistics_are_recomputed_when_the_images_change(tiny, tmp_path, capsys):
    write_images(tmp_path / "ref", 6, seed=0)
    first = reference_statistics(ReferenceImages.of_folder(tmp_path / "ref"), tiny, "clean", tmp_path, progress=False)
    write_images(tmp_path / "ref", 1, seed=9)  # image 0 replaced
    second = reference_statistics(ReferenceImages.of_folder(tmp_path / "ref"), tiny, "clean", tmp_path,
                                  progress=False)
    assert "its fingerprint differ" in capsys.readouterr().out
    assert second.path == first.path and not np.array_equal(second.statistics.mu, first.statistics.mu)
    assert ReferenceStatistics.load(first.path).provenance == second.provenance


def test_reference_statistics_are_recomputed_when_the_cached_file_says_other_settings(tiny, tmp_path, capsys):
    write_images(tmp_path / "ref", 6, seed=0)
    first = reference_statistics(ReferenceImages.of_folder(tmp_path / "ref"), tiny, "clean", tmp_path, progress=False)
    tampered = ReferenceStatistics.load(first.path)
    tampered.provenance["resize"] = "legacy_pytorch"
    tampered.statistics.mu = tampered.statistics.mu + 1
    tampered.save(first.path)
    second = reference_statistics(ReferenceImages.of_folder(tmp_path / "ref"), tiny, "clean", tmp_path,
                                  progress=False)
    assert "its resize differ" in capsys.readouterr().out
    np.testing.assert_array_equal(second.statistics.mu, first.statistics.mu)


def test_another_resize_network_or_count_has_a_cache_file_of_its_own(tiny, tmp_path):
    images = ReferenceImages.of_folder
    write_images(tmp_path / "ref", 6, seed=0)
    provenance = {**images(tmp_path / "ref").identity, "resize": "clean", "network": tiny.sha256}
    paths = {cache_path(tmp_path, provenance), cache_path(tmp_path, {**provenance, "resize": "legacy_tensorflow"}),
             cache_path(tmp_path, {**provenance, "network": "0" * 64}),
             cache_path(tmp_path, {**images(tmp_path / "ref", 5).identity, "resize": "clean", "network": tiny.sha256})}
    assert len(paths) == 4


def test_fid_of_samples_in_memory_equals_the_fid_of_their_pngs(tiny, tmp_path):
    write_images(tmp_path / "ref", 8, seed=0)
    reference = reference_statistics(ReferenceImages.of_folder(tmp_path / "ref"), tiny, "legacy_tensorflow", tmp_path,
                                     progress=False)
    samples = torch.rand(5, 3, 10, 12, generator=torch.Generator().manual_seed(5))
    (tmp_path / "samples").mkdir()
    for i, image in enumerate(quantize(samples)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "samples" / f"{i}.png")
    saved = reference_statistics(ReferenceImages.of_folder(tmp_path / "samples"), tiny, "legacy_tensorflow",
                                 tmp_path, progress=False).statistics
    figures = fid_of_samples(samples, reference, tiny)
    ref = reference.statistics
    assert figures["fid"] == pytest.approx(frechet_distance(saved.mu, saved.sigma, ref.mu, ref.sigma), rel=1e-9)
    assert (figures["num_images"], figures["num_reference"], figures["kid_subset_size"]) == (5, 8, 5)
    assert figures["kid_mean"] == pytest.approx(kernel_inception_distance(saved.kid_features, ref.kid_features)[0])


def test_fid_of_samples_refuses_a_reference_of_another_resize(tiny, tmp_path):
    write_images(tmp_path / "ref", 4, seed=0)
    reference = reference_statistics(ReferenceImages.of_folder(tmp_path / "ref"), tiny, "clean", tmp_path,
                                     progress=False)
    with pytest.raises(DataError, match="FIDs compare only within one network and resize"):
        fid_of_samples(torch.rand(3, 3, 8, 8), reference, tiny, resize_mode="legacy_tensorflow")


def test_only_the_reference_features_kept_for_kid_are_capped(monkeypatch):
    monkeypatch.setattr("ddpm.fid.KID_REFERENCE_FEATURES", 7)
    features = np.random.default_rng(6).standard_normal((20, 2048)).astype(np.float32)
    statistics = FeatureStatistics.of(features)
    assert statistics.count == 20 and statistics.kid_features.shape == (7, 2048)
    assert all(any(np.array_equal(kept, row) for row in features) for kept in statistics.kid_features)
    np.testing.assert_allclose(statistics.mu, features.astype(np.float64).mean(axis=0))

