"""Small datasets kept on the training device: the decoded images as one uint8 tensor, batches drawn by indexing.

A DataLoader does Python work for every image, which at 32x32 on a fast GPU costs more than the step. Here an
epoch costs one call to EpochSampler.keys() on the host (the order and the augmentation draws of the DataLoader
path, so the batches are the same), one copy of its indices and flips to the device, queued without waiting for it,
and per batch an index_select, a flip and a table lookup to [-1, 1] on the device: no host synchronisation. With
class labels (TrainingImages(with_labels=True)) a batch is (images, labels), the labels indexed on the device too.

Only images that need no random crop qualify (all resolution x resolution after resizing, or --center_crop):
random crops of larger images stay on the DataLoader path.
"""

from collections.abc import Iterator

import torch

from .data import CACHE_BYTES, EpochSampler, TrainingImages, crop_and_flip


class DeviceDataUnavailable(Exception):
    """The images cannot be kept on the device; the message says why."""


class DeviceImages:
    """The batches of the sampler's current epoch (after set_epoch), as a DataLoader with drop_last=True gives them."""

    def __init__(self, dataset: TrainingImages, sampler: EpochSampler, batch_size: int, device: torch.device):
        if not dataset.cached:
            raise DeviceDataUnavailable("the decoded images are not in memory (--no-cache_images, or they take more "
                                        f"than the {CACHE_BYTES / 2**30:g} GiB a process keeps)")
        resolution = dataset.resolution
        images, labels = [], []
        for index in range(len(dataset)):
            if dataset.labels is None:
                image = dataset.decoded(index)
            else:
                image, label = dataset.decoded_with_label(index)
                labels.append(label)
            if not dataset.center_crop and image.shape[-2:] != (resolution, resolution):
                height, width = image.shape[-2:]
                raise DeviceDataUnavailable(f"{dataset.source.describe(index)} is {width}x{height} after resizing, "
                                            f"not {resolution}x{resolution}, so each batch needs random crops "
                                            "(--center_crop avoids them)")
            images.append(crop_and_flip(image, resolution, dataset.center_crop, False, 0))  # the crop is fixed
        self.images = torch.stack(images).to(device)
        self.labels = torch.tensor(labels, dtype=torch.int64, device=device) if dataset.labels is not None else None
        # The 256 values a pixel can take, mapped to [-1, 1] on the host by the DataLoader path's own transforms:
        # a lookup on the device then gives the same floats as that path, on any device.
        levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 256)
        self.to_model_range = dataset.to_model_range(levels).flatten().to(device)
        self.sampler, self.batch_size, self.device = sampler, batch_size, device
        self.random_flip = dataset.random_flip

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        indices, draws = self.sampler.keys()
        indices, flips = self._to_device(indices), self._to_device((draws & 1).bool())  # bit 0: the flip
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = indices[start:start + self.batch_size]
            images = self._batch(batch, flips[start:start + self.batch_size])
            yield images if self.labels is None else (images, self.labels.index_select(0, batch))

    def _batch(self, indices: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        images = self.images.index_select(0, indices)
        if self.random_flip:
            images = torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)
        return self.to_model_range[images.long()]

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()  # from pinned memory the copy is queued; from pageable memory it would wait
        return tensor.to(self.device, non_blocking=True)
