"""The device-resident data gives the batches of the DataLoader path (EpochSampler + TrainingImages): the same
order, flips and pixels for the same seed and epoch, per rank and from a mid-epoch start; or refuses, saying why."""

import pytest
import torch

from ddpm.data import EpochSampler, TrainingImages, make_builtin_source
from ddpm.device_data import DeviceDataUnavailable, DeviceImages
from test_data import ListSource, noise_images

CPU = torch.device("cpu")


def loader_batches(dataset, sampler, batch_size, epoch, start):
    sampler.set_epoch(epoch, start)
    return list(torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True))


def device_batches(dataset, sampler, batch_size, epoch, start, device=CPU):
    sampler.set_epoch(epoch, start)
    return [batch.cpu() for batch in DeviceImages(dataset, sampler, batch_size, device)]


def assert_same_batches(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.dtype == y.dtype == torch.float32
        assert torch.equal(x, y)


@pytest.mark.parametrize("rank", [0, 1, 2])
@pytest.mark.parametrize("epoch, start", [(0, 0), (3, 2)])
def test_device_batches_equal_the_dataloaders_per_rank_with_flips_and_a_mid_epoch_start(rank, epoch, start):
    # 23 images over 3 ranks: 8 per rank, one padded; batches of 2
    dataset = TrainingImages(make_builtin_source(8, seed=0, size=23), 8, 3, center_crop=False, random_flip=True,
                             cache_bytes=2**20)
    sampler = EpochSampler(len(dataset), seed=5, rank=rank, world_size=3)
    assert_same_batches(device_batches(dataset, sampler, 2, epoch, start),
                        loader_batches(dataset, sampler, 2, epoch, start))


def test_device_batches_flip_about_half_the_images():
    dataset = TrainingImages(make_builtin_source(8, seed=0, size=64), 8, 3, center_crop=False, random_flip=True,
                             cache_bytes=2**20)
    unflipped = TrainingImages(make_builtin_source(8, seed=0, size=64), 8, 3, center_crop=False, random_flip=False,
                               cache_bytes=2**20)
    sampler = EpochSampler(len(dataset), seed=0)
    flipped = torch.cat(device_batches(dataset, sampler, 64, 0, 0))
    plain = torch.cat(device_batches(unflipped, sampler, 64, 0, 0))
    mirrored = [torch.equal(a, b.flip(-1)) and not torch.equal(a, b) for a, b in zip(flipped, plain)]
    assert 16 <= sum(mirrored) <= 48


def test_center_cropped_images_of_any_shape_give_the_dataloaders_batches():
    images = noise_images(5, (20, 12)) + noise_images(4, (9, 30))
    dataset = TrainingImages(ListSource(images), 8, 3, center_crop=True, random_flip=True, cache_bytes=2**20)
    sampler = EpochSampler(len(dataset), seed=1)
    assert_same_batches(device_batches(dataset, sampler, 3, 1, 1), loader_batches(dataset, sampler, 3, 1, 1))


def test_images_that_need_random_crops_are_refused_naming_one():
    dataset = TrainingImages(ListSource(noise_images(3, (20, 12))), 8, 3, center_crop=False, random_flip=True,
                             cache_bytes=2**20)
    with pytest.raises(DeviceDataUnavailable, match="test image 0 is 13x8 after resizing, not 8x8"):
        DeviceImages(dataset, EpochSampler(3, seed=0), 2, CPU)


def test_images_not_decoded_into_memory_are_refused():
    # the in-memory budget (cache_bytes) is one byte short of the images
    dataset = TrainingImages(make_builtin_source(8, seed=0, size=4), 8, 3, center_crop=False, random_flip=True,
                             cache_bytes=4 * 3 * 8 * 8 - 1)
    with pytest.raises(DeviceDataUnavailable, match="not in memory"):
        DeviceImages(dataset, EpochSampler(4, seed=0), 2, CPU)


def test_device_batches_do_not_change_the_global_rng():
    dataset = TrainingImages(make_builtin_source(8, seed=0, size=8), 8, 3, center_crop=False, random_flip=True,
                             cache_bytes=2**20)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    device_batches(dataset, EpochSampler(8, seed=0), 4, 0, 0)
    assert torch.equal(torch.rand(3), expected)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_cuda_batches_equal_the_cpu_dataloaders():
    dataset = TrainingImages(make_builtin_source(8, seed=0, size=23), 8, 3, center_crop=False, random_flip=True,
                             cache_bytes=2**20)
    sampler = EpochSampler(len(dataset), seed=5, rank=1, world_size=3)
    assert_same_batches(device_batches(dataset, sampler, 2, 2, 1, torch.device("cuda")),
                        loader_batches(dataset, sampler, 2, 2, 1))


@needs_cuda
def test_cuda_batches_over_an_epoch_boundary_never_synchronise_with_the_host():
    dataset = TrainingImages(make_builtin_source(8, seed=0, size=16), 8, 3, center_crop=False, random_flip=True,
                             cache_bytes=2**20)
    sampler = EpochSampler(len(dataset), seed=0)
    images = DeviceImages(dataset, sampler, 4, torch.device("cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for epoch in (0, 1):
            sampler.set_epoch(epoch, start=1 if epoch == 0 else 0)
            for batch in images:
                batch.sum()
    finally:
        torch.cuda.set_sync_debug_mode("default")
