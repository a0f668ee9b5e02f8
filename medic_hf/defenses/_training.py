"""What the baseline defenses share: the common options, clean-data preparation, and one small training loop.

Every defense takes a (possibly trojaned) model and a clean data set — a ``datasets.Dataset`` with an image and a
label column, rows of ready ``pixel_values`` / ``labels``, or a torch data set of ``(image, label)`` items — and
returns a repaired model. The helpers here turn the data into ``{"pixel_values", "labels"}`` batches with the
model's own preprocessing (plus random crop and flip for training) and run a seeded SGD / Adam loop with a cosine or
constant learning rate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm
from transformers import set_seed

from ..data import collate_batch, prepare_for_model
from ..modeling import _copy_without_hooks, _select_logits, dropout_disabled, forward_logits, model_family, num_classes

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("cosine", "constant")


@dataclass
class DefenseConfig:
    """Options every defense has: data, device, seed. Training defenses add :class:`TrainingConfig`'s fields."""

    batch_size: int = field(default=256, metadata={"help": "Clean images per training step."})
    eval_batch_size: int = field(
        default=256, metadata={"help": "Images per forward pass when nothing is trained (statistics, accuracy)."}
    )
    augment: bool = field(
        default=True,
        metadata={
            "help": "Random crop (padding 1/8 of the side) and horizontal flip on training images given as an image "
            "column, the usual CIFAR training transform of the papers and BackdoorBench. Ready `pixel_values` rows "
            "are never augmented."
        },
    )
    preprocessing: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments of medic_hf.data.resolve_preprocessing (input_size, mean, std, "
            "image_processor). Needed for plain PyTorch models fed an image column; timm and transformers models "
            "carry their own."
        },
    )
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    device: str | None = field(
        default=None, metadata={"help": "Device to run on; None picks cuda when available, else cpu."}
    )
    seed: int = field(default=0, metadata={"help": "Seeds torch / numpy / random and the data order."})
    show_progress: bool = field(default=True, metadata={"help": "Show a tqdm progress bar."})

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("batch_size and eval_batch_size must be >= 1.")


@dataclass
class TrainingConfig(DefenseConfig):
    """:class:`DefenseConfig` plus the optimiser of a training phase (defaults: BackdoorBench's fine-tuning)."""

    epochs: int = field(default=100, metadata={"help": "Epochs over the clean set (0 skips training)."})
    lr: float = field(default=0.01, metadata={"help": "Initial learning rate."})
    optimizer: str = field(
        default="sgd",
        metadata={
            "help": "'sgd' (torch.optim.SGD with `momentum`) or 'adam' (torch.optim.Adam); weight decay is the "
            "optimiser's own (coupled L2).",
            "choices": list(OPTIMIZERS),
        },
    )
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum (ignored by Adam)."})
    weight_decay: float = field(default=5e-4, metadata={"help": "L2 weight decay of the optimiser."})
    lr_schedule: str = field(
        default="cosine",
        metadata={
            "help": "'cosine' (CosineAnnealingLR over `epochs`, stepped once per epoch, as BackdoorBench) or "
            "'constant'.",
            "choices": list(LR_SCHEDULES),
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r}: choose one of {OPTIMIZERS}.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r}: choose one of {LR_SCHEDULES}.")
        if self.epochs < 0 or self.lr < 0 or self.weight_decay < 0:
            raise ValueError("epochs, lr and weight_decay must be >= 0.")


# --------------------------------------------------------------------------------------------------------------------
# Models and devices
# --------------------------------------------------------------------------------------------------------------------


def resolve_device(config: DefenseConfig) -> torch.device:
    if config.device:
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without its hooks: the defenses never change the model they are given."""
    return _copy_without_hooks(model)


def finish(repaired: nn.Module, like: nn.Module, report: dict[str, Any]) -> nn.Module:
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
# Data
# --------------------------------------------------------------------------------------------------------------------


def prepare_clean_data(model: nn.Module, clean_data, config: DefenseConfig, *, train: bool):
    """``clean_data`` as ``{"pixel_values", "labels"}`` items: the model's preprocessing, crop + flip if ``train``."""
    return prepare_for_model(
        clean_data,
        model,
        train=train,
        augment=config.augment,
        num_classes=num_classes(model),
        **(config.preprocessing or {}),
    )


def make_loader(dataset, config: DefenseConfig, *, shuffle: bool, batch_size: int | None = None) -> DataLoader:
    generator = torch.Generator().manual_seed(config.seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size or config.batch_size,
        shuffle=shuffle,
        collate_fn=collate_batch,
        num_workers=config.num_workers,
        generator=generator,
    )


def make_eval_loader(model: nn.Module, clean_data, config: DefenseConfig) -> DataLoader:
    """Batches of ``eval_batch_size`` in order, with the model's evaluation preprocessing (no augmentation)."""
    dataset = prepare_clean_data(model, clean_data, config, train=False)
    return make_loader(dataset, config, shuffle=False, batch_size=config.eval_batch_size)


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
# Training
# --------------------------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    set_seed(seed)


def make_optimizer(params: Iterable[torch.Tensor], config: TrainingConfig) -> torch.optim.Optimizer:
    params = list(params)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def train_loop(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    config: TrainingConfig,
    *,
    params: Iterable[torch.Tensor] | None = None,
    after_step: Callable[[], None] | None = None,
    desc: str = "training",
) -> list[float]:
    """Minimise ``loss_fn(pixel_values, labels)`` over ``config.epochs`` epochs; returns the mean loss per epoch.

    ``model`` is put in train mode each epoch; ``params`` (default: the model's trainable parameters) are optimised;
    ``after_step`` runs after every optimiser step (e.g. to keep pruned weights at zero).
    """
    device = resolve_device(config)
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    optimizer = make_optimizer(params, config)
    scheduler = None
    if config.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs))
    epoch_losses = []
    with tqdm(total=config.epochs * len(loader), desc=desc, disable=not config.show_progress) as bar:
        for epoch in range(config.epochs):
            model.train()
            total, steps = 0.0, 0
            for batch in loader:
                loss = loss_fn(batch["pixel_values"].to(device), batch["labels"].to(device))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{desc}: the loss is not finite ({loss.item()}); lower the lr.")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if after_step is not None:
                    after_step()
                total, steps = total + loss.item(), steps + 1
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if scheduler is not None:
                scheduler.step()
            epoch_losses.append(total / max(1, steps))
            logger.info("%s: epoch %d/%d, mean loss %.4f", desc, epoch + 1, config.epochs, epoch_losses[-1])
    return epoch_losses


def fit_cross_entropy(
    model: nn.Module,
    clean_data,
    config: TrainingConfig,
    *,
    desc: str,
    after_step: Callable[[], None] | None = None,
) -> list[float]:
    """Train ``model`` (in place, moved to the config's device) with cross-entropy on the clean set."""
    device = resolve_device(config)
    model.to(device).requires_grad_(True)
    loader = make_loader(prepare_clean_data(model, clean_data, config, train=True), config, shuffle=True)

    def loss_fn(pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(forward_logits(model, pixel_values).float(), labels)

    return train_loop(model, loader, loss_fn, config, after_step=after_step, desc=desc)


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, loader: DataLoader, device: torch.device) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them over ``loader`` (cumulative average, dropout
    off), like ``torch.optim.swa_utils.update_bn``; returns the number of BatchNorm layers updated."""
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
        for batch in loader:
            forward_logits(model, batch["pixel_values"].to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
    return len(norms)
