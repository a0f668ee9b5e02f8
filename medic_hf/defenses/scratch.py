"""Training from scratch on the clean set: MEDIC's ablation without any teacher.

A freshly initialised model of the same architecture (:func:`medic_hf.modeling.make_student`) is trained with
cross-entropy on the clean set alone. It cannot carry the backdoor, and shows what the clean set teaches by itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from ..modeling import make_student
from ._training import TrainingConfig, finish, fit_cross_entropy, seed_everything

logger = logging.getLogger(__name__)


@dataclass
class ScratchConfig(TrainingConfig):
    """Training from scratch. Defaults are MEDIC's optimisation (paper Appendix D, :class:`medic_hf.MedicConfig`), so
    that the ablation differs from MEDIC only in its loss: Adam lr 1e-2 with coupled L2 1e-4, cosine, 30 epochs
    (MEDIC's default, not the paper's 60), batch 64."""

    epochs: int = field(default=30, metadata={"help": "Epochs over the clean set (MEDIC's default: 30)."})
    batch_size: int = field(default=64, metadata={"help": "Clean images per step (MEDIC: 64)."})
    lr: float = field(default=1e-2, metadata={"help": "Learning rate (MEDIC: 1e-2)."})
    optimizer: str = field(default="adam", metadata={"help": "'adam' (MEDIC) or 'sgd'."})
    weight_decay: float = field(default=1e-4, metadata={"help": "Coupled L2 weight decay (MEDIC: 1e-4)."})


def train_from_scratch(model: nn.Module, clean_data, config: ScratchConfig | None = None) -> nn.Module:
    """Train a fresh model of ``model``'s class on ``clean_data`` with cross-entropy; ``model``'s weights are unused.

    ``defense_report``: ``{"defense": "scratch", "losses": [mean loss per epoch]}``.
    """
    config = ScratchConfig() if config is None else config
    seed_everything(config.seed)
    student = make_student(model, seed=config.seed)
    losses = fit_cross_entropy(student, clean_data, config, desc="training from scratch")
    logger.info("Trained a fresh %s from scratch for %d epochs.", type(student).__name__, config.epochs)
    return finish(student, model, {"defense": "scratch", "losses": losses})
