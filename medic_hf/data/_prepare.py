"""Preparing data sets for training: label checks, lazy transforms, torch data set adapters, collation."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from ._columns import _find_image_column, _find_label_column, _integer_labels, find_columns
from ._constants import MAX_TORCH_ITEMS_TO_SCAN
from ._preprocessing import build_transform, resolve_preprocessing
from ._subset import class_balanced_subset

# --------------------------------------------------------------------------------------------------------------------
# Preparing data sets for training
# --------------------------------------------------------------------------------------------------------------------


def prepare_dataset(
    ds: datasets.Dataset | torch.utils.data.Dataset,
    *,
    transform: Callable | None,
    num_classes: int | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
) -> datasets.Dataset | torch.utils.data.Dataset:
    """Validate the labels, then return a data set whose items are ``{"pixel_values", "labels"}`` tensors.

    * ``datasets.Dataset``: the transform is attached with ``with_transform`` (batched, applied on access, nothing
      written to disk); rows already holding ``pixel_values`` / ``labels`` are converted to tensors as they are
      and ``transform`` is not used. Only the two output keys come out, so a transformers ``Trainer`` needs
      ``remove_unused_columns=False`` (otherwise it drops the image/label columns before the transform runs).
    * a torch ``Dataset`` yielding ``(image, label)`` tuples or dicts: wrapped in :class:`TorchImageDataset`, which
      applies ``transform`` to PIL images and passes tensors through.

    Labels must be integers in ``[0, num_classes)`` (``num_classes`` defaults to the ClassLabel's class count);
    anything else raises ``ValueError`` naming the offending values and the fix, before any training starts.
    """
    if isinstance(ds, datasets.DatasetDict):
        raise TypeError(f"Pass one split, e.g. ds['train'], not a DatasetDict with splits {list(ds)}.")
    if isinstance(ds, datasets.Dataset):
        return _prepare_hf_dataset(ds, transform, num_classes, image_column, label_column)
    if isinstance(ds, torch.utils.data.Dataset):
        dataset = TorchImageDataset(ds, transform, num_classes, image_key=image_column, label_key=label_column)
        dataset.validate_labels()
        return dataset
    raise TypeError(f"Expected a datasets.Dataset or a torch.utils.data.Dataset, got {type(ds).__name__}.")


def prepare_for_model(
    dataset: datasets.Dataset | torch.utils.data.Dataset,
    model: Any,
    *,
    train: bool,
    image_processor: Any = None,
    preprocessing: dict | None = None,
    num_classes: int | None = None,
    augment: bool = True,
    **overrides: Any,
) -> datasets.Dataset | torch.utils.data.Dataset:
    """:func:`prepare_dataset` for ``model``: the one place that decides how a data set is fed to a model, so the
    cloner, the defenses and the scripts preprocess alike.

    Runs :func:`find_columns`, :func:`resolve_preprocessing` (of ``model`` and ``image_processor``, with the
    ``overrides`` ``input_size`` / ``mean`` / ``std``; skipped when ``preprocessing`` is given), then
    :func:`build_transform` (crop + flip only when ``train and augment``). Rows of ready ``pixel_values`` need no
    preprocessing. Neither does a torch data set of tensors, so there a model whose preprocessing is unknown (a
    plain PyTorch model) is no error: PIL items, if any, raise when read. An image column raises
    :func:`resolve_preprocessing`'s ValueError at once, which says what to pass.
    """
    image_column = label_column = None
    if isinstance(dataset, datasets.Dataset):
        image_column, label_column = find_columns(dataset)
    transform = None
    if image_column != "pixel_values":
        try:
            if preprocessing is None:
                preprocessing = resolve_preprocessing(model, image_processor, **overrides)
        except ValueError:
            if image_column is not None:
                raise
            # A torch data set of ready tensors needs no preprocessing; PIL items then raise a clear error.
        else:
            transform = build_transform(preprocessing, train=train and augment)
    return prepare_dataset(
        dataset, transform=transform, num_classes=num_classes, image_column=image_column, label_column=label_column
    )


def _prepare_hf_dataset(
    ds: datasets.Dataset,
    transform: Callable | None,
    num_classes: int | None,
    image_column: str | None,
    label_column: str | None,
) -> datasets.Dataset:
    if image_column is None and label_column is None:
        image_column, label_column = find_columns(ds)
    image_column = image_column or _find_image_column(ds)
    label_column = label_column or _find_label_column(ds)
    if num_classes is None and isinstance(ds.features.get(label_column), datasets.ClassLabel):
        num_classes = ds.features[label_column].num_classes
    labels = _integer_labels(ds, label_column)
    _check_label_range(labels, num_classes)

    if image_column == "pixel_values":
        batch_transform = BatchTransform(None, image_column, label_column)
    else:
        if transform is None:
            raise ValueError(
                f"Column '{image_column}' holds images: pass transform=build_transform(resolve_preprocessing(model), "
                "train=...)."
            )
        batch_transform = BatchTransform(transform, image_column, label_column)
    return ds.with_transform(batch_transform, columns=[image_column, label_column])


class BatchTransform:
    """Batched ``with_transform`` callable: images -> stacked ``pixel_values``, labels -> int64 ``labels``.

    With ``transform=None`` the image column already holds pixel values (arrays / nested lists / tensors).
    """

    def __init__(self, transform: Callable | None, image_column: str, label_column: str):
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column

    def __call__(self, batch: dict[str, list]) -> dict[str, torch.Tensor]:
        images = batch[self.image_column]
        if self.transform is None:
            pixels = [torch.as_tensor(np.asarray(image), dtype=torch.float32) for image in images]
        else:
            pixels = [_to_pixels(image, self.transform) for image in images]
        return {
            "pixel_values": torch.stack(pixels),
            "labels": torch.as_tensor(batch[self.label_column], dtype=torch.int64),
        }


def _to_pixels(image: Any, transform: Callable | None) -> torch.Tensor:
    """Apply ``transform`` to a PIL image (uint8 HWC arrays are made PIL first); pass tensors through as float."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3):
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        if transform is None:
            raise ValueError("Got PIL images but no transform: pass transform=build_transform(...).")
        return transform(image)
    if isinstance(image, torch.Tensor):
        return image.float()
    raise TypeError(f"Expected a PIL image or a tensor, got {type(image).__name__}.")


def check_labels(ds: datasets.Dataset, label_column: str, num_classes: int | None) -> None:
    """Raise ``ValueError`` naming the fix unless every label is an integer in ``[0, num_classes)``."""
    _check_label_range(_integer_labels(ds, label_column), num_classes)


def _check_label_range(labels: np.ndarray, num_classes: int | None) -> None:
    """Raise a ValueError naming the labels outside ``[0, num_classes)``."""
    if len(labels) == 0:
        raise ValueError("The data set is empty.")
    negative = np.unique(labels[labels < 0])
    if negative.size:
        raise ValueError(
            f"The data set has negative labels {negative[:10].tolist()} ({int((labels < 0).sum())} rows). -1 "
            "often marks an unlabelled split (e.g. a Hub test split): use a labelled split, or drop those rows."
        )
    if num_classes is not None and labels.max() >= num_classes:
        too_big = np.unique(labels[labels >= num_classes])
        raise ValueError(
            f"The model has {num_classes} classes but the data set has labels up to {int(labels.max())} "
            f"(out of range: {too_big[:10].tolist()}{' ...' if too_big.size > 10 else ''}): pass a model with "
            f"num_classes={int(labels.max()) + 1} or remap the labels to [0, {num_classes})."
        )


class TorchImageDataset(torch.utils.data.Dataset):
    """Adapt a torch data set of ``(image, label)`` tuples or dicts to ``{"pixel_values", "labels"}`` items.

    PIL images go through ``transform``; tensors are passed through (as float32). Dict items are read with
    ``image_key`` / ``label_key``, by default the first of ``pixel_values`` / ``image`` / ``img`` and of
    ``labels`` / ``label``.
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        transform: Callable | None,
        num_classes: int | None = None,
        *,
        image_key: str | None = None,
        label_key: str | None = None,
    ):
        self.dataset = dataset
        self.transform = transform
        self.num_classes = num_classes
        self.image_key = image_key
        self.label_key = label_key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, label = self._split_item(self.dataset[index])
        label = _label_value(label)
        _check_label_range(np.array([label]), self.num_classes)
        return {"pixel_values": _to_pixels(image, self.transform), "labels": torch.tensor(label, dtype=torch.int64)}

    def validate_labels(self) -> None:
        """Check all labels up front: from ``.targets`` when the data set has it (torchvision), else by reading
        the items when there are at most 50,000 of them; larger sets are checked item by item while training."""
        targets = _known_targets(self.dataset)
        if targets is None and len(self.dataset) <= MAX_TORCH_ITEMS_TO_SCAN:
            targets = [self._split_item(self.dataset[i])[1] for i in range(len(self.dataset))]
        if targets is not None:
            _check_label_range(np.array([_label_value(t) for t in targets], dtype=np.int64), self.num_classes)

    def _split_item(self, item: Any) -> tuple[Any, Any]:
        if isinstance(item, dict):
            image_key = self.image_key or next((k for k in ("pixel_values", "image", "img") if k in item), None)
            label_key = self.label_key or next((k for k in ("labels", "label") if k in item), None)
            if image_key not in item or label_key not in item:
                raise ValueError(
                    f"Dict items need an image and a label; got keys {sorted(item)}. Pass image_column=... and "
                    "label_column=... naming them."
                )
            return item[image_key], item[label_key]
        if isinstance(item, (tuple, list)) and len(item) >= 2:
            return item[0], item[1]
        raise ValueError(
            f"Items must be (image, label) tuples or dicts with a label, got {type(item).__name__}. MEDIC needs "
            "labelled data: wrap your data set so it returns (image, label)."
        )


def _known_targets(dataset: torch.utils.data.Dataset) -> Sequence | None:
    """Labels stored on the data set itself (torchvision's ``targets``, also through a ``Subset``)."""
    if hasattr(dataset, "targets"):
        return list(dataset.targets)
    if isinstance(dataset, torch.utils.data.Subset) and hasattr(dataset.dataset, "targets"):
        targets = dataset.dataset.targets
        return [targets[i] for i in dataset.indices]
    return None


def _label_value(label: Any) -> int:
    """An integer class id from an int, a numpy integer or a one-element integer tensor / array."""
    if isinstance(label, torch.Tensor):
        label = label.numpy(force=True)
    if isinstance(label, np.ndarray) and label.size == 1:
        label = label.reshape(()).item() if np.issubdtype(label.dtype, np.integer) else label
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        return int(label)
    raise ValueError(
        f"Labels must be integer class ids, got {label!r} ({type(label).__name__}). Map class names or one-hot "
        "vectors to ints in [0, num_classes) first."
    )


def collate_batch(rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items of :func:`prepare_dataset` into ``{"pixel_values": [B, C, H, W], "labels": [B]}``.

    ``transformers.default_data_collator`` gives the same result for these items, so a ``Trainer`` can use
    either; this one avoids the transformers dependency for a plain ``DataLoader``.
    """
    return {
        "pixel_values": torch.stack([row["pixel_values"] for row in rows]),
        "labels": torch.stack([torch.as_tensor(row["labels"], dtype=torch.int64) for row in rows]),
    }


def subset_from_args(
    dataset_dict: datasets.DatasetDict | datasets.Dataset,
    *,
    split: str = "train",
    fraction: float | None = 0.05,
    num_samples: int | None = None,
    seed: int = 0,
    label_column: str | None = None,
) -> datasets.Dataset:
    """The recipe's clean set: a class-balanced subset of ``dataset_dict[split]``.

    ``num_samples``, when given, wins over ``fraction`` (so command-line defaults need no juggling).
    """
    if isinstance(dataset_dict, datasets.DatasetDict):
        if split not in dataset_dict:
            raise ValueError(f"Split '{split}' not found; the data set has splits {list(dataset_dict)}.")
        ds = dataset_dict[split]
    else:
        ds = dataset_dict
    if num_samples is not None:
        fraction = None
    try:
        return class_balanced_subset(
            ds, fraction=fraction, num_samples=num_samples, seed=seed, label_column=label_column
        )
    except ValueError as error:
        # The recipe's users set these as flags, not as Python arguments.
        message = re.sub(r"(?<![-\w])fraction\b", "--clean_fraction", str(error))
        message = re.sub(r"(?<![-\w])num_samples\b", "--clean_samples", message)
        raise ValueError(message) from None
