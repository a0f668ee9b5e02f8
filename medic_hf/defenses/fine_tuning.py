"""Fine-tuning (FT): train a copy of the trojaned model with cross-entropy on the clean set."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from ._training import TrainingConfig, copy_model, finish, fit_cross_entropy, seed_everything

logger = logging.getLogger(__name__)


@dataclass
class FineTuningConfig(TrainingConfig):
    """Fine-tuning on the clean set.

    Defaults are BackdoorBench's (SCLBD/BackdoorBench, config/defense/ft/config.yaml): 100 epochs, batch 256, SGD
    lr 0.01, momentum 0.9, weight decay 5e-4, CosineAnnealingLR — the :class:`TrainingConfig` defaults.
    """


def fine_tune(model: nn.Module, clean_data, config: FineTuningConfig | None = None) -> nn.Module:
    """Return a copy of ``model`` fine-tuned on ``clean_data`` (cross-entropy), in eval mode.

    ``defense_report``: ``{"defense": "ft", "losses": [mean loss per epoch]}``.
    """
    config = FineTuningConfig() if config is None else config
    seed_everything(config.seed)
    repaired = copy_model(model)
    losses = fit_cross_entropy(repaired, clean_data, config, desc="fine-tuning")
    logger.info("Fine-tuned for %d epochs (final loss %s).", config.epochs, losses[-1] if losses else None)
    return finish(repaired, model, {"defense": "ft", "losses": losses})
