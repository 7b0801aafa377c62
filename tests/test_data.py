import time

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import data
from ddpm.data import DataError, EpochSampler, ImageSource, TrainingImages, load_images, make_builtin_source


class ListSource(ImageSource):
    """In-memory images, for tests of the conversion and augmentation."""

    def __init__(self, images):
        self.images, self.description = images, f"{len(images)} test images"

    def __len__(self):
        return len(self.images)

    def get(self, i):
        return self.images[i]

    def describe(self, i):
        return f"test image {i}"


def noise_images(n, size=(24, 16), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)) for _ in range(n)]


def write_pngs(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(noise_images(n)):
        image.save(folder / f"{i}.png")


def images_in_order(source, n):
    return [np.asarray(source.get(i)) for i in range(n)]


def test_builtin_is_deterministic_for_a_seed():
    a, b = make_builtin_source(32, seed=0, size=8), make_builtin_source(32, seed=0, size=8)
    assert all(np.array_equal(x, y) for x, y in zip(images_in_order(a, 8), images_in_order(b, 8)))


def test_builtin_differs_between_seeds():
    a, b = make_builtin_source(32, seed=0, size=8), make_builtin_source(32, seed=1, size=8)
    assert not all(np.array_equal(x, y) for x, y in zip(images_in_order(a, 8), images_in_order(b, 8)))


@pytest.mark.parametrize("resolution", [8, 32, 64, 128])
def test_builtin_renders_at_the_requested_resolution(resolution):
    image = make_builtin_source(resolution, seed=0, size=4).get(3)
    assert image.mode == "RGB" and image.size == (resolution, resolution)


def test_builtin_is_the_default_and_says_so():
    source = load_images(None, None, None, None, resolution=16, seed=0, builtin_size=100)
    assert len(source) == 100 and source.description == "built-in shapes dataset, 100 images"


def test_builtin_renders_2048_images_at_32px_in_under_two_seconds():
    source = make_builtin_source(32, seed=0, size=2048)
    start = time.perf_counter()
    for i in range(len(source)):
        source.get(i)
    assert time.perf_counter() - start < 2


def black_and_white(mode):
    """An 8x8 image in `mode`: left half black, right half white."""
    levels = {"I;16": (0, 65535), "I": (-5, 70000), "F": (0.0, 1.0), "1": (0, 1)}.get(mode, (0, 255))
    rows = np.where(np.arange(8) < 4, *levels)[None].repeat(8, axis=0)
    if mode in ("I;16", "I", "F", "1", "L"):
        return Image.fromarray(rows.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32, "1": bool, "L": np.uint8}[mode]))
    grey = Image.fromarray(rows.astype(np.uint8), "L")
    if mode == "CMYK":  # white is no ink, black is full key
        return Image.merge("CMYK", [Image.new("L", (8, 8), 0)] * 3 + [Image.eval(grey, lambda v: 255 - v)])
    if mode == "P":
        return grey.convert("RGB").convert("P")
    return grey.convert(mode)  # LA, RGBA: opaque


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "I", "F", "CMYK", "1"])
def test_every_pil_mode_converts_keeping_black_black_and_white_white(mode, channels):
    image = black_and_white(mode)
    assert image.mode == mode
    x = TrainingImages(ListSource([image]), 8, channels, center_crop=True, random_flip=False)[(0, 0)]
    assert x.shape == (channels, 8, 8)
    assert torch.allclose(x[:, :, :4], torch.tensor(-1.0)) and torch.allclose(x[:, :, 4:], torch.tensor(1.0))


def test_16_bit_png_gradient_is_scaled_not_saturated(tmp_path):
    gradient = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    (tmp_path / "images").mkdir()
    Image.fromarray(gradient).save(tmp_path / "images" / "gradient.png")
    source = load_images(None, None, str(tmp_path / "images"), None, resolution=64, seed=0)
    assert source.get(0).mode == "I;16"
    x = TrainingImages(source, 64, 1, center_crop=True, random_flip=False)[(0, 0)]
    assert (x > 0.99).float().mean() < 0.01 and abs(x.mean()) < 0.02


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    x = TrainingImages(ListSource([image]), 8, 3, center_crop=True, random_flip=False)[(0, 0)]
    assert torch.allclose(x, torch.tensor(1.0))


