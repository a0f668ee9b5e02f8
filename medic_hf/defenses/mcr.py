"""Mode Connectivity Repair (MCR; Zhao et al., ICLR 2020).

Two models that solve the task are joined by a quadratic Bezier curve in weight space,

    phi_theta(t) = (1 - t)^2 w0 + 2 t (1 - t) theta + t^2 w1,      t in [0, 1],

with ``w0`` the trojaned model and ``w1`` its copy fine-tuned on the clean set. The bend ``theta`` (initialised at
the midpoint ``(w0 + w1) / 2``) is trained on the clean set with a fresh ``t ~ U(0, 1)`` per batch, the endpoints
fixed. Models on the curve near the trojaned end keep its clean accuracy but lose much of the backdoor; the model
at ``t = config.t`` is returned, with its BatchNorm statistics re-estimated on the clean set (MCR's ``update_bn``).
Every parameter lies on the curve; buffers other than the BatchNorm statistics are the trojaned model's.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..training import ClassifierTrainer
from ._training import (
    DefenseConfig,
    copy_model,
    finish,
    fit,
    functional_logits,
    recompute_batchnorm,
    resolve_device,
    run_folder,
    seed_everything,
    trainer_batches,
)
from .fine_tuning import FineTuningConfig, fine_tune

logger = logging.getLogger(__name__)


@dataclass
class MCRConfig(DefenseConfig):
    """MCR. The curve-training fields (num_train_epochs, per_device_train_batch_size, learning_rate, ...) and the
    fine-tuning of the end point (`ft_*`, at the curve's batch size) are BackdoorBench's
    (config/defense/mcr/config.yaml): curve 100 epochs, batch 128, SGD lr 3e-5 (BackdoorBench's value for its
    PreAct-ResNet18; the MCR code, IBM/model-sanitization backdoor/backdoor-cifar/train.py, uses 0.01 with weight
    decay 1e-4), momentum 0.9, weight decay 5e-4, cosine."""

    per_device_train_batch_size: int = field(
        default=128, metadata={"help": "Clean images per step (BackdoorBench mcr 128)."}
    )
    learning_rate: float = field(
        default=3e-5, metadata={"help": "Learning rate of the bend theta (BackdoorBench mcr 3e-5)."}
    )
    t: float = field(
        default=0.1,
        metadata={
            "help": "Where on the curve the returned model lies (0: trojaned, 1: fine-tuned). BackdoorBench "
            "reports t = 0.1 (config.yaml `test_t`, and the value nearest 0.1 when it sweeps several)."
        },
    )
    ft_epochs: float = field(
        default=100.0, metadata={"help": "Epochs of fine-tuning that make w1 (BackdoorBench 100)."}
    )
    ft_lr: float = field(default=0.01, metadata={"help": "Learning rate of that fine-tuning (BackdoorBench 0.01)."})
    ft_momentum: float = field(default=0.9, metadata={"help": "Its SGD momentum (BackdoorBench 0.9)."})
    ft_weight_decay: float = field(default=5e-4, metadata={"help": "Its weight decay (BackdoorBench 5e-4)."})
    fine_tuned_model: nn.Module | None = field(
        default=None,
        repr=False,
        metadata={
            "help": "An already fine-tuned copy of the trojaned model to use as w1 (skips the fine-tuning; "
            "BackdoorBench's `load_other_model_path`). It must have the trojaned model's architecture."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.t <= 1.0:
            raise ValueError(f"t={self.t}: the curve is defined for t in [0, 1].")


def bezier_coefficients(t: float | torch.Tensor) -> tuple:
    """The weights of ``w0``, ``theta`` and ``w1`` at ``t``: ``(1 - t)^2, 2 t (1 - t), t^2``."""
    return (1 - t) ** 2, 2 * t * (1 - t), t**2


def curve_point(
    w0: dict[str, torch.Tensor], theta: dict[str, torch.Tensor], w1: dict[str, torch.Tensor], t: float | torch.Tensor
) -> dict[str, torch.Tensor]:
    """The parameters ``phi(t) = (1 - t)^2 w0 + 2 t (1 - t) theta + t^2 w1``, name by name."""
    c0, c1, c2 = bezier_coefficients(t)
    return {name: c0 * w0[name] + c1 * theta[name] + c2 * w1[name] for name in w0}


def _parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


class BezierCurve(nn.Module):
    """The curve as a model: its only parameters are the bend ``theta`` (initialised at the midpoint); each forward in
    training mode runs ``base`` at the point of a fresh ``t ~ U(0, 1)``, so a `Trainer` trains the curve as it trains
    any classifier. ``base``'s buffers (BatchNorm statistics) are used and updated as they are."""

    def __init__(self, base: nn.Module, w0: dict[str, torch.Tensor], w1: dict[str, torch.Tensor]):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.names = list(w0)
        self.theta = nn.ParameterList([nn.Parameter((w0[n] + w1[n]) / 2) for n in self.names])
        for i, name in enumerate(self.names):
            self.register_buffer(f"w0_{i}", w0[name])
            self.register_buffer(f"w1_{i}", w1[name])

    def endpoints(self) -> tuple[dict, dict, dict]:
        w0 = {n: getattr(self, f"w0_{i}") for i, n in enumerate(self.names)}
        w1 = {n: getattr(self, f"w1_{i}") for i, n in enumerate(self.names)}
        return w0, dict(zip(self.names, self.theta)), w1

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        t = torch.rand((), device=pixel_values.device)
        return functional_logits(self.base, curve_point(*self.endpoints(), t), pixel_values)


def mcr(model: nn.Module, clean_data, config: MCRConfig | None = None) -> nn.Module:
    """Mode connectivity repair: train a Bezier curve from the model to its fine-tuned copy, return the point at t.

    ``defense_report``: ``t``, ``batchnorm_layers_updated``, the curve ``losses`` and the end point's
    ``fine_tuning_losses`` (None when ``fine_tuned_model`` was given).
    """
    config = MCRConfig() if config is None else config
    seed_everything(config.seed)
    device = resolve_device(config)

    if config.fine_tuned_model is None:
        ft_config = FineTuningConfig(
            **{f.name: getattr(config, f.name) for f in dataclasses.fields(DefenseConfig) if f.init},
        )
        ft_config = dataclasses.replace(
            ft_config,
            num_train_epochs=config.ft_epochs,
            learning_rate=config.ft_lr,
            sgd_momentum=config.ft_momentum,
            weight_decay=config.ft_weight_decay,
            lr_scheduler_type="cosine",
            optim="sgd",
        )
        end = fine_tune(model, clean_data, ft_config)
        ft_losses = end.defense_report["losses"]
    else:
        end, ft_losses = config.fine_tuned_model, None
    w0 = {k: v.to(device) for k, v in _parameters(model).items()}
    w1 = {k: v.to(device) for k, v in _parameters(end).items()}
    if w1.keys() != w0.keys() or any(w1[k].shape != w0[k].shape for k in w0):
        raise ValueError("The fine-tuned end point must have the trojaned model's parameters (names and shapes).")

    curve = BezierCurve(copy_model(model).to(device), w0, w1)
    with run_folder(config) as run_config:
        trainer = ClassifierTrainer(curve, run_config, train_dataset=clean_data, preprocessing_model=model)
        losses = fit(trainer)
        repaired = copy_model(model).to(device)
        with torch.no_grad():
            point = curve_point(*curve.endpoints(), config.t)
            for name, param in repaired.named_parameters():
                param.copy_(point[name])
        # MCR's update_bn: the point's BatchNorm statistics, over the clean set as the curve was trained on it.
        updated = recompute_batchnorm(repaired, (x for x, _ in trainer_batches(trainer, train=True)))
    logger.info("MCR: returned the model at t = %s (%d BatchNorm layers re-estimated).", config.t, updated)
    report = {
        "defense": "mcr",
        "t": config.t,
        "batchnorm_layers_updated": updated,
        "losses": losses,
        "fine_tuning_losses": ft_losses,
    }
    return finish(repaired, model, report)
