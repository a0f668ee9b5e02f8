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
7. :func:`collate_batch` stacks items into a batch (``transformers.default_data_collator`` works as well).

Items produced by :func:`prepare_dataset` are dicts ``{"pixel_values": float32 [C, H, W], "labels": int64 []}``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Google's ViT checkpoints (model_type "vit") were trained on inputs scaled to [-1, 1].
VIT_MEAN = (0.5, 0.5, 0.5)
VIT_STD = (0.5, 0.5, 0.5)

SPLIT_NAMES = ("train", "test", "validation")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IMAGE_COLUMN_NAMES = ("img", "image")
LABEL_COLUMN_NAMES = ("label", "labels")
# Up to this many items, a torch data set's labels are all checked up front (one __getitem__ per item).
MAX_TORCH_ITEMS_TO_SCAN = 50_000

# A Hub id is "name" or "owner/name"; anything else that does not exist locally is a mistyped path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


def load_image_dataset(name_or_path: str, *, cache_dir: str | None = None) -> datasets.DatasetDict:
    """Load an image classification data set as a ``DatasetDict``.

    ``name_or_path`` may be:

    * a folder of parquet files: splits come from the file-name prefix (``train*.parquet``, ``test*.parquet``,
      ``validation*.parquet``), searched recursively so the Hub layout ``data/train-00000-of-00001.parquet``
      works; files named otherwise inside a ``train/``, ``test/`` or ``validation/`` folder (the Hub's
      parquet-conversion layout ``default/train/0000.parquet``) take the folder's name;
    * a folder of images, either one sub-folder per class or ``train/`` / ``test/`` sub-folders holding class
      sub-folders (``datasets``' "imagefolder" builder; labels come from the class folder names);
    * a single ``.parquet`` file, loaded as split ``"train"``;
    * otherwise a Hugging Face Hub id such as ``"uoft-cs/cifar10"``.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return _load_parquet_file(path, cache_dir)
    if path.is_dir():
        return _load_local_folder(path, cache_dir)
    if not _HUB_ID.match(name_or_path) or name_or_path.endswith(".parquet"):
        raise FileNotFoundError(
            f"'{name_or_path}' does not exist. Pass an existing parquet file, a folder of parquet files or images, "
            "or a Hugging Face Hub data set id such as 'uoft-cs/cifar10'."
        )
    return _load_hub_dataset(name_or_path, cache_dir)


def _load_parquet_file(path: Path, cache_dir: str | None) -> datasets.DatasetDict:
    """Load one parquet file as the "train" split."""
    if path.suffix != ".parquet":
        raise ValueError(
            f"'{path}' is a file but not a .parquet file. Pass a .parquet file, a folder of parquet files or of "
            "images (one sub-folder per class), or a Hub data set id."
        )
    return _load_files(path, "parquet", data_files={"train": str(path)}, cache_dir=cache_dir)


def _load_local_folder(folder: Path, cache_dir: str | None) -> datasets.DatasetDict:
    """Load a folder of parquet files, or failing that a folder of images."""
    parquet_files = sorted(folder.rglob("*.parquet"))
    if parquet_files:
        data_files = _parquet_files_by_split(parquet_files)
        if not data_files:
            names = ", ".join(str(p.relative_to(folder)) for p in parquet_files[:5])
            raise ValueError(
                f"'{folder}' holds parquet files ({names}) but none is named after a split. Name them "
                "train*.parquet / test*.parquet / validation*.parquet, or pass a single parquet file."
            )
        return _load_files(folder, "parquet", data_files=data_files, cache_dir=cache_dir)
    if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*")):
        return _load_files(folder, "imagefolder", data_dir=str(folder), cache_dir=cache_dir)
    raise ValueError(
        f"'{folder}' holds neither parquet files nor images. Expected train*.parquet / test*.parquet files, "
        "or images in one sub-folder per class (optionally under train/ and test/)."
    )


def _load_files(path: Path, builder: str, **kwargs) -> datasets.DatasetDict:
    try:
        return datasets.load_dataset(builder, **kwargs)
    except ValueError as error:
        if "corresponds to no data" not in str(error):
            raise
        # datasets says 'Instruction "train" corresponds to no data!' for a split file without rows.
        raise ValueError(
            f"'{path}' holds an empty split ({error}): the data set has no rows. Check its files."
        ) from None


def _parquet_files_by_split(files: Sequence[Path]) -> dict[str, list[str]]:
    """Group parquet files by split: file-name prefix first, else the name of the folder holding them."""
    by_split: dict[str, list[str]] = {}
    for file in files:
        split = next((s for s in SPLIT_NAMES if file.name.startswith(s)), None)
        if split is None and file.parent.name in SPLIT_NAMES:
            split = file.parent.name
        if split is not None:
            by_split.setdefault(split, []).append(str(file))
    # Keep the usual split order (train, test, validation), whatever order the files were found in.
    return {split: by_split[split] for split in SPLIT_NAMES if split in by_split}


def _load_hub_dataset(name: str, cache_dir: str | None) -> datasets.DatasetDict:
    """Load a Hub data set, turning the many possible failures into one message that names the fixes."""
    try:
        loaded = datasets.load_dataset(name, cache_dir=cache_dir)
    except Exception as err:  # datasets raises many types here: not found, offline, gated, ...
        raise ValueError(
            f"'{name}' is not a local file or folder, and loading it from the Hugging Face Hub failed "
            f"({type(err).__name__}: {err}). Check the path or the Hub id, your network and HF_HUB_OFFLINE, "
            "and run `huggingface-cli login` for gated data sets."
        ) from err
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


# --------------------------------------------------------------------------------------------------------------------
# Columns
# --------------------------------------------------------------------------------------------------------------------


def find_columns(ds: datasets.Dataset | datasets.DatasetDict) -> tuple[str, str]:
    """Return ``(image_column, label_column)`` of a data set.

    Rows already holding ``pixel_values`` give ``("pixel_values", <label column>)``. Otherwise the image
    column is ``img`` or ``image`` or else the first ``datasets.Image`` column, and the label column is ``label``
    or ``labels`` or else the first ``ClassLabel`` column (e.g. ``fine_label`` of CIFAR-100). For a
    ``DatasetDict`` the "train" split (or the first one) is inspected.
    """
    ds = _one_split(ds)
    if "pixel_values" in ds.column_names:
        return "pixel_values", _find_label_column(ds)
    return _find_image_column(ds), _find_label_column(ds)


def _one_split(ds: datasets.Dataset | datasets.DatasetDict) -> datasets.Dataset:
    """A DatasetDict's "train" split (or its first split); a Dataset as it is."""
    if isinstance(ds, datasets.DatasetDict):
        return ds["train"] if "train" in ds else next(iter(ds.values()))
    return ds


