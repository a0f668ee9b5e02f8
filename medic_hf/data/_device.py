"""A clean set that lives on the training device: decoded once, augmented and normalised as batched tensor ops.

MEDIC's clean set is small by design (5% of a training set), so it fits decoded on any accelerator: CIFAR-10's 5%
is 2,500 × 3×32×32 bytes = 7.7 MB. Decoding JPEGs and augmenting them with PIL in the data loader at every step is
then the whole cost of a GPU run (a resnet18 step on 64 CIFAR images takes a few milliseconds). Here the images are
decoded and resized once, with the model's evaluation preprocessing, into one uint8 tensor; a batch is one index
into it, and the training augmentation (random crop with zero padding, horizontal flip — the same as the per-image
path of `medic_hf.data.build_transform`) and the normalisation run on the whole batch on the device.

Batches carry uint8 `pixel_values`; `DeviceBatchTransform` turns them into the model's float input inside the
cloner (`MedicCloner._model_input`), so nothing else in the Trainer changes. Data that does not fit the budget,
`IterableDataset`s and data sets with the user's own transform keep the per-image path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ._columns import _integer_labels
from ._prepare import collate_batch
from ._preprocessing import ConvertMode, ResizeCenterCrop

DECODE_BATCH = 256


class DeviceImageSet(torch.utils.data.Dataset):
    """uint8 images `(N, C, H, W)` and int64 labels `(N,)` on one device.

    Items are `{"pixel_values": uint8 (C, H, W), "labels": int64}`; `__getitems__` (used by torch's DataLoader for
    a whole batch of indices) returns the batch already stacked, with one indexing operation.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError("DeviceImageSet needs uint8 images (N, C, H, W) and one label per image.")
        self.images = images
        self.labels = labels

    @classmethod
    def from_dataset(
        cls,
        ds: datasets.Dataset,
        image_column: str,
        label_column: str | None,
        preprocessing: dict,
        device: torch.device | str = "cpu",
    ) -> DeviceImageSet:
        """Decode and resize every image once (evaluation preprocessing, without normalisation). Without a
        `label_column` (unlabeled images) every label is -1."""
        channels, height, width = preprocessing["input_size"]
        convert = ConvertMode("L" if channels == 1 else "RGB")
        resize = ResizeCenterCrop(
            (height, width), preprocessing.get("crop_pct", 1.0), preprocessing.get("interpolation")
        )
        images = torch.empty((len(ds), channels, height, width), dtype=torch.uint8)
        column = ds.select_columns([image_column])
        for start in range(0, len(ds), DECODE_BATCH):
            rows = column[start : start + DECODE_BATCH][image_column]
            for i, image in enumerate(rows):
                array = np.array(resize(convert(_as_pil(image))), dtype=np.uint8)
                array = array[:, :, None] if array.ndim == 2 else array
                images[start + i] = torch.from_numpy(array).permute(2, 0, 1)
        if label_column is None:
            labels = torch.full((len(ds),), -1, dtype=torch.int64)
        else:
            labels = torch.tensor(_integer_labels(ds, label_column), dtype=torch.int64)  # copied: read-only array
        return cls(images.to(device), labels.to(device))

    @staticmethod
    def nbytes(ds: datasets.Dataset, preprocessing: dict) -> int:
        """The memory the decoded set will take: N × C × H × W bytes."""
        return len(ds) * math.prod(preprocessing["input_size"])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[index], "labels": self.labels[index]}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long, device=self.labels.device)
        return {"pixel_values": self.images[index], "labels": self.labels[index]}


def collate(features):
    """The collator for both paths: a batch `DeviceImageSet.__getitems__` already stacked passes through; a list
    of rows is stacked by `medic_hf.data.collate_batch`."""
    return features if isinstance(features, dict) else collate_batch(features)


class DeviceBatchTransform:
    """uint8 batch -> normalised float batch on its device, with the training augmentation when `train`.

    Augmentation (per sample, as torchvision's `RandomCrop(size, padding=min(H, W) // 8)` + `RandomHorizontalFlip()`
    on PIL images): zero-pad by `pad` on every side, crop `H × W` at a random offset, flip half of the images. It
    draws from torch's global generator of the batch's device, which the Trainer seeds.
    """

    def __init__(self, preprocessing: dict):
        channels, height, width = preprocessing["input_size"]
        self.pad = min(height, width) // 8
        self.mean = torch.tensor(preprocessing["mean"], dtype=torch.float32).view(1, channels, 1, 1) * 255.0
        self.std = torch.tensor(preprocessing["std"], dtype=torch.float32).view(1, channels, 1, 1) * 255.0

    def __call__(self, images: torch.Tensor, *, train: bool) -> torch.Tensor:
        if train:
            images = random_crop_flip(images, self.pad)
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        return (images.float() - mean) / std


def keep_batches_on_device(args) -> None:
    """Trainer arguments for a `DeviceImageSet` on an accelerator: its batches are indexed on the device, so no
    worker processes and nothing to pin (pinning a device tensor fails)."""
    if args.device.type != "cpu":
        args.dataloader_num_workers = 0
        args.dataloader_pin_memory = False


def random_crop_flip(images: torch.Tensor, pad: int) -> torch.Tensor:
    """Per-sample random crop of a zero-padded batch and random horizontal flip, in one gather."""
    batch, _, height, width = images.shape
    device = images.device
    if pad > 0:
        padded = F.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (batch, 1), device=device)
        dx = torch.randint(0, 2 * pad + 1, (batch, 1), device=device)
    else:
        padded = images
        dy = dx = torch.zeros((batch, 1), dtype=torch.long, device=device)
    rows = dy + torch.arange(height, device=device)  # (B, H)
    cols = dx + torch.arange(width, device=device)  # (B, W)
    flip = torch.rand(batch, device=device) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    samples = torch.arange(batch, device=device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=device)[None, :, None, None]
    return padded[samples, channels, rows[:, None, :, None], cols[:, None, None, :]]


def _as_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    if isinstance(image, dict) and image.get("bytes") is not None:  # an undecoded datasets.Image value
        import io

        return Image.open(io.BytesIO(image["bytes"]))
    raise TypeError(f"Expected an image, got {type(image).__name__}.")
