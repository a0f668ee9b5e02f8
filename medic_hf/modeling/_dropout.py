"""Dropout control: every dropout / drop-path rate of a model set to 0, and restored."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


# --------------------------------------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------------------------------------


def _dropout_settings(model: nn.Module) -> list[tuple[Any, str]]:
    """List ``(object, attribute)`` pairs that hold a dropout-like probability used by ``model``.

    Covers ``nn.Dropout*.p``, timm ``DropPath.drop_prob``, and float module attributes whose name contains "drop",
    which models read functionally at forward time (timm ResNet's ``drop_rate``, transformers ViT's
    ``attention_dropout``, ``nn.MultiheadAttention.dropout``).

    A transformers ``config`` is deliberately left alone: image models copy its rates into modules at construction,
    and changing it would leak zero dropout into any ``config.json`` saved while dropout is disabled.
    """
    settings = []
    seen = set()

    def add(owner: Any, attr: str) -> None:
        if (id(owner), attr) not in seen:
            seen.add((id(owner), attr))
            settings.append((owner, attr))

    for module in model.modules():
        if isinstance(module, _DROPOUT_MODULES):
            add(module, "p")
        for attr, value in vars(module).items():
            if "drop" in attr.lower() and isinstance(value, float):
                add(module, attr)
    return settings


def disable_dropout(model: nn.Module) -> Callable[[], None]:
    """Set every dropout / drop-path rate in ``model`` to 0 and return a function that restores the old values.

    Use this across a long training run; prefer :func:`dropout_disabled` for a block of code. Only modules are
    changed (never a transformers config or timm's recorded creation kwargs), so saving the model while dropout is
    disabled still writes the original rates.
    """
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr in _dropout_settings(model)]
    for owner, attr, _ in saved:
        setattr(owner, attr, 0.0)

    def restore() -> None:
        # Reverse order so an attribute listed twice ends with its original value.
        for owner, attr, value in reversed(saved):
            setattr(owner, attr, value)

    return restore


@contextlib.contextmanager
def dropout_disabled(*models: nn.Module) -> Iterator[None]:
    """Context manager: dropout and stochastic depth off in all ``models`` inside the block, restored afterwards."""
    restores = []
    try:
        for model in models:
            restores.append(disable_dropout(model))
        yield
    finally:
        for restore in reversed(restores):
            restore()
