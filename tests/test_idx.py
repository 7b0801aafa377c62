"""MNIST-format IDX files (ddpm/idx.py) and the fashion-mnist preset, on small IDX files written here."""

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import presets
from ddpm.data import DataError, TrainingImages, load_images
from ddpm.idx import has_split, read_idx_images
from oracle import single_thread  # noqa: F401  (autouse fixture)
from train_script import train


def idx_bytes(images: np.ndarray, magic: bytes = b"\x00\x00\x08\x03") -> bytes:
    """An IDX file: magic, one big-endian uint32 per dimension, the values."""
    return magic + np.array(images.shape, dtype=">u4").tobytes() + images.astype(np.uint8).tobytes()


def write_idx(path: Path, images: np.ndarray, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(images)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def random_images(count: int, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size), dtype=np.uint8)


def idx_folder(folder: Path, gz: bool = True, size: int = 8) -> tuple[Path, np.ndarray, np.ndarray]:
    """A folder as the MNIST downloads: train and t10k images (different ones) and a labels file."""
    suffix = ".gz" if gz else ""
    train_images, test_images = random_images(6, size, seed=1), random_images(3, size, seed=2)
    write_idx(folder / f"train-images-idx3-ubyte{suffix}", train_images, gz)
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", test_images, gz)
    (folder / f"train-labels-idx1-ubyte{suffix}").write_bytes(b"\x00\x00\x08\x01" + np.array([6], ">u4").tobytes()
                                                              + bytes(6))
    return folder, train_images, test_images


def pixels(source) -> np.ndarray:
    return np.stack([np.asarray(source.get(i)) for i in range(len(source))])


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw"])
def test_an_idx_file_reads_back_the_pixels_written(tmp_path, gz):
    images = random_images(5, size=7)
    np.testing.assert_array_equal(read_idx_images(write_idx(tmp_path / "x-images-idx3-ubyte", images, gz)), images)


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw"])
def test_a_folder_of_idx_files_gives_train_images_by_default_and_t10k_images_for_the_test_split(tmp_path, gz):
    folder, train_images, test_images = idx_folder(tmp_path, gz)
    train_split = load_images(None, None, str(folder), None, 8, 0)
    test_split = load_images(None, None, str(folder), None, 8, 0, split="test")
    assert train_split.get(0).mode == "L"
    np.testing.assert_array_equal(pixels(train_split), train_images)
    np.testing.assert_array_equal(pixels(test_split), test_images)
    assert "t10k-images-idx3-ubyte" in test_split.description and "3 images of 8x8" in test_split.description


def test_a_folder_with_both_a_gzipped_and_a_raw_copy_reads_one_of_them(tmp_path):
    images = random_images(4)
    write_idx(tmp_path / "train-images-idx3-ubyte", images, gz=False)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, gz=True)
    np.testing.assert_array_equal(pixels(load_images(None, None, str(tmp_path), None, 8, 0)), images)


def test_kaggle_style_dotted_names_are_read_for_both_splits(tmp_path):
    train_images, test_images = random_images(3), random_images(2)
    write_idx(tmp_path / "train-images.idx3-ubyte", train_images, gz=False)
    write_idx(tmp_path / "t10k-images.idx3-ubyte", test_images, gz=False)
    write_idx(tmp_path / "train-labels.idx1-ubyte", random_images(3), gz=False)  # not an images file: ignored
    assert has_split(tmp_path, "test")
    np.testing.assert_array_equal(pixels(load_images(None, None, str(tmp_path), None, 8, 0)), train_images)
    np.testing.assert_array_equal(pixels(load_images(None, None, str(tmp_path), None, 8, 0, split="test")),
                                  test_images)


@pytest.mark.parametrize("cache_bytes", [0, 2**20], ids=["streamed", "cached"])
def test_idx_images_stay_one_channel_for_a_one_channel_model(tmp_path, cache_bytes):
    folder, train_images, _ = idx_folder(tmp_path)
    dataset = TrainingImages(load_images(None, None, str(folder), None, 8, 0), 8, 1, center_crop=True,
                             random_flip=False, cache_bytes=cache_bytes)
    assert dataset.cached == (cache_bytes > 0)
    x = dataset[(2, 0)]
    assert x.shape == (1, 8, 8)
    torch.testing.assert_close(x[0], torch.from_numpy(train_images[2] / 127.5 - 1).float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("cache_bytes", [0, 2**20], ids=["streamed", "cached"])
def test_idx_images_become_grey_rgb_for_a_three_channel_model(tmp_path, cache_bytes):
    folder, train_images, _ = idx_folder(tmp_path)
    dataset = TrainingImages(load_images(None, None, str(folder), None, 8, 0), 8, 3, center_crop=True,
                             random_flip=False, cache_bytes=cache_bytes)
    x = dataset[(2, 0)]
    assert x.shape == (3, 8, 8)
    for channel in x:
        torch.testing.assert_close(channel, torch.from_numpy(train_images[2] / 127.5 - 1).float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw"])
def test_a_truncated_file_is_a_data_error_naming_it_and_the_sizes(tmp_path, gz):
    path = tmp_path / "train-images-idx3-ubyte"
    data = idx_bytes(random_images(4))[:-10]  # 4 x 8 x 8 = 256 bytes of pixels promised, 246 there
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError) as error:
        load_images(None, None, str(tmp_path), None, 8, 0)
    message = str(error.value)
    assert str(path) in message and "truncated: 246 bytes of pixels" in message and "4 x 8 x 8 = 256" in message
    assert len(message.splitlines()) == 1


def test_a_cut_off_gzip_stream_is_a_data_error_naming_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(random_images(50)))[:200])
    with pytest.raises(DataError, match=re.escape(f"cannot read IDX file '{path}'")):
        read_idx_images(path)


