"""What the baseline defenses share: the common options, clean-data preparation, and the training stack.

Every defense takes a (possibly trojaned) model and a clean data set — a ``datasets.Dataset`` with an image and a
label column, rows of ready ``pixel_values`` / ``labels``, or a torch data set of ``(image, label)`` items — and
returns a repaired model. Training runs on :class:`medic_hf.training.ClassifierTrainer` (:func:`train_classifier`),
the base trainer of MEDIC too: the same data path, optimiser, schedule (stepped per step), gradient clipping and
seeding for every method. Defenses that are not a training run of a model (ANP's mask optimisation, fine-pruning's
pruning search) use the data helpers below in their own small loops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field

import datasets
import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Subset
from transformers import TrainerCallback, set_seed

from ..data import collate_batch, prepare_for_model
from ..modeling import _copy_without_hooks, _select_logits, dropout_disabled, forward_logits, model_family, num_classes
from ..training import ClassifierConfig, ClassifierTrainer, preprocessing_overrides

logger = logging.getLogger(__name__)


@dataclass
class DefenseConfig(ClassifierConfig):
    """The options of every baseline defense: :class:`medic_hf.training.ClassifierConfig` (a
    `transformers.TrainingArguments`: `num_train_epochs`, `learning_rate`, `per_device_train_batch_size`, `seed`,
    ...) with BackdoorBench's fine-tuning as defaults (config/defense/ft/config.yaml): 100 epochs, batch 256, SGD
    lr 0.01, momentum 0.9, weight decay 5e-4 (coupled L2 on every parameter), cosine, no gradient clipping. The
    training defenses run
    on :class:`medic_hf.training.ClassifierTrainer`, as MEDIC does; nothing is saved unless `save_strategy` asks."""

    output_dir: str | None = field(
        default="defense-output", metadata={"help": "Where checkpoints go when save_strategy asks for them."}
    )
    num_train_epochs: float = field(default=100.0, metadata={"help": "Epochs over the clean set (0 skips training)."})
    learning_rate: float = field(default=0.01, metadata={"help": "Initial learning rate."})
    optim: str = field(
        default="sgd",
        metadata={
            "help": "With coupled_weight_decay (default): 'sgd' gives torch.optim.SGD with sgd_momentum, any other "
            "value torch.optim.Adam; the weight decay is coupled L2 on every parameter."
        },
    )
    weight_decay: float = field(default=5e-4, metadata={"help": "L2 weight decay of the optimiser."})
    per_device_train_batch_size: int = field(default=256, metadata={"help": "Clean images per training step."})
    max_grad_norm: float = field(
        default=0.0,
        metadata={
            "help": "Gradient clipping norm; 0: none, as BackdoorBench and the defenses' own code train (the "
            "Trainer's default is 1.0, MEDIC's)."
        },
    )
    logging_strategy: str = field(
        default="epoch", metadata={"help": "Log the mean training loss once per epoch (the defense reports)."}
    )


# --------------------------------------------------------------------------------------------------------------------
# Models and devices
# --------------------------------------------------------------------------------------------------------------------


def resolve_device(config: DefenseConfig) -> torch.device:
    """The config's training device (`TrainingArguments.device`: cuda when available unless `use_cpu`)."""
    return config.device


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without its hooks: the defenses never change the model they are given."""
    return _copy_without_hooks(model)


def finish(repaired: nn.Module, like: nn.Module, report: dict) -> nn.Module:
    """Put the repaired model on the input model's device, in eval mode, with its ``defense_report``."""
    repaired = repaired.to(model_device(like)).eval()
    repaired.defense_report = report
    return repaired


def require_conv2d(model: nn.Module, needs: str, instead: str) -> None:
    """Raise the ValueError of a defense that ``needs`` convolutions, naming what to use ``instead``."""
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        raise ValueError(f"{needs}, but {type(model).__name__} has no nn.Conv2d. Use {instead} instead.")


