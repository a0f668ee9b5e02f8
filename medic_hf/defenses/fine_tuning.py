"""Fine-tuning (FT): train a copy of the trojaned model with cross-entropy on the clean set."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from ._training import DefenseConfig, copy_model, finish, seed_everything, train_classifier

logger = logging.getLogger(__name__)


@dataclass
class FineTuningConfig(DefenseConfig):
    """Fine-tuning on the clean set.

    Defaults are BackdoorBench's (SCLBD/BackdoorBench, config/defense/ft/config.yaml): 100 epochs, batch 256, SGD
    lr 0.01, momentum 0.9, weight decay 5e-4, cosine — the :class:`DefenseConfig` defaults.
    """


def fine_tune(model: nn.Module, clean_data, config: FineTuningConfig | None = None) -> nn.Module:
    """Return a copy of ``model`` fine-tuned on ``clean_data`` (cross-entropy), in eval mode.

    ``defense_report``: ``{"defense": "ft", "losses": [the logged training losses]}``.
    """
    config = FineTuningConfig() if config is None else config
    seed_everything(config.seed)
    repaired = copy_model(model)
    losses = train_classifier(repaired, clean_data, config)
    logger.info("Fine-tuned for %s epochs (final loss %s).", config.num_train_epochs, losses[-1] if losses else None)
    return finish(repaired, model, {"defense": "ft", "losses": losses})
