"""Fine-pruning (Liu et al., RAID 2018): prune the last convolutional layer's least active channels, then fine-tune.

Backdoor neurons tend to be dormant on clean inputs, so the channels of the last convolutional feature map that are
least active on clean data are pruned in increasing order of mean activation until the clean accuracy (on a part of
the clean set held out for this) drops too much; the pruned model is then fine-tuned with the channels kept at zero.

Where a channel is pruned. The channels of the last convolutional feature map reach the classifier through global
pooling, so a channel is pruned by zeroing its column in the weight of the classifier (the ``nn.Linear`` whose output
is the logits), which is exactly ``feature_map[:, c] = 0`` for the network's output — BackdoorBench's implementation
(``defense/fp.py`` masks the input of the last Linear). This is robust where zeroing a convolution's filter is not:
in a ResNet the last ``nn.Conv2d`` (in module order or call order) can be a shortcut projection, a residual sum
re-injects the channel from the other branch, and a BatchNorm after a zeroed filter still outputs its bias. It needs
a model whose logits are one ``nn.Linear`` applied to pooled ``(batch, channels)`` features; other models get a clear
error. The pruned columns are set back to zero after every fine-tuning step, so the pruning survives fine-tuning and
is stored in the ordinary state dict (no hooks, no extra keys).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..modeling import forward_logits
from ._training import (
    DefenseConfig,
    copy_model,
    finish,
    make_eval_loader,
    require_conv2d,
    resolve_device,
    seed_everything,
    split_clean_data,
    train_classifier,
)

logger = logging.getLogger(__name__)


@dataclass
class FinePruningConfig(DefenseConfig):
    """Fine-pruning. The fine-tuning fields (num_train_epochs, learning_rate, ...) are BackdoorBench's
    (config/defense/fp/cifar10.yaml: 100 epochs, batch 256, SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine),
    as are the pruning fields below unless stated."""

    acc_ratio: float = field(
        default=0.1,
        metadata={
            "help": "Stop pruning before the held-out clean accuracy drops by this fraction of its unpruned value "
            "((acc0 - acc) / acc0 >= acc_ratio); BackdoorBench fp `acc_ratio` 0.1."
        },
    )
    once_prune_ratio: float = field(
        default=0.01,
        metadata={"help": "Channels pruned per step, as a fraction of all (at least 1); BackdoorBench 0.01."},
    )
    max_prune_ratio: float = field(
        default=1.0,
        metadata={
            "help": "Never prune more than this fraction of the channels (and never all of them). 1.0: no cap, as "
            "BackdoorBench (the accuracy tolerance decides)."
        },
    )
    val_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Fraction of the clean set held out to measure the clean accuracy while pruning (BackdoorBench "
            "uses the clean test set, which a defender does not have). Fine-tuning uses the whole clean set."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.once_prune_ratio <= 1 or not 0 <= self.max_prune_ratio <= 1 or not 0 < self.val_fraction < 1:
            raise ValueError("once_prune_ratio must be in (0, 1], max_prune_ratio in [0, 1], val_fraction in (0, 1).")


class ClassifierInputs:
    """Forward pre-hook on the classifier: sums its input features per channel and, if ``keep``, keeps them."""

    def __init__(self, keep: bool = False):
        self.keep = keep
        self.total: torch.Tensor | None = None
        self.count = 0
        self.kept: list[torch.Tensor] = []

    def __call__(self, module: nn.Module, args: tuple) -> None:
        features = args[0].detach().float()
        self.total = features.sum(0) if self.total is None else self.total + features.sum(0)
        self.count += features.shape[0]
        if self.keep:
            self.kept.append(features)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count


@torch.no_grad()
def find_classifier(model: nn.Module, pixel_values: torch.Tensor) -> tuple[str, nn.Linear]:
    """The ``nn.Linear`` whose output is the model's logits and whose input is ``(batch, channels)`` features."""
    outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [
        module.register_forward_hook(lambda m, args, out, name=name: outputs.__setitem__(name, (args[0], out)))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    try:
        logits = forward_logits(model.eval(), pixel_values)
    finally:
        for handle in handles:
            handle.remove()
    found = [
        name
        for name, (_, out) in outputs.items()
        if isinstance(out, torch.Tensor) and out.shape == logits.shape and torch.equal(out, logits)
    ]
    if not found:
        raise ValueError(
            f"Fine-pruning prunes the channels that {type(model).__name__}'s classifier reads, but no nn.Linear "
            "produces its logits (e.g. a convolutional head or averaged heads). Use another defense for this model."
        )
    name = found[-1]
    if outputs[name][0].dim() != 2:
        raise ValueError(
            f"Fine-pruning needs a classifier on pooled (batch, channels) features; {name} reads a tensor of shape "
            f"{tuple(outputs[name][0].shape)}."
        )
    return name, model.get_submodule(name)


@torch.no_grad()
def record_classifier_inputs(
    model: nn.Module, classifier: nn.Module, loader, device: torch.device, *, keep: bool = False
) -> tuple[ClassifierInputs, torch.Tensor]:
    """One pass over ``loader`` in eval mode: the classifier's input features (mean per channel, kept if asked) and
    the labels."""
    recorder = ClassifierInputs(keep=keep)
    handle = classifier.register_forward_pre_hook(recorder)
    labels = []
    try:
        model.eval()
        for batch in loader:
            forward_logits(model, batch["pixel_values"].to(device))
            labels.append(batch["labels"].to(device))
    finally:
        handle.remove()
    return recorder, torch.cat(labels)


@torch.no_grad()
def choose_pruned_channels(
    classifier: nn.Linear,
    order: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    config: FinePruningConfig,
) -> tuple[torch.Tensor, float, float]:
    """Prune ``order[:n]`` for growing n (steps of ``once_prune_ratio``) while the held-out accuracy stays within
    ``acc_ratio`` of the unpruned one; returns the channels to prune and the accuracies before / after."""
    channels = order.numel()
    step = max(1, math.ceil(channels * config.once_prune_ratio))
    most = min(channels - 1, math.floor(channels * config.max_prune_ratio))

    def accuracy(n: int) -> float:
        mask = torch.ones(channels, device=val_features.device)
        mask[order[:n]] = 0
        return (classifier(val_features * mask).argmax(-1) == val_labels).float().mean().item()

    acc0 = accuracy(0)
    kept, acc_kept = 0, acc0
    for n in range(step, most + 1, step):
        acc = accuracy(n)
        if acc0 > 0 and (acc0 - acc) / acc0 >= config.acc_ratio:
            break
        kept, acc_kept = n, acc
    return order[:kept], acc0, acc_kept


def fine_prune(model: nn.Module, clean_data, config: FinePruningConfig | None = None) -> nn.Module:
    """Fine-pruning: prune the least active channels of the last convolutional feature map, then fine-tune.

    ``defense_report``: the classifier's name, ``num_channels``, ``pruned_channels`` (in pruning order), the
    held-out clean accuracy before and after pruning, and the fine-tuning ``losses``.
    """
    config = FinePruningConfig() if config is None else config
    require_conv2d(
        model,
        "Fine-pruning prunes channels of the last convolutional layer",
        "fine_tune, nad (if it has conv feature maps) or medic",
    )
    seed_everything(config.seed)
    device = resolve_device(config)
    repaired = copy_model(model).to(device)

    eval_loader = make_eval_loader(repaired, clean_data, config)
    first = next(iter(eval_loader))["pixel_values"][:2].to(device)
    name, classifier = find_classifier(repaired, first)
    activations, _ = record_classifier_inputs(repaired, classifier, eval_loader, device)
    order = torch.argsort(activations.mean, stable=True)

    _, held_out = split_clean_data(clean_data, config.val_fraction, config.seed)
    val_loader = make_eval_loader(repaired, held_out, config)
    val, val_labels = record_classifier_inputs(repaired, classifier, val_loader, device, keep=True)
    pruned, acc0, acc = choose_pruned_channels(classifier, order, torch.cat(val.kept), val_labels, config)

    def zero_pruned() -> None:
        with torch.no_grad():
            classifier.weight[:, pruned] = 0

    zero_pruned()
    logger.info(
        "Fine-pruning: pruned %d of %d channels read by %s (held-out clean accuracy %.4f -> %.4f).",
        pruned.numel(),
        order.numel(),
        name,
        acc0,
        acc,
    )
    losses = train_classifier(repaired, clean_data, config, after_step=zero_pruned)
    report = {
        "defense": "fp",
        "layer": name,
        "num_channels": order.numel(),
        "pruned_channels": pruned.tolist(),
        "val_accuracy_before": acc0,
        "val_accuracy_pruned": acc,
        "losses": losses,
    }
    return finish(repaired, model, report)
