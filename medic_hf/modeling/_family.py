"""Which library a model comes from (timm, transformers, plain torch), its logits and its number of classes."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

# --------------------------------------------------------------------------------------------------------------------
# Families and forward passes
# --------------------------------------------------------------------------------------------------------------------


def model_family(model: nn.Module) -> str:
    """Return ``"transformers"``, ``"timm"`` or ``"torch"`` for ``model``.

    transformers is checked first because some transformers models wrap timm ones (``TimmWrapper``).
    """
    # A model can only be a PreTrainedModel if transformers is already imported; checking sys.modules avoids
    # importing the (slow) modeling stack just to answer "no".
    transformers = sys.modules.get("transformers")
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        return "transformers"
    if getattr(model, "pretrained_cfg", None) is not None or type(model).__module__.startswith("timm."):
        return "timm"
    return "torch"


def _select_logits(output: Any) -> torch.Tensor:
    """Pick the logits out of a model's forward output (tensor, ModelOutput, dict or tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping):
        if "logits" in output:
            return output["logits"]
        output = tuple(output.values())
    if isinstance(output, (tuple, list)) and output:
        # By convention the classification logits come first (e.g. timm distilled heads in training mode).
        return _select_logits(output[0])
    raise TypeError(f"Cannot find logits in a model output of type {type(output).__name__}.")


def forward_logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Run ``model`` on a batch of images and return the class logits, shape ``(batch, num_classes)``."""
    if model_family(model) == "transformers":
        return _select_logits(model(pixel_values=pixel_values))
    return _select_logits(model(pixel_values))


def num_classes(model: nn.Module) -> int | None:
    """Number of output classes: timm's ``num_classes``, transformers' ``config.num_labels``, or the last Linear."""
    if model_family(model) == "transformers":
        return int(model.config.num_labels)
    value = getattr(model, "num_classes", None)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    last_linear = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last_linear = module
    return last_linear.out_features if last_linear is not None else None