def test_output_is_in_minus_one_to_one_with_shape_channels_resolution_resolution():
    dataset = TrainingImages(ListSource(noise_images(2, size=(40, 30))), 16, 3, center_crop=False, random_flip=True)
    x = dataset[(1, 123)]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert -1 <= x.min() < 0 < x.max() <= 1


def test_same_key_gives_same_tensor_with_random_crop_and_flip():
    dataset = TrainingImages(ListSource(noise_images(1)), 16, 3, center_crop=False, random_flip=True)
    torch.manual_seed(1)
    first = dataset[(0, 7)]
    torch.manual_seed(2)
    assert torch.equal(first, dataset[(0, 7)])


def test_different_draws_give_different_crops_and_flips():
    dataset = TrainingImages(ListSource(noise_images(1)), 16, 3, center_crop=False, random_flip=True)
    assert len({dataset[(0, draw)].numpy().tobytes() for draw in range(20)}) > 1


def test_augmentation_leaves_the_global_rng_alone():
    dataset = TrainingImages(ListSource(noise_images(1)), 16, 3, center_crop=False, random_flip=True)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    dataset[(0, 5)]
    assert torch.equal(torch.rand(3), expected)


def skipped_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("skipping unreadable image ")]


def test_corrupt_file_is_skipped_with_a_line_naming_it(tmp_path, capsys):
    write_pngs(tmp_path, 3)
    (tmp_path / "1.png").write_bytes(np.random.default_rng(0).bytes(500))
    dataset = TrainingImages(load_images(None, None, str(tmp_path), None, 16, 0), 16, 3, False, False)
    x = dataset[(1, 0)]
    assert torch.equal(x, dataset[(2, 0)])  # the next readable image stands in
    [line] = skipped_lines(capsys.readouterr().out)
    assert line.startswith(f"skipping unreadable image {tmp_path / '1.png'}: ")


def test_truncated_file_is_skipped_with_a_line_naming_it(tmp_path, capsys):
    write_pngs(tmp_path, 2)
    (tmp_path / "0.png").write_bytes((tmp_path / "0.png").read_bytes()[:200])
    dataset = TrainingImages(load_images(None, None, str(tmp_path), None, 16, 0), 16, 3, False, False)
    assert torch.equal(dataset[(0, 0)], dataset[(1, 0)])
    [line] = skipped_lines(capsys.readouterr().out)
    assert "0.png" in line


def test_an_unreadable_file_is_reported_once_however_often_it_is_drawn(tmp_path, capsys):
    write_pngs(tmp_path, 3)
    (tmp_path / "1.png").write_bytes(b"not a png")
    dataset = TrainingImages(load_images(None, None, str(tmp_path), None, 16, 0), 16, 3, False, False)
    for sample_seed in range(3):
        dataset[(1, sample_seed)]
    assert len(skipped_lines(capsys.readouterr().out)) == 1
    assert dataset.skipped == 1


def test_an_unreadable_file_is_skipped_silently_when_reporting_is_off(tmp_path, capsys):
    write_pngs(tmp_path, 2)
    (tmp_path / "1.png").write_bytes(b"not a png")
    dataset = TrainingImages(load_images(None, None, str(tmp_path), None, 16, 0), 16, 3, False, False, report=False)
    assert torch.equal(dataset[(1, 0)], dataset[(0, 0)])
    assert capsys.readouterr().out == "" and dataset.skipped == 1


