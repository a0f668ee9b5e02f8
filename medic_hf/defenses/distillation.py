"""Logit distillation (Hinton et al., 2015) into a fresh model: MEDIC's ablation that copies only the outputs.

A freshly initialised model of the same architecture learns from the frozen trojaned model's temperature-softened
logits on the clean set, ``ce_weight * CE(s, y) + kd_weight * T^2 * KL(softmax(t / T) || softmax(s / T))``. The
teacher is in eval mode, never trained, and runs without gradients.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling import forward_logits, make_student
from ._training import copy_model, finish, make_loader, prepare_clean_data, resolve_device, seed_everything, train_loop
from .scratch import ScratchConfig

logger = logging.getLogger(__name__)


@dataclass
class DistillationConfig(ScratchConfig):
    """Logit distillation. Optimisation defaults: MEDIC's (as :class:`ScratchConfig`). Loss defaults: Hinton KD as
    run by RepDistiller (Tian et al., ICLR 2020; train_student.py ``--kd_T 4``, README KD command
    ``-r 0.1 -a 0.9``)."""

    temperature: float = field(default=4.0, metadata={"help": "Softmax temperature T (RepDistiller kd_T 4)."})
    kd_weight: float = field(default=0.9, metadata={"help": "Weight of the T^2-scaled KL term (RepDistiller -a 0.9)."})
    ce_weight: float = field(default=0.1, metadata={"help": "Weight of the cross-entropy (RepDistiller -r 0.1)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0 or self.kd_weight < 0 or self.ce_weight < 0:
            raise ValueError("temperature must be > 0 and the loss weights >= 0.")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature**2


def distill_logits(model: nn.Module, clean_data, config: DistillationConfig | None = None) -> nn.Module:
    """Distil ``model``'s logits into a fresh model of its class on ``clean_data``.

    ``defense_report``: ``{"defense": "kd", "losses": [mean loss per epoch]}``.
    """
    config = DistillationConfig() if config is None else config
    seed_everything(config.seed)
    device = resolve_device(config)
    teacher = copy_model(model).to(device).eval().requires_grad_(False)
    student = make_student(model, seed=config.seed).to(device)
    loader = make_loader(prepare_clean_data(student, clean_data, config, train=True), config, shuffle=True)

    def loss_fn(pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = forward_logits(teacher, pixel_values)
        logits = forward_logits(student, pixel_values)
        kd = kd_loss(logits, teacher_logits, config.temperature)
        return config.ce_weight * F.cross_entropy(logits.float(), labels) + config.kd_weight * kd

    losses = train_loop(student, loader, loss_fn, config, desc="logit distillation")
    logger.info("Distilled the logits into a fresh %s for %d epochs.", type(student).__name__, config.epochs)
    return finish(student, model, {"defense": "kd", "temperature": config.temperature, "losses": losses})
