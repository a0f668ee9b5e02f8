"""MEDIC and its plain-cloning ablation, as defenses with the common ``(model, clean_data, config)`` shape.

Both are thin wrappers over :class:`medic_hf.MedicCloner`: a fresh student of the model's architecture is trained on
the clean set with cross-entropy plus the clone loss (docs/method.md). Their configs are :class:`medic_hf.MedicConfig`
(`transformers.TrainingArguments` field names: ``num_train_epochs``, ``learning_rate``,
``per_device_train_batch_size``, ``output_dir``, ...). Plain cloning is MEDIC with temperature 0: every neuron gets
the same weight, so the student copies all of the teacher's activations, backdoor included (paper Fig. 4).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field

from torch import nn

from ..cloner import MedicCloner
from ..config import MedicConfig
from ._training import copy_model, finish

logger = logging.getLogger(__name__)


@dataclass
class PlainCloneConfig(MedicConfig):
    """:class:`MedicConfig` with ``temperature=0`` and no τ schedule (uniform importance weights throughout: plain
    cloning). Every other default is MEDIC's (paper Appendix D; docs/method.md)."""

    temperature: float = field(
        default=0.0, metadata={"help": "0: uniform weights, i.e. plain cloning. plain_clone refuses any other value."}
    )
    final_temperature: float | None = field(
        default=None, metadata={"help": "None: τ stays 0. plain_clone refuses any other value but 0."}
    )


def _run_cloner(model: nn.Module, clean_data, config: MedicConfig, name: str) -> nn.Module:
    # The cloner freezes its teacher and may move it to the GPU: give it a copy so the caller's model is untouched.
    cloner = MedicCloner(copy_model(model), config, train_dataset=clean_data)
    try:
        output = cloner.train()
    finally:
        cloner.remove_hooks()
    student = cloner.accelerator.unwrap_model(cloner.model)
    logger.info("%s: trained a fresh student for %s epochs.", name, config.num_train_epochs)
    report = {
        "defense": name,
        "temperature": config.temperature,
        "train_loss": output.training_loss,
        "train_steps_seconds": round(cloner.step_timer.seconds, 2),  # the steps alone, against the cell's seconds
    }
    return finish(student, model, report)


def _with_default_output(model: nn.Module, clean_data, config: MedicConfig | None, config_class, name: str):
    if config is not None:
        return _run_cloner(model, clean_data, config, name)
    # Nothing asked to be saved: train in a temporary folder, without checkpoints.
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
        config = config_class(output_dir=tmp, save_strategy="no", importance_log_file=None)
        return _run_cloner(model, clean_data, config, name)


def medic(model: nn.Module, clean_data, config: MedicConfig | None = None) -> nn.Module:
    """MEDIC (Xu et al., CVPR 2023): importance-driven cloning into a fresh student of the same class.

    ``config`` None trains with MEDIC's defaults in a temporary folder without checkpoints; a given
    :class:`MedicConfig` is used as it is (its ``output_dir`` receives checkpoints per its ``save_strategy``).
    ``defense_report``: ``temperature`` and the Trainer's mean ``train_loss``.
    """
    return _with_default_output(model, clean_data, config, MedicConfig, "medic")


def plain_clone(model: nn.Module, clean_data, config: MedicConfig | None = None) -> nn.Module:
    """MEDIC's plain-cloning ablation (temperature 0: all neurons cloned with equal weight).

    ``config`` must have ``temperature == 0`` and no other impact temperature (:class:`PlainCloneConfig` does).
    """
    if config is not None and (
        config.temperature != 0 or config.effective_impact_temperature != 0 or (config.final_temperature or 0) != 0
    ):
        raise ValueError(
            f"plain_clone is MEDIC with temperature 0, got temperature={config.temperature}, "
            f"impact_temperature={config.impact_temperature}, final_temperature={config.final_temperature}. "
            "Use PlainCloneConfig(...), or medic(...) for importance-weighted cloning."
        )
    return _with_default_output(model, clean_data, config, PlainCloneConfig, "clone")
