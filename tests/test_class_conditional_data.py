"""Class labels from every data source (ImageSource.classes) and TrainingImages(with_labels=True)."""

import gzip
import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.transforms.functional import pil_to_tensor

from ddpm import idx
from ddpm.data import DataError, ShapesSource, TrainingImages, load_images, make_builtin_source
from ddpm.shapes_score import CLASSES, fit
from oracle import single_thread  # noqa: F401  (autouse fixture)
from test_data import ListSource, noise_images, write_parquet_dataset
from test_idx import idx_folder, write_idx

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# -----------------------------------------------------------------------------
# The built-in shapes: 24 classes, shape x colour x background, in shapes_score.CLASSES order


def test_builtin_class_names_are_shape_colour_background_in_the_order_of_the_shapes_score():
    names, _ = make_builtin_source(16, seed=0, size=4).classes()
    assert len(names) == len(CLASSES) == 24
    assert names[:3] == ["circle-red-white", "circle-red-black", "circle-green-white"]
    assert names[-1] == "triangle-orange-black"
    colour_names = dict(zip(ShapesSource.COLORS, ShapesSource.COLOR_NAMES))
    background_names = dict(zip(ShapesSource.BACKGROUNDS, ShapesSource.BACKGROUND_NAMES))
    assert names == [f"{shape}-{colour_names[colour]}-{background_names[background]}"
                     for shape, colour, background in CLASSES]


def test_builtin_labels_are_the_classes_the_shapes_score_fits_to_the_pixels():
    source = make_builtin_source(16, seed=3, size=48)
    _, labels = source.classes()
    images = torch.stack([pil_to_tensor(source.get(i)) for i in range(len(source))]).float() / 255
    assert torch.equal(fit(images).classes, labels)
    assert len(set(labels.tolist())) > 12  # many classes, not one label for all


def test_builtin_labels_cover_the_24_classes_about_uniformly():
    _, labels = make_builtin_source(8, seed=0, size=2400).classes()
    counts = torch.bincount(labels, minlength=24)
    assert counts.min() > 60 and counts.max() < 140  # 100 expected each


# -----------------------------------------------------------------------------
# IDX folders: the label file beside the images of each split


def write_labels(path: Path, labels, gz: bool = True) -> bytes:
    data = b"\x00\x00\x08\x01" + np.array([len(labels)], ">u4").tobytes() + bytes(labels)
    path.write_bytes(gzip.compress(data) if gz else data)
    return data


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw"])
def test_idx_labels_are_read_for_each_split_and_named_by_number(tmp_path, gz):
    folder, _, _ = idx_folder(tmp_path, gz=gz)
    suffix = ".gz" if gz else ""
    write_labels(folder / f"train-labels-idx1-ubyte{suffix}", [3, 0, 1, 3, 2, 0], gz)
    write_labels(folder / f"t10k-labels-idx1-ubyte{suffix}", [1, 1, 0], gz)
    names, labels = load_images(None, None, str(folder), None, 8, 0).classes()
    assert names == ["0", "1", "2", "3"] and labels.tolist() == [3, 0, 1, 3, 2, 0] and labels.dtype == torch.int64
    names, labels = load_images(None, None, str(folder), None, 8, 0, split="test").classes()
    assert names == ["0", "1"] and labels.tolist() == [1, 1, 0]


def test_kaggle_style_dotted_label_file_names_are_read(tmp_path):
    write_idx(tmp_path / "train-images.idx3-ubyte", np.zeros((3, 8, 8)), gz=False)
    write_labels(tmp_path / "train-labels.idx1-ubyte", [2, 0, 1], gz=False)
    assert load_images(None, None, str(tmp_path), None, 8, 0).classes()[1].tolist() == [2, 0, 1]


def test_fashion_mnist_labels_are_recognised_by_their_file_and_named(tmp_path, monkeypatch):
    folder, _, _ = idx_folder(tmp_path)
    data = write_labels(folder / "train-labels-idx1-ubyte.gz", [9, 0, 0, 3, 0, 2])
    monkeypatch.setattr(idx, "FASHION_MNIST_LABELS_SHA256", {hashlib.sha256(data).hexdigest()})
    names, labels = load_images(None, None, str(folder), None, 8, 0).classes()
    assert names == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                     "Ankle boot"]
    assert labels.tolist() == [9, 0, 0, 3, 0, 2]