def _find_image_column(ds: datasets.Dataset) -> str:
    features = ds.features or {}
    for name in IMAGE_COLUMN_NAMES:
        if name in ds.column_names:
            return name
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise ValueError(
        f"No image column found; the data set has columns {ds.column_names}. Expected 'img' or 'image' (or a "
        "datasets.Image column): rename yours with ds = ds.rename_column('<your column>', 'image'), or pass "
        "image_column=..."
    )


def _find_label_column(ds: datasets.Dataset) -> str:
    features = ds.features or {}
    for name in LABEL_COLUMN_NAMES:
        if name in ds.column_names:
            return name
    for name, feature in features.items():
        if isinstance(feature, datasets.ClassLabel):
            return name
    raise ValueError(
        f"No label column found; the data set has columns {ds.column_names}. MEDIC needs class labels: rename "
        "your label column with ds = ds.rename_column('<your column>', 'label'), or pass label_column=... "
        "(an unlabelled split, e.g. a Kaggle-style test split, cannot be used)."
    )


def _label_array(ds: datasets.Dataset, label_column: str) -> pa.ChunkedArray:
    """The label column as one arrow array, read without decoding images.

    ``Dataset.unique`` would flatten an index mapping (as left by ``select``) by rewriting every column,
    images included, to the cache; the arrow format takes only the wanted rows of the one column.
    """
    if label_column not in ds.column_names:
        raise ValueError(f"Label column '{label_column}' not found; the data set has columns {ds.column_names}.")
    return ds.with_format("arrow", columns=[label_column])[label_column]