def functional_logits(model: nn.Module, params: dict[str, torch.Tensor], pixel_values: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` with some parameters replaced by ``params`` (``torch.func.functional_call``)."""
    if model_family(model) == "transformers":
        output = functional_call(model, params, args=(), kwargs={"pixel_values": pixel_values})
    else:
        output = functional_call(model, params, (pixel_values,))
    return _select_logits(output)


# --------------------------------------------------------------------------------------------------------------------
# Data (for the loops that are not a training run: statistics, pruning searches, ANP's masks)
# --------------------------------------------------------------------------------------------------------------------


def prepare_clean_data(model: nn.Module, clean_data, config: DefenseConfig, *, train: bool):
    """``clean_data`` as ``{"pixel_values", "labels"}`` items: the model's preprocessing, crop + flip if ``train``."""
    return prepare_for_model(
        clean_data,
        model,
        train=train,
        augment=config.augment,
        num_classes=num_classes(model),
        **preprocessing_overrides(config),
    )


def make_loader(dataset, config: DefenseConfig, *, shuffle: bool, batch_size: int | None = None) -> DataLoader:
    generator = torch.Generator().manual_seed(config.seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size or config.per_device_train_batch_size,
        shuffle=shuffle,
        collate_fn=collate_batch,
        num_workers=config.dataloader_num_workers,
        generator=generator,
    )


def make_eval_loader(model: nn.Module, clean_data, config: DefenseConfig) -> DataLoader:
    """Batches of ``per_device_eval_batch_size`` in order, with the model's evaluation preprocessing."""
    dataset = prepare_clean_data(model, clean_data, config, train=False)
    return make_loader(dataset, config, shuffle=False, batch_size=config.per_device_eval_batch_size)


def split_clean_data(clean_data, fraction: float, seed: int):
    """Split off a seeded ``fraction`` of the clean set (at least one item): ``(rest, held_out)``."""
    n = len(clean_data)
    if n < 2:
        raise ValueError("The clean set needs at least 2 items to hold some out for validation.")
    order = np.random.default_rng(seed).permutation(n)
    n_held = min(n - 1, max(1, round(fraction * n)))
    held, rest = sorted(order[:n_held].tolist()), sorted(order[n_held:].tolist())
    if isinstance(clean_data, datasets.Dataset):
        return clean_data.select(rest), clean_data.select(held)
    return Subset(clean_data, rest), Subset(clean_data, held)


# --------------------------------------------------------------------------------------------------------------------
# Training: the shared ClassifierTrainer
# --------------------------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    set_seed(seed)


class AfterStep(TrainerCallback):
    """Runs ``fn()`` after every optimizer step (e.g. to keep pruned weights at zero)."""

    def __init__(self, fn):
        self.fn = fn

    def on_step_end(self, args, state, control, **kwargs):
        self.fn()


def epoch_losses(trainer: ClassifierTrainer) -> list[float]:
    """The training losses the Trainer logged, in order: the mean per epoch with DefenseConfig's logging_strategy."""
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


@contextlib.contextmanager
def run_folder(config: DefenseConfig):
    """The config, with a temporary `output_dir` when nothing is saved: a defense leaves no folder behind."""
    if str(getattr(config.save_strategy, "value", config.save_strategy)) != "no":
        yield config
        return
    with tempfile.TemporaryDirectory(prefix="defense-") as tmp:
        yield dataclasses.replace(config, output_dir=tmp)


def fit(trainer: ClassifierTrainer) -> list[float]:
    """``trainer.train()`` unless the config asks for no training (0 epochs); returns the logged losses."""
    if trainer.args.num_train_epochs <= 0 and trainer.args.max_steps <= 0:
        return []
    trainer.train()
    return epoch_losses(trainer)


def train_classifier(
    model: nn.Module,
    clean_data,
    config: DefenseConfig,
    *,
    trainer_class: type[ClassifierTrainer] = ClassifierTrainer,
    after_step=None,
    **trainer_kwargs,
) -> list[float]:
    """Train ``model`` in place on the clean set with ``trainer_class`` (cross-entropy by default) for
    ``config.num_train_epochs`` (0: no training); returns the logged losses. ``after_step`` runs after every
    optimizer step."""
    model.requires_grad_(True)  # a model handed over frozen (e.g. a cloner's teacher) is trained whole
    with run_folder(config) as config:
        trainer = trainer_class(model, config, train_dataset=clean_data, **trainer_kwargs)
        if after_step is not None:
            trainer.add_callback(AfterStep(after_step))
        return fit(trainer)


def trainer_batches(trainer: ClassifierTrainer, *, train: bool) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """``(model input, labels)`` of the trainer's training set, as its training steps see them (augmented if
    ``train``)."""
    for batch in trainer.get_train_dataloader():
        pixel_values = trainer._model_input(batch["pixel_values"].to(trainer.args.device), train=train)
        yield pixel_values, batch["labels"].to(trainer.args.device)


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, inputs: Iterable[torch.Tensor]) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them over the input batches (cumulative
    average, dropout off), like ``torch.optim.swa_utils.update_bn``; returns the number of BatchNorm layers updated."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    with dropout_disabled(model):
        for pixel_values in inputs:
            forward_logits(model, pixel_values)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
    return len(norms)