def test_a_file_a_dataloader_worker_found_unreadable_is_skipped_by_every_process_without_a_new_report(
        tmp_path, capfd):
    write_pngs(tmp_path, 2)
    (tmp_path / "1.png").write_bytes(b"not a png")
    dataset = TrainingImages(load_images(None, None, str(tmp_path), None, 16, 0), 16, 3, False, False)
    list(torch.utils.data.DataLoader(dataset, batch_size=None, sampler=[(1, 0)], num_workers=1))
    assert dataset.skipped == 1  # seen in this process: the worker marked it in shared memory
    list(torch.utils.data.DataLoader(dataset, batch_size=None, sampler=[(1, 0)], num_workers=1))  # a new worker
    dataset[(1, 0)]
    assert len(skipped_lines(capfd.readouterr().out)) == 1


def test_no_readable_image_raises_data_error(tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    dataset = TrainingImages(load_images(None, None, str(tmp_path), None, 16, 0), 16, 3, False, False)
    with pytest.raises(DataError, match="none of the images"):
        dataset[(0, 0)]
    assert "bad.png" in capsys.readouterr().out


def test_folder_is_searched_recursively_for_image_extensions(tmp_path):
    write_pngs(tmp_path / "a" / "b", 2)
    (tmp_path / "notes.txt").write_text("not an image")
    source = load_images(None, None, str(tmp_path), None, 16, 0)
    assert len(source) == 2 and source.description == f"imagefolder {tmp_path}: 2 images"


def test_missing_folder_raises_data_error_naming_it(tmp_path):
    with pytest.raises(DataError, match="no-such-folder"):
        load_images(None, None, str(tmp_path / "no-such-folder"), None, 16, 0)


def test_folder_without_images_raises_data_error_naming_it(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=f"no images in --train_data_dir '{tmp_path}'"):
        load_images(None, None, str(tmp_path), None, 16, 0)


def test_both_dataset_name_and_train_data_dir_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="huggan/pokemon.*only one"):
        load_images("huggan/pokemon", None, str(tmp_path), None, 16, 0)


def test_hub_dataset_offline_raises_data_error_quickly():
    start = time.perf_counter()
    with pytest.raises(DataError, match="could not load dataset 'ddpm-tests/no-such-dataset' from the Hugging Face Hub"):
        load_images("ddpm-tests/no-such-dataset", None, None, None, 16, 0)
    assert time.perf_counter() - start < 10


def test_hub_dataset_fails_quickly_without_network_even_if_offline_mode_is_not_set(monkeypatch):
    monkeypatch.setattr(data.hub_constants, "HF_HUB_OFFLINE", False)
    datasets = pytest.importorskip("datasets")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    with pytest.raises(DataError, match="ddpm-tests/no-such-dataset"):
        load_images("ddpm-tests/no-such-dataset", None, None, None, 16, 0)
    assert time.perf_counter() - start < 10
    assert data.hub_constants.HF_HUB_OFFLINE is False  # offline mode was switched on for the load only


def write_parquet_dataset(folder, features, rows):
    datasets = pytest.importorskip("datasets")

    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=datasets.Features(features)).to_parquet(folder / "data" / "train.parquet")


def test_dataset_image_column_is_found_by_feature_type(tmp_path):
    datasets = pytest.importorskip("datasets")

    write_pngs(tmp_path / "pngs", 3)
    paths = [str(tmp_path / "pngs" / f"{i}.png") for i in range(3)]
    features = {"label": datasets.Value("int64"), "picture": datasets.Image()}
    write_parquet_dataset(tmp_path / "ds", features, {"label": [0, 1, 2], "picture": paths})
    source = load_images(str(tmp_path / "ds"), None, None, None, 16, 0)
    assert len(source) == 3 and source.description.endswith("(train): 3 images")
    assert np.array_equal(np.asarray(source.get(2)), np.asarray(Image.open(paths[2])))


def test_dataset_without_image_column_raises_data_error_listing_columns(tmp_path):
    datasets = pytest.importorskip("datasets")

    write_parquet_dataset(tmp_path / "ds", {"text": datasets.Value("string")}, {"text": ["a", "b"]})
    with pytest.raises(DataError, match=r"no image column \(columns: text \(Value\)\)"):
        load_images(str(tmp_path / "ds"), None, None, None, 16, 0)