# --------------------------------------------------------------------------------------------------------------------
# Class-balanced subset
# --------------------------------------------------------------------------------------------------------------------


def class_balanced_subset(
    ds: datasets.Dataset,
    *,
    fraction: float | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    label_column: str | None = None,
) -> datasets.Dataset:
    """Draw a seeded subset with the same number of rows for every class, in shuffled order.

    Asking for every row (``fraction=1.0`` or ``num_samples=len(ds)``) returns all of them, shuffled, whatever the
    class balance: a curated clean set is used as it is.

    Give either ``fraction`` (of ``len(ds)``, rounded) or ``num_samples``. Every class present in ``ds`` gets
    ``total // num_classes`` rows; the remaining ``total % num_classes`` rows go one each to the classes with
    the smallest label ids that still have rows to spare. Example: ``fraction=0.05`` of CIFAR-10 train gives
    2,500 rows, 250 per class. The draw depends only on ``seed`` and the labels, and the result is an index
    mapping over ``ds`` (``Dataset.select``), so no image is re-encoded.
    """
    if len(ds) == 0:
        raise ValueError("The data set is empty: there is nothing to draw a clean subset from. Check the split.")
    label_column = label_column or _find_label_column(ds)
    labels = _integer_labels(ds, label_column)
    total = _requested_size(len(labels), fraction, num_samples)
    rng = np.random.default_rng(seed)
    if total == len(labels):
        # Every row: a curated clean set is used as it is, balanced or not (balancing is for draws).
        return ds.select(rng.permutation(len(labels)).tolist())
    classes, counts = np.unique(labels, return_counts=True)
    per_class = _rows_per_class(total, classes, counts)

    picked = [rng.choice(np.flatnonzero(labels == c), size=n, replace=False) for c, n in zip(classes, per_class)]
    order = rng.permutation(np.concatenate(picked))
    return ds.select(order.tolist())


def _requested_size(num_rows: int, fraction: float | None, num_samples: int | None) -> int:
    """The number of rows asked for by exactly one of ``fraction`` / ``num_samples``."""
    if (fraction is None) == (num_samples is None):
        raise ValueError("Pass exactly one of fraction=... (e.g. 0.05) or num_samples=... (e.g. 2500).")
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}; e.g. fraction=0.05 keeps 5% of the rows.")
        return max(1, round(fraction * num_rows))
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples <= 0:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
    if num_samples > num_rows:
        raise ValueError(f"num_samples={num_samples} is more than the {num_rows} rows of the data set.")
    return int(num_samples)


