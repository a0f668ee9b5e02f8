"""An exponential moving average of the student's weights (Polyak & Juditsky 1992; timm's `ModelEmaV3`).

The average, not the last iterate, is what gets evaluated and saved when `MedicConfig.ema_decay` > 0. Kept as plain
tensors rather than a deep copy of the model, so the copy carries none of the cloner's hooks.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class WeightAverage:
    """Averages every floating-point parameter and buffer (BatchNorm statistics included) of a model."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup  # timm's warmup: decay_t = min(decay, (1 + t) / (10 + t)), so early steps count
        self.updates = 0
        self.shadow = {name: t.detach().clone() for name, t in model.state_dict().items() if t.is_floating_point()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        for name, value in model.state_dict().items():
            if name in self.shadow:
                self.shadow[name].lerp_(value.detach().to(self.shadow[name].dtype), 1.0 - decay)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        state = model.state_dict()
        for name, value in self.shadow.items():
            state[name].copy_(value)

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """The model holds the averaged weights inside the block and its own weights again after it."""
        state = model.state_dict()
        backup = {name: state[name].detach().clone() for name in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in backup.items():
                    state[name].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"shadow.{name}": t.contiguous() for name, t in self.shadow.items()}
        state["updates"] = torch.tensor(self.updates)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.updates = int(state["updates"])
        for name in self.shadow:
            self.shadow[name].copy_(state[f"shadow.{name}"])