def test_other_labels_with_ten_classes_are_named_by_number(tmp_path):
    folder, _, _ = idx_folder(tmp_path)
    write_labels(folder / "train-labels-idx1-ubyte.gz", [9, 0, 0, 3, 0, 2])
    assert load_images(None, None, str(folder), None, 8, 0).classes()[0] == [str(k) for k in range(10)]


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist")
@pytest.mark.parametrize("split", ["train", "test"])
def test_the_real_fashion_mnist_files_are_recognised(split):
    names, labels = load_images(None, None, str(FASHION_MNIST_DIR), None, 28, 0, split=split).classes()
    assert names[9] == "Ankle boot" and labels[0] == 9
    assert torch.equal(torch.bincount(labels), torch.full((10,), len(labels) // 10))


def test_an_idx_folder_without_a_label_file_is_a_data_error_naming_the_file_it_needs(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((3, 8, 8)), gz=True)
    with pytest.raises(DataError) as error:
        load_images(None, None, str(tmp_path), None, 8, 0).classes()
    assert "no class labels for train-images-idx3-ubyte.gz: no train-labels-idx1-ubyte" in one_line(error)


def test_an_idx_label_file_of_another_length_is_a_data_error_giving_both_counts(tmp_path):
    folder, _, _ = idx_folder(tmp_path)  # 6 train images
    write_labels(folder / "train-labels-idx1-ubyte.gz", [1, 2, 3])
    with pytest.raises(DataError, match="3 class labels for 6 images"):
        load_images(None, None, str(folder), None, 8, 0).classes()


def test_an_images_file_under_a_labels_name_is_a_data_error(tmp_path):
    folder, _, _ = idx_folder(tmp_path)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros((6, 8, 8)), gz=True)
    with pytest.raises(DataError, match="holds type 0x08 with 3 dimensions; labels are unsigned bytes .* with 1"):
        load_images(None, None, str(folder), None, 8, 0).classes()


# -----------------------------------------------------------------------------
# Image folders: one subfolder per class, torchvision's ImageFolder rule


def class_folder(root: Path, layout: dict[str, int]) -> Path:
    for k, (name, count) in enumerate(layout.items()):
        (root / name).mkdir(parents=True)
        for i, image in enumerate(noise_images(count, (8, 8), seed=k)):
            image.save(root / name / f"{i}.png")
    return root


def test_folder_classes_and_labels_equal_torchvisions_imagefolder(tmp_path):
    root = class_folder(tmp_path / "data", {"zebra": 2, "ant": 3, "Moth": 1, "cat": 2})
    names, labels = load_images(None, None, str(root), None, 8, 0).classes()
    reference = ImageFolder(str(root))
    assert names == reference.classes == ["Moth", "ant", "cat", "zebra"]
    assert labels.tolist() == reference.targets


def test_images_in_deeper_folders_take_the_class_of_their_top_subfolder(tmp_path):
    root = class_folder(tmp_path / "data", {"a": 1, "b": 1})
    (root / "b" / "more" / "deeper").mkdir(parents=True)
    noise_images(1, (8, 8))[0].save(root / "b" / "more" / "deeper" / "x.png")
    source = load_images(None, None, str(root), None, 8, 0)
    names, labels = source.classes()
    assert names == ["a", "b"]
    assert dict(zip(map(str, source.files), labels.tolist()))[str(root / "b" / "more" / "deeper" / "x.png")] == 1


def test_a_folder_without_subfolders_is_a_data_error_saying_images_have_no_classes(tmp_path):
    for i, image in enumerate(noise_images(2, (8, 8))):
        image.save(tmp_path / f"{i}.png")
    with pytest.raises(DataError) as error:
        load_images(None, None, str(tmp_path), None, 8, 0).classes()
    assert f"--train_data_dir {str(tmp_path)!r} has no subfolders, so its images have no classes" in one_line(error)


def test_an_image_beside_the_class_subfolders_is_a_data_error_naming_it(tmp_path):
    root = class_folder(tmp_path / "data", {"a": 1, "b": 1})
    noise_images(1, (8, 8))[0].save(root / "stray.png")
    with pytest.raises(DataError) as error:
        load_images(None, None, str(root), None, 8, 0).classes()
    assert "image 'stray.png' lies directly in --train_data_dir" in one_line(error)


def test_a_class_subfolder_without_images_is_a_data_error_naming_it(tmp_path):
    root = class_folder(tmp_path / "data", {"a": 1, "b": 1})
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError) as error:
        load_images(None, None, str(root), None, 8, 0).classes()
    assert "class subfolder 'notes'" in one_line(error) and "holds no images" in str(error.value)


