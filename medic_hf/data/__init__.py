"""Data loading and preprocessing for MEDIC.

MEDIC clones a (possibly trojaned) teacher into a fresh student on a *small* clean data set, so this module
covers the whole path from "a name or a folder" to batches of ``{"pixel_values", "labels"}``:

1. :func:`load_image_dataset` loads a local parquet folder / file, a local image folder, or a Hub data set.
2. :func:`find_columns` finds the image and label columns (``img``/``image``, ``label``/``labels``, ...).
3. :func:`class_balanced_subset` draws the small clean set, the same number of rows per class.
4. :func:`resolve_preprocessing` reads input size, mean and std from a timm model, a transformers image
   processor or a transformers model config.
5. :func:`build_transform` turns that into a PIL -> tensor transform (with light augmentation for training).
6. :func:`prepare_dataset` attaches the transform lazily and validates the labels *before* any training starts.
   :func:`prepare_for_model` runs steps 2, 4, 5 and 6 for a model, as the cloner, the defenses and the scripts do.
7. :func:`collate_batch` stacks items into a batch (``transformers.default_data_collator`` works as well).

Items produced by :func:`prepare_dataset` are dicts ``{"pixel_values": float32 [C, H, W], "labels": int64 []}``.

8. :class:`DeviceImageSet` and :class:`DeviceBatchTransform` hold a small clean set decoded once on the training
   device and augment it as batched tensor ops (``_device.py``).

The code lives in private modules, one per step: ``_loading`` (1), ``_columns`` (2), ``_subset`` (3),
``_preprocessing`` (4, 5), ``_prepare`` (6, 7), ``_device`` (8) and ``_constants``. Import from ``medic_hf.data``.
"""

from ._columns import _integer_labels as _integer_labels
from ._columns import find_columns, find_image_column
from ._constants import (
    IMAGE_COLUMN_NAMES,
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LABEL_COLUMN_NAMES,
    MAX_TORCH_ITEMS_TO_SCAN,
    SPLIT_NAMES,
    VIT_MEAN,
    VIT_STD,
)
from ._device import (
    DECODE_BATCH,
    DeviceBatchTransform,
    DeviceImageSet,
    collate,
    keep_batches_on_device,
    random_crop_flip,
)
from ._loading import load_image_dataset
from ._prepare import (
    BatchTransform,
    TorchImageDataset,
    check_labels,
    collate_batch,
    prepare_dataset,
    prepare_for_model,
    subset_from_args,
)
from ._preprocessing import ConvertMode, ResizeCenterCrop, build_transform, resolve_preprocessing
from ._subset import class_balanced_subset

__all__ = [
    "DECODE_BATCH",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_COLUMN_NAMES",
    "IMAGE_EXTENSIONS",
    "LABEL_COLUMN_NAMES",
    "MAX_TORCH_ITEMS_TO_SCAN",
    "SPLIT_NAMES",
    "VIT_MEAN",
    "VIT_STD",
    "BatchTransform",
    "ConvertMode",
    "DeviceBatchTransform",
    "DeviceImageSet",
    "ResizeCenterCrop",
    "TorchImageDataset",
    "build_transform",
    "check_labels",
    "class_balanced_subset",
    "collate",
    "collate_batch",
    "keep_batches_on_device",
    "find_columns",
    "find_image_column",
    "load_image_dataset",
    "prepare_dataset",
    "prepare_for_model",
    "random_crop_flip",
    "resolve_preprocessing",
    "subset_from_args",
]