def epoch_keys(n, seed=0, epoch=0, rank=0, world_size=1, start=0):
    sampler = EpochSampler(n, seed, rank, world_size)
    sampler.set_epoch(epoch, start)
    keys = list(sampler)
    assert len(keys) == len(sampler)
    return keys


def test_sampler_yields_every_index_once_per_epoch():
    assert sorted(index for index, _ in epoch_keys(10)) == list(range(10))


def test_sampler_shards_are_disjoint_and_padded_to_equal_length_for_odd_n():
    rank0, rank1 = epoch_keys(11, rank=0, world_size=2), epoch_keys(11, rank=1, world_size=2)
    assert len(rank0) == len(rank1) == 6
    assert not {draw for _, draw in rank0} & {draw for _, draw in rank1}  # distinct positions, independent draws
    indices = [index for index, _ in rank0 + rank1]
    assert set(indices) == set(range(11)) and len(indices) == 12  # one index repeated as padding


def test_sampler_shards_interleave_the_single_process_order():
    full = epoch_keys(12)
    assert epoch_keys(12, rank=0, world_size=3) == full[0::3] and epoch_keys(12, rank=2, world_size=3) == full[2::3]


def test_sampler_order_and_draws_change_between_epochs():
    epoch0, epoch1 = epoch_keys(50, epoch=0), epoch_keys(50, epoch=1)
    assert [i for i, _ in epoch0] != [i for i, _ in epoch1]
    assert not {s for _, s in epoch0} & {s for _, s in epoch1}


def test_sampler_order_is_the_same_for_the_same_seed_and_epoch():
    assert epoch_keys(50, seed=3, epoch=2) == epoch_keys(50, seed=3, epoch=2)
    assert epoch_keys(50, seed=3, epoch=2) != epoch_keys(50, seed=4, epoch=2)


def test_sampler_started_mid_epoch_yields_the_tail_of_the_epoch():
    assert epoch_keys(11, epoch=4, rank=1, world_size=2, start=4) == epoch_keys(11, epoch=4, rank=1, world_size=2)[4:]


def test_sampler_rejects_a_start_past_the_end_of_the_epoch():
    with pytest.raises(ValueError, match="got 7"):
        EpochSampler(11, 0, 0, 2).set_epoch(0, start=7)


def test_dataloader_batches_do_not_depend_on_the_number_of_workers():
    dataset = TrainingImages(ListSource(noise_images(10)), 16, 3, center_crop=False, random_flip=True)

    def batches(num_workers):
        sampler = EpochSampler(len(dataset), seed=0)
        sampler.set_epoch(1)
        return list(torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=num_workers))

    assert all(torch.equal(a, b) for a, b in zip(batches(0), batches(2), strict=True))


# Decoded images kept in memory (cache_bytes): the same tensors as decoding each time