# -----------------------------------------------------------------------------
# Hub datasets: a ClassLabel column (label_column, default "label"), read from a local dataset, offline


def hub_dataset(folder: Path, labels, feature=None, column: str = "label"):
    import datasets

    pngs = folder / "pngs"
    pngs.mkdir(parents=True)
    paths = []
    for i, image in enumerate(noise_images(len(labels), (8, 8))):
        image.save(pngs / f"{i}.png")
        paths.append(str(pngs / f"{i}.png"))
    feature = feature or datasets.ClassLabel(names=["cat", "dog", "bird"])
    write_parquet_dataset(folder / "ds", {"image": datasets.Image(), column: feature},
                          {"image": paths, column: labels})
    return str(folder / "ds")


def test_a_class_label_column_gives_its_names_and_labels(tmp_path):
    source = load_images(hub_dataset(tmp_path, [2, 0, 1, 1]), None, None, None, 8, 0)
    names, labels = source.classes()
    assert names == ["cat", "dog", "bird"] and labels.tolist() == [2, 0, 1, 1]


def test_label_column_names_another_column(tmp_path):
    folder = hub_dataset(tmp_path, [1, 1, 0], column="fine_label")
    names, labels = load_images(folder, None, None, None, 8, 0, label_column="fine_label").classes()
    assert names == ["cat", "dog", "bird"] and labels.tolist() == [1, 1, 0]


def test_an_integer_label_column_names_its_classes_by_number(tmp_path):
    import datasets

    folder = hub_dataset(tmp_path, [4, 0, 2], feature=datasets.Value("int64"))
    names, labels = load_images(folder, None, None, None, 8, 0).classes()
    assert names == ["0", "1", "2", "3", "4"] and labels.tolist() == [4, 0, 2]


def test_a_missing_label_column_is_a_data_error_listing_the_columns(tmp_path):
    folder = hub_dataset(tmp_path, [0, 1])
    with pytest.raises(DataError) as error:
        load_images(folder, None, None, None, 8, 0, label_column="class").classes()
    assert "has no label column 'class' (columns: image (Image), label (ClassLabel)); pass --label_column" \
        in one_line(error)


def test_a_label_column_of_text_is_a_data_error_naming_its_type(tmp_path):
    import datasets

    folder = hub_dataset(tmp_path, ["a", "b"], feature=datasets.Value("string"))
    with pytest.raises(DataError, match="column 'label' of dataset .* holds Value.*string.*not class labels"):
        load_images(folder, None, None, None, 8, 0).classes()


def test_a_label_outside_the_class_range_is_a_data_error_naming_the_value_and_the_row(tmp_path):
    folder = hub_dataset(tmp_path, [0, -1, 2])  # -1: ClassLabel's "no label"
    with pytest.raises(DataError) as error:
        load_images(folder, None, None, None, 8, 0).classes()
    assert "class label -1 of row 1 of" in one_line(error) and "is outside [0, 2] (3 classes)" in str(error.value)


# -----------------------------------------------------------------------------
# TrainingImages: (image, label) with labels, exactly today's tensors without


