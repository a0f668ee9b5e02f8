"""`ClonedNeurons`: the one place that decides which neurons MEDIC clones and captures them.

The choice is made in steps that must agree with each other: select modules by kind and name, pair the student's
with the teacher's, run a check forward that leaves out what cannot be cloned (and says why), hook both models, and
estimate μ/σ over exactly the neurons that remain. The cloner holds one of these; a script that studies the neurons
without training (benchmarks/importance_analysis.py) builds its own, so both see the same neurons.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .importance import NeuronStats
from .modeling import forward_logits
from .neurons import NeuronRecorder, channel_dim, find_clone_modules, per_sample_channel_dim

logger = logging.get_logger(__name__)

Forward = Callable[[torch.Tensor], Any]


class ClonedNeurons:
    """The cloned modules of a teacher and of its student, their hooks, and what the check forward found.

    Built in two steps, because the second needs real inputs. The constructor selects the modules, pairs the
    student's with the teacher's by name and hooks both models. `probe()` runs the check forward: it pairs the
    output shapes, finds how each output relates to the batch, and leaves out the modules that cannot be cloned,
    with the reason, in `left_out`. Then `cloned`, `rows_per_sample`, `channel_dims` and `neuron_counts`
    describe the cloned neurons, `statistics()` estimates their μ/σ, and `teacher_recorder` / `student_recorder`
    capture them on every forward. The student's captures are off until switched on: only the loss needs them.

    The hooks stay on the models until `remove()`. `with neurons.recording(): ...` removes them when the block ends,
    also when it raises.

    Args:
        teacher: the model whose neurons are cloned.
        student: the model that clones them, of the teacher's architecture; None to study the teacher alone.
        hook_layers: the module kinds to clone: 'conv', 'norm', 'linear' (see `medic_hf.neurons.layer_kind`).
        target_modules, exclude_modules: name filters, a list of name suffixes or one regex (`find_clone_modules`).
        skip_modules: names of modules never cloned (the student's frozen early modules, whose outputs cannot move).
        clone_logits: keep the module whose output is the logits (found by `probe()`); MEDIC leaves it out.
        require_grad: put the teacher's captured outputs in the autograd graph, for ∂ℓ/∂f (the impact criterion).
        teacher_forward, student_forward: how to run each model on a batch of pixel values, for the check forward
            and the statistics. Default: `forward_logits` on the model given here; the cloner passes its
            device-placed teacher.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module | None = None,
        *,
        hook_layers: Iterable[str] = ("conv", "norm", "linear"),
        target_modules: list[str] | str | None = None,
        exclude_modules: list[str] | str | None = None,
        skip_modules: Iterable[str] = (),
        clone_logits: bool = False,
        require_grad: bool = False,
        teacher_forward: Forward | None = None,
        student_forward: Forward | None = None,
    ):
        hook_layers = list(hook_layers)
        select = dict(
            kinds=hook_layers, target_modules=target_modules, exclude_modules=exclude_modules, skip=skip_modules
        )
        teacher_modules = find_clone_modules(teacher, **select)
        if not teacher_modules:
            raise ValueError(
                f"No {'/'.join(hook_layers)} module to clone in {type(teacher).__name__}: check hook_layers, "
                "target_modules and exclude_modules, or use importance='none' with a model that has such layers."
            )
        if student is not None:
            student_modules = find_clone_modules(student, **select)
            if list(teacher_modules) != list(student_modules):
                missing = sorted(set(teacher_modules) ^ set(student_modules))[:5]
                raise ValueError(
                    f"Teacher and student modules do not match (e.g. {missing}): the student must have the teacher's "
                    "architecture; leave `student=None` to let the cloner create it."
                )
        self.teacher, self.student = teacher, student
        self.teacher_forward = teacher_forward or partial(forward_logits, teacher)
        self.student_forward = student_forward or (partial(forward_logits, student) if student is not None else None)
        self.clone_logits = clone_logits
        self.teacher_recorder = NeuronRecorder(teacher_modules, require_grad=require_grad)
        self.student_recorder = None
        if student is not None:
            self.student_recorder = NeuronRecorder(student_modules)
            self.student_recorder.set_enabled(False)
        self.channel_dims = {name: channel_dim(module) for name, module in teacher_modules.items()}
        self.left_out: dict[str, str] = {}
        self.rows_per_sample: dict[str, int] = {}
        self.neuron_counts: dict[str, int] = {}
        self.probed = False

    @property
    def cloned(self) -> list[str]:
        """The names of the modules whose outputs are cloned, in model order."""
        return list(self.teacher_recorder.modules)

    def probe(self, pixel_values: torch.Tensor) -> dict[str, str]:
        """The check forward of both models on two real samples; returns `left_out` (module name -> reason).

        Finds how each output relates to the batch, in-place overwrites, modules that never run, outputs with no
        batch dimension and the logits' module (see `NeuronRecorder.probe`). Raises when the student's outputs
        differ in shape from the teacher's, or when an output's rows cannot be assigned to samples. Modules that
        cannot be cloned are left out, and the log says which, once per reason.
        """
        if self.probed:  # a second probe would apply the rows-per-sample channel shift twice
            raise RuntimeError("probe() runs once per ClonedNeurons.")
        teacher, student = self.teacher_recorder, self.student_recorder
        teacher_silent = teacher.probe(self.teacher_forward, pixel_values)
        student_silent = [] if student is None else self._probe_student(pixel_values)
        teacher_shapes = {n: tuple(s) for n, s in teacher.last_shapes.items()}
        if student is not None:
            student_shapes = {n: tuple(s) for n, s in student.last_shapes.items()}
            if teacher_shapes != student_shapes:
                diff = [n for n in teacher_shapes if teacher_shapes[n] != student_shapes.get(n)][:5]
                raise ValueError(
                    f"Teacher and student outputs do not match at {diff}: the student must be an untrained copy of "
                    "the teacher's architecture; leave `student=None`."
                )
        if teacher.unsupported:
            shown = "; ".join(f"{n}: {why}" for n, why in list(teacher.unsupported.items())[:5])
            raise ValueError(
                f"{len(teacher.unsupported)} module(s) give outputs whose rows MEDIC cannot assign to samples: dim 0 "
                f"is neither the batch nor k rows per sample stored sample after sample ({shown}). Leave them out "
                f"with exclude_modules={list(teacher.unsupported)!r}."
            )
        left_out = {name: "never called (its weights are applied functionally)" for name in teacher_silent}
        left_out.update({name: "never called by the student" for name in student_silent if name not in left_out})
        for name in teacher.batch_free:
            left_out.setdefault(name, "output does not depend on the input (no batch dimension)")
        if not self.clone_logits:
            if not teacher.result_modules:
                logger.info("clone_logits=False, but no cloned module outputs the logits: nothing left out.")
            for name in teacher.result_modules:
                left_out.setdefault(name, "outputs the logits (clone_logits=False)")
        if left_out:
            self.drop(left_out)
            _log_left_out(left_out)
        if not teacher.modules:
            raise ValueError("None of the selected modules is called in the forward pass: nothing to clone.")
        self.left_out = left_out
        self.rows_per_sample = dict(teacher.rows_per_sample)
        if student is not None:
            student.rows_per_sample = dict(teacher.rows_per_sample)
        for name, rows in self.rows_per_sample.items():
            self.channel_dims[name] = per_sample_channel_dim(self.channel_dims[name], rows)
        self.neuron_counts = {n: math.prod(teacher_shapes[n][1:]) * self.rows_per_sample[n] for n in teacher.modules}
        self.probed = True
        return left_out

    def _probe_student(self, pixel_values: torch.Tensor) -> list[str]:
        """The student's check forward, in eval mode (a BatchNorm in training mode mixes the samples of a batch)."""
        was_training = self.student.training
        self.student.eval()
        self.student_recorder.set_enabled(True)
        try:
            return self.student_recorder.probe(self.student_forward, pixel_values)
        finally:
            self.student_recorder.set_enabled(False)
            self.student.train(was_training)

    def drop(self, names: Iterable[str]) -> None:
        """Stop cloning these modules: their hooks come off both models and their channel dimension is forgotten."""
        names = list(names)
        self.teacher_recorder.drop(names)
        if self.student_recorder is not None:
            self.student_recorder.drop(names)
        for name in names:
            self.channel_dims.pop(name, None)

    @torch.no_grad()
    def statistics(
        self, batches: Iterable[torch.Tensor], granularity: str = "channel", sigma_floor: float = 1e-2
    ) -> NeuronStats:
        """μ and σ of every cloned teacher neuron over `batches` of model-ready pixel values, in one streaming pass.

        `NeuronStats.finalize` sums the totals across processes, so each process may pass its own shard.
        """
        if not self.probed:
            raise RuntimeError("Call probe() before statistics(): it finds how each output relates to the batch.")
        stats = NeuronStats(self.channel_dims, granularity, sigma_floor)
        for pixel_values in batches:
            self.teacher_forward(pixel_values)
            stats.update(self.teacher_recorder.by_sample(self.teacher_recorder.pop()))
        stats.finalize()
        return stats

    @contextlib.contextmanager
    def recording(self) -> Iterator[ClonedNeurons]:
        """`with neurons.recording(): ...`: the hooks capture within the block and are all removed when it ends."""
        try:
            yield self
        finally:
            self.remove()

    def remove(self) -> None:
        """Takes every hook off both models; calling it again does nothing."""
        self.teacher_recorder.remove()
        if self.student_recorder is not None:
            self.student_recorder.remove()


def _log_left_out(left_out: dict[str, str]) -> None:
    """One log line per reason, naming the modules (the first few)."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in left_out.items():
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        # The classifier is left out by design (clone_logits=False); anything else the user should see.
        log = logger.info if reason.startswith("outputs the logits") else logger.warning
        log(f"MEDIC leaves out {len(names)} module(s), not cloned: {reason}: {shown}.")