def torchvision_pil_pipeline(image, resolution, center_crop, random_flip, draw):
    """diffusers' train_unconditional.py augmentation of a PIL image, with the crop offsets and the flip that `draw`
    picks (offsets (draw >> 1) modulo the rows, then the columns; the flip bit 0): what TrainingImages must give."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    image = F.resize(image, resolution, interpolation=InterpolationMode.BILINEAR)
    if center_crop:
        image = F.center_crop(image, resolution)
    else:
        rows, columns = image.height - resolution + 1, image.width - resolution + 1
        image = F.crop(image, (draw >> 1) % rows, (draw >> 1) // rows % columns, resolution, resolution)
    if random_flip and draw & 1:
        image = F.hflip(image)
    return F.normalize(F.to_tensor(image), [0.5], [0.5])


@pytest.mark.parametrize("channels, center_crop, random_flip", [(3, False, True), (1, True, False), (3, True, True)])
def test_cached_and_uncached_images_equal_torchvisions_pil_pipeline(channels, center_crop, random_flip):
    images = noise_images(5, size=(40, 30)) + noise_images(2, size=(17, 50), seed=1)
    cached = TrainingImages(ListSource(images), 16, channels, center_crop, random_flip, cache_bytes=2**20)
    uncached = TrainingImages(ListSource(images), 16, channels, center_crop, random_flip)
    assert cached.cached and not uncached.cached
    for index, draw in [(0, 0), (1, 5), (4, 77), (5, 3), (6, 2**40 + 1), (2, 11), (6, 2**62 - 1)]:
        image = images[index].convert("L" if channels == 1 else "RGB")
        expected = torchvision_pil_pipeline(image, 16, center_crop, random_flip, draw)
        assert torch.equal(cached[(index, draw)], expected)
        assert torch.equal(uncached[(index, draw)], expected)


def test_draws_reach_every_crop_offset_with_and_without_a_flip():
    # 24x16 at 16: 9 column offsets, 1 row; with the flip 18 different crops
    dataset = TrainingImages(ListSource(noise_images(1, size=(24, 16))), 16, 3, center_crop=False, random_flip=True)
    draws = torch.randint(2**62, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    assert len({dataset[(0, draw)].numpy().tobytes() for draw in draws}) == 18


def test_cache_is_not_modified_by_augmentation():
    dataset = TrainingImages(ListSource(noise_images(1)), 16, 3, center_crop=False, random_flip=True, cache_bytes=2**20)
    before = dataset.cache[0].clone()
    for seed in range(10):
        dataset[(0, seed)]
    assert torch.equal(dataset.cache[0], before)


def test_images_larger_than_the_cache_budget_are_decoded_on_demand():
    square = noise_images(4, size=(16, 16))
    assert not TrainingImages(ListSource(square), 16, 3, False, False, cache_bytes=4 * 3 * 16 * 16 - 1).cached
    assert TrainingImages(ListSource(square), 16, 3, False, False, cache_bytes=4 * 3 * 16 * 16).cached
    # wide images pass the square estimate but not the count of what was decoded
    wide = noise_images(4, size=(64, 16))
    dataset = TrainingImages(ListSource(wide), 16, 3, False, False, cache_bytes=4 * 3 * 16 * 16)
    assert not dataset.cached and dataset[(3, 0)].shape == (3, 16, 16)


def test_corrupt_file_in_a_cached_folder_is_reported_and_counted_while_decoding(tmp_path, capsys):
    write_pngs(tmp_path, 3)
    (tmp_path / "1.png").write_bytes(b"not a png")
    dataset = TrainingImages(load_images(None, None, str(tmp_path), None, 16, 0), 16, 3, False, False,
                             cache_bytes=2**20)
    [line] = skipped_lines(capsys.readouterr().out)  # before any image is drawn
    assert "1.png" in line and dataset.skipped == 1
    assert dataset.cached and torch.equal(dataset[(1, 0)], dataset[(2, 0)])


def test_datasets_is_imported_only_for_a_hub_dataset():
    import subprocess
    import sys

    code = ("import sys, ddpm.data; s = ddpm.data.load_images(None, None, None, None, 16, 0, 8); "
            "assert 'datasets' not in sys.modules, 'datasets was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hub_dataset_decodes_into_memory_as_when_streamed(tmp_path):
    datasets = pytest.importorskip("datasets")

    write_pngs(tmp_path / "pngs", 12)
    paths = [str(tmp_path / "pngs" / f"{i}.png") for i in range(12)]
    write_parquet_dataset(tmp_path / "ds", {"image": datasets.Image()}, {"image": paths})
    source = load_images(str(tmp_path / "ds"), None, None, None, 16, 0)
    cached = TrainingImages(source, 16, 3, False, True, cache_bytes=2**20)
    streamed = TrainingImages(source, 16, 3, False, True)
    assert cached.cached
    for i in range(12):
        assert torch.equal(cached[(i, i)], streamed[(i, i)])
