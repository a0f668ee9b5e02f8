"""Logit distillation (Hinton et al., 2015) into a fresh model: MEDIC's ablation that copies only the outputs.

A freshly initialised model of the same architecture learns from the frozen trojaned model's temperature-softened
logits on the clean set, ``(1 - a) * CE(s, y) + a * T^2 * KL(softmax(t / T) || softmax(s / T))`` — the label loss of
MEDIC's ``logit_distillation`` option, with the same names. The teacher is in eval mode, never trained, and runs
without gradients. :class:`DistillationTrainer` is the base trainer with this loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..modeling import forward_logits, make_student
from ..training import ClassifierTrainer, distillation_loss
from ._training import copy_model, finish, seed_everything, train_classifier
from .scratch import ScratchConfig

logger = logging.getLogger(__name__)


@dataclass
class DistillationConfig(ScratchConfig):
    """Logit distillation. Optimisation defaults: MEDIC's (as :class:`ScratchConfig`). Loss defaults: Hinton KD as
    run by RepDistiller (Tian et al., ICLR 2020; train_student.py ``--kd_T 4``, README KD command ``-r 0.1 -a 0.9``:
    0.1 x CE + 0.9 x KD)."""

    logit_distillation: float = field(
        default=0.9, metadata={"help": "Weight a of the T^2-scaled KL term; 1 - a weighs the CE (RepDistiller 0.9)."}
    )
    distillation_temperature: float = field(
        default=4.0, metadata={"help": "Softmax temperature T (RepDistiller kd_T 4)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.distillation_temperature <= 0 or not 0 <= self.logit_distillation <= 1:
            raise ValueError("distillation_temperature must be > 0 and logit_distillation in [0, 1].")


class DistillationTrainer(ClassifierTrainer):
    """:class:`ClassifierTrainer` whose loss distils a frozen ``teacher``'s logits (``DistillationConfig``)."""

    def __init__(self, model: nn.Module, args: DistillationConfig, *trainer_args, teacher: nn.Module, **kwargs):
        super().__init__(model, args, *trainer_args, **kwargs)
        # The frozen teacher is placed on the device (and under autocast) but never wrapped for DDP.
        self.teacher = self.accelerator.prepare_model(teacher.eval().requires_grad_(False), evaluation_mode=True)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pixel_values, labels = self._model_input(inputs["pixel_values"], train=model.training), inputs["labels"]
        logits = forward_logits(model, pixel_values)
        with torch.no_grad():
            teacher_logits = forward_logits(self.teacher, pixel_values)
        loss = distillation_loss(
            logits.float(),
            teacher_logits.float(),
            labels,
            self.args.logit_distillation,
            self.args.distillation_temperature,
        )
        return (loss, {"logits": logits}) if return_outputs else loss


def distill_logits(model: nn.Module, clean_data, config: DistillationConfig | None = None) -> nn.Module:
    """Distil ``model``'s logits into a fresh model of its class on ``clean_data``.

    ``defense_report``: ``{"defense": "kd", "temperature": T, "losses": [the logged training losses]}``.
    """
    config = DistillationConfig() if config is None else config
    seed_everything(config.seed)
    student = make_student(model, seed=config.seed)
    losses = train_classifier(
        student,
        clean_data,
        config,
        trainer_class=DistillationTrainer,
        teacher=copy_model(model),
        preprocessing_model=model,
    )
    logger.info("Distilled the logits into a fresh %s for %s epochs.", type(student).__name__, config.num_train_epochs)
    return finish(student, model, {"defense": "kd", "temperature": config.distillation_temperature, "losses": losses})