def test_with_labels_an_item_is_the_image_without_labels_and_its_label():
    source = make_builtin_source(8, seed=0, size=10)
    plain = TrainingImages(source, 8, 3, center_crop=False, random_flip=True)
    labelled = TrainingImages(source, 8, 3, center_crop=False, random_flip=True, with_labels=True)
    _, labels = source.classes()
    assert labelled.class_names == source.classes()[0]
    for key in [(0, 5), (3, 2**61 + 1), (9, 7)]:
        image, label = labelled[key]
        assert type(plain[key]) is torch.Tensor and torch.equal(image, plain[key])
        assert label == labels[key[0]]


def test_without_labels_the_source_classes_are_never_read():
    class NoClasses(ListSource):
        def classes(self):
            raise AssertionError("classes() read by an unconditional dataset")

    dataset = TrainingImages(NoClasses(noise_images(2, (8, 8))), 8, 3, False, False)
    assert dataset.class_names is None and type(dataset[(1, 0)]) is torch.Tensor


def test_with_labels_a_source_without_classes_is_a_data_error():
    with pytest.raises(DataError, match="these images have no class labels"):
        TrainingImages(ListSource(noise_images(2, (8, 8))), 8, 3, False, False, with_labels=True)


def test_reading_the_labels_leaves_the_global_random_states_alone():
    torch_state, python_state, numpy_state = torch.get_rng_state(), random.getstate(), np.random.get_state()[1]
    TrainingImages(make_builtin_source(8, seed=0, size=50), 8, 3, False, True, with_labels=True)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    assert np.array_equal(np.random.get_state()[1], numpy_state)


def test_a_dataloader_batches_images_and_int64_labels(tmp_path):
    root = class_folder(tmp_path / "data", {"a": 2, "b": 2})
    dataset = TrainingImages(load_images(None, None, str(root), None, 8, 0), 8, 3, False, False, with_labels=True)
    images, labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4, sampler=[(3, 0), (0, 0), (2, 0),
                                                                                           (1, 0)])))
    assert images.shape == (4, 3, 8, 8) and labels.dtype == torch.int64 and labels.tolist() == [1, 0, 1, 0]


@pytest.mark.parametrize("cache_bytes", [0, 2**20], ids=["streamed", "cached"])
def test_an_unreadable_image_is_replaced_with_the_label_of_the_image_standing_in(tmp_path, cache_bytes):
    root = class_folder(tmp_path / "data", {"a": 2, "b": 2})
    (root / "a" / "1.png").write_bytes(b"not a png")  # index 1; index 2, the next readable image, is b's
    dataset = TrainingImages(load_images(None, None, str(root), None, 8, 0), 8, 3, False, False,
                             cache_bytes=cache_bytes, report=False, with_labels=True)
    image, label = dataset[(1, 0)]
    assert torch.equal(image, dataset[(2, 0)][0]) and label == 1
    decoded, label = dataset.decoded_with_label(1)
    assert torch.equal(decoded, dataset.decoded(2)) and label == 1


def test_a_label_source_error_names_the_image(tmp_path):
    class BadLabels(ListSource):
        def classes(self):
            from ddpm.image_source import checked_labels

            return checked_labels(self, ["x", "y"], [0, 1, 7])

    with pytest.raises(DataError) as error:
        TrainingImages(BadLabels(noise_images(3, (8, 8))), 8, 3, False, False, with_labels=True)
    assert "class label 7 of test image 2 is outside [0, 1] (2 classes)" in one_line(error)


def test_images_of_a_source_whose_classes_are_images_are_not_changed_by_asking_for_labels(tmp_path):
    """The image half of a labelled item is the unlabelled item, for a folder source too (no reordering)."""
    root = class_folder(tmp_path / "data", {"b": 2, "a": 3})
    source = load_images(None, None, str(root), None, 8, 0)
    plain = TrainingImages(source, 8, 3, False, True)
    labelled = TrainingImages(source, 8, 3, False, True, with_labels=True)
    for i in range(5):
        assert torch.equal(labelled[(i, i)][0], plain[(i, i)])
        assert np.array_equal(np.asarray(Image.open(source.files[i]).convert("RGB")),
                              np.asarray(source.get(i).convert("RGB")))
