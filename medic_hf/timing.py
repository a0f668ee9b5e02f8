"""Where a run's time goes: the training steps against everything else (data, statistics, evaluation, saving)."""

from __future__ import annotations

import time

import torch
from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """Sums the wall time of the training steps (forward, backward, optimizer step), from `on_step_begin` to
    `on_step_end`; fetching the batch happens before `on_step_begin`, so it is not counted. On CUDA the device is
    synchronised at both ends, so the time is the step's and not the launch's."""

    def __init__(self):
        self.seconds = 0.0
        self.steps = 0
        self._start: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        _synchronize(args)
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            _synchronize(args)
            self.seconds += time.perf_counter() - self._start
            self.steps += 1
            self._start = None


def _synchronize(args) -> None:
    if torch.cuda.is_available() and getattr(args, "device", torch.device("cpu")).type == "cuda":
        torch.cuda.synchronize()
