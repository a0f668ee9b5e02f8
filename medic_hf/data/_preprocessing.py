"""The model's preprocessing (input size, mean, std, interpolation, crop) and the PIL -> tensor transform."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T

from ._constants import IMAGENET_MEAN, IMAGENET_STD, VIT_MEAN, VIT_STD

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