def _rows_per_class(total: int, classes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Split ``total`` rows as evenly as possible over the classes, never above a class's row count."""
    num_classes = len(classes)
    if total < num_classes:
        raise ValueError(
            f"Asked for {total} rows but the data set has {num_classes} classes; a class-balanced subset needs at "
            "least one row per class. Raise fraction / num_samples."
        )
    per_class = np.full(num_classes, total // num_classes)
    short = per_class > counts
    if short.any():
        worst = int(np.argmin(counts))
        raise ValueError(
            f"Asked for {per_class[0]} rows per class but class {classes[worst]} has only {counts[worst]} rows "
            f"(classes short of rows: {classes[short].tolist()}). Lower fraction / num_samples to at most "
            f"{counts.min() * num_classes} rows."
        )
    remainder = total - per_class.sum()
    for i in np.flatnonzero(counts > per_class)[:remainder]:
        per_class[i] += 1
    if per_class.sum() < total:
        raise ValueError(
            f"Cannot split {total} rows evenly over {num_classes} classes with {counts.tolist()} rows: the smallest "
            f"classes run out. Lower fraction / num_samples to at most {per_class.sum()} rows."
        )
    return per_class


# --------------------------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------------------------


def resolve_preprocessing(
    model: Any = None,
    image_processor: Any = None,
    *,
    input_size: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict:
    """Work out how images must be preprocessed for ``model``.

    Returns ``{"input_size": (C, H, W), "mean": tuple, "std": tuple, "interpolation": str, "crop_pct": float}``.
    Sources, first match wins:

    * ``image_processor`` (a transformers image processor): ``size`` / ``crop_size``, ``image_mean``,
      ``image_std``, ``resample`` and ``crop_pct`` when it has one;
    * a timm model (it carries ``pretrained_cfg``): ``timm.data.resolve_data_config(model=model)``;
    * a transformers model: ``config.pretrained_cfg`` for timm-wrapped models, else ``config.image_size`` and
      ``config.num_channels``, with mean/std 0.5 when ``config.model_type == "vit"`` (Google's ViT checkpoints)
      and ImageNet mean/std otherwise. Pass the checkpoint's image processor when it is known: it is exact.

    ``input_size`` (an int, ``(H, W)`` or ``(C, H, W)``), ``mean`` and ``std`` override whatever was found and
    are required for plain PyTorch models.
    """
    if image_processor is not None:
        config = _from_image_processor(image_processor)
    elif hasattr(model, "pretrained_cfg"):
        config = _from_timm(model=model)
    elif getattr(getattr(model, "config", None), "pretrained_cfg", None):
        config = _from_timm(pretrained_cfg=model.config.pretrained_cfg)
    elif hasattr(model, "config"):
        config = _from_transformers_config(model.config)
    else:
        config = {}

    if input_size is not None:
        channels = len(mean) if mean is not None else config.get("input_size", (3,))[0]
        config["input_size"] = _as_chw(input_size, channels=channels)
    if mean is not None:
        config["mean"] = tuple(float(m) for m in mean)
        if config.get("input_size") and len(mean) != config["input_size"][0]:
            config["input_size"] = (len(mean), *config["input_size"][1:])  # one mean per channel sets the channels
    if std is not None:
        config["std"] = tuple(float(s) for s in std)
    model_channels = _input_channels(model)
    if model_channels is not None and config.get("input_size") and config["input_size"][0] != model_channels:
        raise ValueError(
            f"The model takes {model_channels}-channel images but its preprocessing says {config['input_size'][0]} "
            f"channels (mean {config.get('mean')}): set image_mean and image_std with one value per channel, e.g. "
            f"MedicConfig(image_mean=[0.5] * {model_channels}, image_std=[0.5] * {model_channels}) or "
            f"--image_mean {' '.join(['0.5'] * model_channels)} --image_std {' '.join(['0.5'] * model_channels)}."
        )
    missing = [key for key in ("input_size", "mean", "std") if config.get(key) is None]
    if missing:
        what = f"a {type(model).__name__} model" if model is not None else "no model"
        raise ValueError(
            f"Cannot tell the preprocessing ({', '.join(missing)}) for {what}. Pass "
            "image_processor=AutoImageProcessor.from_pretrained(...), or set the input size, mean and std: "
            "MedicConfig(image_size=[32], image_mean=[0.4914, 0.4822, 0.4465], image_std=[0.247, 0.243, 0.261]) "
            "(command line: --image_size 32 --image_mean 0.4914 0.4822 0.4465 --image_std 0.247 0.243 0.261)."
        )
    config.setdefault("interpolation", "bilinear")
    config.setdefault("crop_pct", 1.0)
    channels = config["input_size"][0]
    if len(config["mean"]) != channels or len(config["std"]) != channels:
        raise ValueError(
            f"mean {config['mean']} and std {config['std']} must have one value per channel ({channels} channels)."
        )
    return config


def _input_channels(model: Any) -> int | None:
    """The channels the model's first convolution takes, or None (no convolution, or not a module)."""
    if not isinstance(model, torch.nn.Module):
        return None
    first = next((m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
    return first.in_channels if first is not None else None


def _from_timm(model: Any = None, pretrained_cfg: dict | None = None) -> dict:
    from timm.data import resolve_data_config

    cfg = resolve_data_config(model=model, pretrained_cfg=pretrained_cfg)
    return {
        "input_size": tuple(int(v) for v in cfg["input_size"]),
        "mean": tuple(float(m) for m in cfg["mean"]),
        "std": tuple(float(s) for s in cfg["std"]),
        "interpolation": cfg.get("interpolation", "bilinear"),
        "crop_pct": float(cfg.get("crop_pct") or 1.0),
    }


def _from_image_processor(processor: Any) -> dict:
    """Read a transformers image processor (slow or fast; ``size`` may be a dict or a ``SizeDict``)."""
    size = _size_fields(getattr(processor, "size", None))
    crop = _size_fields(getattr(processor, "crop_size", None)) if getattr(processor, "do_center_crop", False) else {}
    mean = processor.image_mean if getattr(processor, "do_normalize", True) else 0.0
    std = processor.image_std if getattr(processor, "do_normalize", True) else 1.0
    channels = max(len(_per_channel(mean)), len(_per_channel(std)))
    channels = 3 if channels == 1 else channels  # a scalar mean / std applies to every RGB channel
    mean, std = _per_channel(mean, channels), _per_channel(std, channels)

    crop_pct = float(getattr(processor, "crop_pct", None) or 1.0)
    if crop.get("height"):
        # Resize the shorter side to `size`, then center-crop `crop_size` (CLIP-style processors).
        height, width = crop["height"], crop["width"]
        resize_to = size.get("shortest_edge") or size.get("height") or height
        crop_pct = min(height, width) / resize_to
    elif size.get("height"):
        height, width = size["height"], size["width"]
    elif size.get("shortest_edge"):
        height = width = size["shortest_edge"]
    else:
        raise ValueError(f"Cannot read an input size from the image processor's size {size}; pass input_size=...")
    return {
        "input_size": (channels, int(height), int(width)),
        "mean": mean,
        "std": std,
        "interpolation": _resample_name(getattr(processor, "resample", None)),
        "crop_pct": crop_pct,
    }


def _from_transformers_config(config: Any) -> dict:
    """Input size from ``config.image_size``; mean/std by model type (see :func:`resolve_preprocessing`)."""
    vit = getattr(config, "model_type", None) == "vit"
    result = {"mean": VIT_MEAN if vit else IMAGENET_MEAN, "std": VIT_STD if vit else IMAGENET_STD}
    image_size = getattr(config, "image_size", None)
    if image_size is not None:
        result["input_size"] = _as_chw(image_size, channels=getattr(config, "num_channels", 3))
    return result


def _size_fields(size: Any) -> dict:
    """``height``, ``width`` and ``shortest_edge`` of a processor size (int, dict or SizeDict)."""
    if size is None:
        return {}
    if isinstance(size, int):
        return {"height": size, "width": size}
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    return {key: get(key) for key in ("height", "width", "shortest_edge") if get(key)}


def _per_channel(values: float | Sequence[float], channels: int | None = None) -> tuple[float, ...]:
    values = [float(values)] if isinstance(values, (int, float)) else [float(v) for v in values]
    if channels is not None and len(values) == 1:
        values = values * channels
    return tuple(values)


def _resample_name(resample: Any) -> str:
    """PIL resample code / enum or torchvision InterpolationMode -> a name such as "bicubic"."""
    if resample is None:
        return "bilinear"
    if isinstance(resample, T.InterpolationMode):
        return resample.value
    try:
        return Image.Resampling(int(resample)).name.lower()
    except (TypeError, ValueError):
        return "bilinear"


def _as_chw(size: int | Sequence[int], channels: int = 3) -> tuple[int, int, int]:
    """An int, (H, W) or (C, H, W) as a (C, H, W) tuple."""
    if isinstance(size, int):
        return (channels, size, size)
    size = tuple(int(s) for s in size)
    if len(size) == 2:
        return (channels, *size)
    if len(size) == 3:
        return size
    raise ValueError(f"input_size must be an int, (H, W) or (C, H, W); got {size}.")


def build_transform(preprocessing: dict, *, train: bool) -> Callable[[Image.Image], torch.Tensor]:
    """A PIL image -> normalised float tensor ``[C, H, W]`` transform for ``preprocessing`` (see above).

    Eval: convert to RGB (or L for one channel), resize the shorter side to ``H / crop_pct`` and center-crop
    ``H x W`` (images already ``H x W`` pass unchanged, so 32x32 CIFAR is not cropped by a 0.9 crop_pct), to
    tensor, normalise. Train: the same resize, then ``RandomCrop(H, padding=H // 8)`` and
    ``RandomHorizontalFlip()`` — the light augmentation MEDIC's cloning uses — then to tensor and normalise.
    """
    channels, height, width = preprocessing["input_size"]
    steps: list[Callable] = [
        ConvertMode("L" if channels == 1 else "RGB"),
        ResizeCenterCrop((height, width), preprocessing.get("crop_pct", 1.0), preprocessing.get("interpolation")),
    ]
    if train:
        steps += [T.RandomCrop((height, width), padding=min(height, width) // 8), T.RandomHorizontalFlip()]
    steps += [T.ToTensor(), T.Normalize(preprocessing["mean"], preprocessing["std"])]
    return T.Compose(steps)


class ConvertMode:
    """Convert a PIL image to a colour mode (a class, not a lambda, so DataLoader workers can pickle it)."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == self.mode else image.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"


class ResizeCenterCrop:
    """timm-style eval resize: shorter side to ``H / crop_pct``, then center crop; ``H x W`` images pass through."""

    def __init__(self, size: tuple[int, int], crop_pct: float = 1.0, interpolation: str | None = "bilinear"):
        self.size = tuple(size)
        height, width = self.size
        scaled = (int(height / crop_pct), int(width / crop_pct))
        # Square targets resize the shorter side (keeps the aspect ratio); others resize to the exact scaled size.
        self.resize = T.Resize(scaled[0] if height == width else scaled, interpolation=_interpolation(interpolation))
        self.crop = T.CenterCrop(self.size)

    def __call__(self, image: Image.Image) -> Image.Image:
        if (image.height, image.width) == self.size:
            return image
        return self.crop(self.resize(image))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, resize={self.resize})"


def _interpolation(name: str | None) -> T.InterpolationMode:
    try:
        return T.InterpolationMode(name or "bilinear")
    except ValueError:  # timm's "random" and other names torchvision does not know
        return T.InterpolationMode.BILINEAR


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


def _integer_labels(ds: datasets.Dataset, label_column: str) -> np.ndarray:
    """The label column as an int64 numpy array, or a ValueError saying why it cannot be one."""
    column = _label_array(ds, label_column)
    if column.null_count:
        raise ValueError(
            f"{column.null_count} of {len(column)} rows have no '{label_column}' value. Drop them with "
            f"ds = ds.filter(lambda label: label is not None, input_columns='{label_column}')."
        )
    if not pa.types.is_integer(column.type):
        examples = pc.unique(column).to_pylist()[:5]
        raise ValueError(
            f"Labels in column '{label_column}' must be integer class ids, but they are {column.type} "
            f"(e.g. {examples}). For class names use ds = ds.class_encode_column('{label_column}'); for integral "
            f"floats use ds = ds.cast_column('{label_column}', datasets.Value('int64'))."
        )
    return column.to_numpy().astype(np.int64, copy=False)


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