def test_a_bad_magic_is_a_data_error_naming_the_file_and_the_bytes_seen(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    Image.new("L", (8, 8)).save(path, format="PNG")  # a PNG under an IDX name
    with pytest.raises(DataError) as error:
        read_idx_images(path)
    assert str(error.value) == f"'{path}' is not an IDX file: bad magic 89 50 4e 47, expected 00 00 08 03"


def test_a_labels_file_under_an_images_name_is_a_data_error_naming_its_type_and_dimensions(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08\x01" + np.array([6], ">u4").tobytes() + bytes(6))
    with pytest.raises(DataError, match="holds type 0x08 with 1 dimensions; images are unsigned bytes"):
        read_idx_images(path)


def test_a_file_longer_than_its_header_says_is_a_data_error(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(random_images(2)) + bytes(5))
    with pytest.raises(DataError, match="is too long: 133 bytes of pixels, its header says 2 x 8 x 8 = 128"):
        read_idx_images(path)


def test_a_folder_without_the_splits_file_names_the_idx_files_it_holds(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", random_images(2), gz=True)
    seen = "no train-images-idx3-ubyte .* for the train split .* IDX files there: t10k-images-idx3-ubyte.gz"
    with pytest.raises(DataError, match=seen):
        load_images(None, None, str(tmp_path), None, 8, 0)


# -----------------------------------------------------------------------------
# The fashion-mnist preset, trained in this process as train.py runs it


# The preset, cut to one step at batch 4 and a 2-step sample grid of 2 images
ONE_STEP = ["--preset", "fashion-mnist", "--device", "cpu", "--max_train_steps", "1", "--train_batch_size", "4",
            "--eval_batch_size", "2", "--ddpm_num_inference_steps", "2"]


def test_the_fashion_mnist_preset_trains_a_one_channel_28px_model_on_its_default_folder(tmp_path, monkeypatch):
    folder, _, _ = idx_folder(tmp_path / "fashion-mnist", size=28)
    monkeypatch.setitem(presets.PRESETS["fashion-mnist"], "train_data_dir", str(folder))
    train.main([*ONE_STEP, "--output_dir", str(tmp_path / "out")])
    config = json.loads((tmp_path / "out" / "unet" / "config.json").read_text())
    assert (config["in_channels"], config["out_channels"], config["sample_size"]) == (1, 1, 28)
    [grid_png] = (tmp_path / "out" / "samples").glob("*.png")
    with Image.open(grid_png) as grid:
        # make_grid: two 28x28 images side by side, 2-pixel padding (62 x 32), enlarged 8x to reach 256 px
        assert grid.size == (8 * (2 + 2 * 30), 8 * (2 + 30))


def test_the_fashion_mnist_preset_without_its_folder_says_in_one_line_how_to_get_the_data(tmp_path, monkeypatch):
    missing = tmp_path / "no-such-folder"
    monkeypatch.setitem(presets.PRESETS["fashion-mnist"], "train_data_dir", str(missing))
    with pytest.raises(SystemExit) as stopped:
        train.main([*ONE_STEP, "--output_dir", str(tmp_path / "out")])
    message = str(stopped.value.code)
    assert message.startswith(f"train.py: error: preset fashion-mnist reads {missing}, which does not exist")
    for way in ("apt-get install dataset-fashion-mnist", "--train_data_dir", "--dataset_name fashion_mnist"):
        assert way in message
    assert len(message.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_train_data_dir_replaces_the_presets_folder(tmp_path, monkeypatch):
    folder, _, _ = idx_folder(tmp_path / "mine", size=28)
    monkeypatch.setitem(presets.PRESETS["fashion-mnist"], "train_data_dir", str(tmp_path / "no-such-folder"))
    train.main([*ONE_STEP, "--output_dir", str(tmp_path / "out"), "--train_data_dir", str(folder)])
    assert (tmp_path / "out" / "unet" / "config.json").is_file()


@pytest.mark.parametrize("other", [["--dataset_name", "fashion_mnist"], ["--builtin_data"]])
def test_a_hub_dataset_or_the_builtin_shapes_replace_the_presets_folder(other):
    args = train.parse_args(["--preset", "fashion-mnist", *other])
    assert args.train_data_dir is None
