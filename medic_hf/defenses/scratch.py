"""Training from scratch on the clean set: MEDIC's ablation without any teacher.

A freshly initialised model of the same architecture (:func:`medic_hf.modeling.make_student`) is trained with
cross-entropy on the clean set alone, on MEDIC's base trainer (:class:`medic_hf.training.ClassifierTrainer`). It
cannot carry the backdoor, and shows what the clean set teaches by itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from ..modeling import make_student
from ._training import DefenseConfig, finish, seed_everything, train_classifier

logger = logging.getLogger(__name__)


@dataclass
class ScratchConfig(DefenseConfig):
    """Training from scratch. Defaults are MEDIC's optimisation (paper Appendix D, :class:`medic_hf.MedicConfig`), so
    that the ablation differs from MEDIC only in its loss: Adam lr 1e-2 with coupled L2 1e-4, cosine, 30 epochs
    (MEDIC's default, not the paper's 60), batch 64, gradients clipped at norm 1.0."""

    num_train_epochs: float = field(
        default=30.0, metadata={"help": "Epochs over the clean set (MEDIC's default: 30)."}
    )
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Clean images per step (MEDIC: 64)."})
    learning_rate: float = field(default=1e-2, metadata={"help": "Learning rate (MEDIC: 1e-2)."})
    optim: str = field(
        default="adamw_torch",
        metadata={"help": "With coupled_weight_decay: 'sgd' gives SGD, any other value Adam with coupled L2 (MEDIC)."},
    )
    weight_decay: float = field(default=1e-4, metadata={"help": "Coupled L2 weight decay (MEDIC: 1e-4)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (MEDIC: the Trainer's 1.0)."})


def train_from_scratch(model: nn.Module, clean_data, config: ScratchConfig | None = None) -> nn.Module:
    """Train a fresh model of ``model``'s class on ``clean_data`` with cross-entropy; ``model``'s weights are unused.

    ``defense_report``: ``{"defense": "scratch", "losses": [the logged training losses]}``.
    """
    config = ScratchConfig() if config is None else config
    seed_everything(config.seed)
    student = make_student(model, seed=config.seed)
    losses = train_classifier(student, clean_data, config, preprocessing_model=model)
    logger.info("Trained a fresh %s from scratch for %s epochs.", type(student).__name__, config.num_train_epochs)
    return finish(student, model, {"defense": "scratch", "losses": losses})
