"""`MedicCloner`: a `transformers.Trainer` that trains a fresh student to clone a trojaned teacher (MEDIC)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, has_length
from transformers.utils import logging

from .averaging import WeightAverage
from .cloned_neurons import ClonedNeurons
from .config import BASE_FROZEN_FRACTION, MedicConfig
from .data import DeviceBatchTransform, DeviceImageSet, find_image_column
from .hub import _hub_repo_id, build_model_card, public_name, push_folder_to_hub
from .importance import NeuronStats, effective_support, importance_weights, layer_clone_loss, pooled_clone_loss
from .metrics import metric_name
from .mixing import mix_batch, overlay_batch
from .modeling import (
    disable_dropout,
    forward_logits,
    load_model,
    make_student,
    model_family,
    student_from_base,
)
from .neurons import (
    NeuronRecorder,
    attention_modules,
    early_modules,
    freeze_early_modules,
    freeze_modules,
    per_sample,
    prefix_tokens,
)
from .timing import StepTimer
from .training import ClassifierTrainer, distillation_loss, random_state_kept, soft_target_loss

logger = logging.get_logger(__name__)

STATS_FILE = "medic_stats.safetensors"
STATE_FILE = "medic_state.json"
AVERAGE_FILE = "medic_average.safetensors"
# The settings a resumed run must share with its checkpoint: they change what the student becomes.
FINGERPRINT_SETTINGS = (
    "clone_loss_weight",
    "temperature",
    "impact_temperature",
    "importance",
    "impact_scale",
    "importance_cutoff",
    "importance_top_fraction",
    "final_temperature",
    "clone_loss_schedule",
    "mix_inputs",
    "mix_alpha",
    "unlabeled_batch_size",
    "unlabeled_loss",
    "ema_decay",
    "student_input_noise",
    "student_input_blend",
    "logit_distillation",
    "distillation_temperature",
    "augment",
    "hook_layers",
    "clone_logits",
    "target_modules",
    "exclude_modules",
    "clone_attention",
    "frozen_fraction",
    "freeze_modules",
    "base_warmup",
    "early_lr_scale",
    "stats_granularity",
    "clone_positions",
    "sigma_floor",
    "coupled_weight_decay",
    "sgd_momentum",
    "image_size",
    "image_mean",
    "image_std",
    "learning_rate",
    "weight_decay",
    "lr_scheduler_type",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
    "warmup_steps",
    "optim",
    "max_grad_norm",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "bf16",
    "fp16",
)


class MedicCloner(ClassifierTrainer):
    r"""
    Removes a backdoor by importance-driven cloning (MEDIC, CVPR 2023).

    `model` is the (possibly trojaned) teacher: an `nn.Module` (timm, transformers or plain PyTorch) or a string
    (a timm model name, an `hf-hub:` id, a transformers model id, or a local folder of either). A student of the
    same class is created with a fresh random initialisation and trained on `train_dataset` (a small clean set)
    with cross-entropy plus the importance-weighted clone loss. After `train()`, `cloner.model` is the sanitized
    student; `save_model()` writes it in its native format with a model card, `push_to_hub()` uploads that folder.

    Args:
        model: the teacher, or where to load it from. It is never modified and never trained.
        args: a [`MedicConfig`]; `MedicConfig()` when None.
        train_dataset: a `datasets.Dataset` or torch dataset of clean samples: rows with `pixel_values` and
            `labels`, or an image column (`img`/`image`) and a label column (`label`/`labels`), which then get the
            model's preprocessing plus light augmentation (random crop with padding, horizontal flip).
        eval_dataset: one data set or a dict such as `{"clean": ds, "backdoor": ds}` (the backdoor set holds
            triggered images of non-target classes labelled with the target: its accuracy is the ASR).
        student: where the student starts. None (default): a fresh random initialisation of the teacher's
            architecture (the paper's method). An `nn.Module`: that freshly initialised student. A string: the
            trusted pretrained base a transfer-learned teacher was fine-tuned from (a timm name with a pretrained
            tag, an `hf-hub:` id, a transformers Hub id or a local folder, loaded under the teacher's rules); the
            student holds its weights, with a fresh classifier when the base was trained for other classes
            (`medic_hf.modeling.student_from_base`).
        unlabeled_dataset: optional unlabeled images (a `datasets.Dataset` with an image column; a label column
            is ignored), e.g. public images of the base's pretraining domain. `unlabeled_batch_size` of them are
            drawn at random and added to every clean batch, for the clone loss only or the teacher's logits
            (`unlabeled_loss`; docs/transfer.md); they are decoded once onto the training device with the teacher's
            preprocessing and augmented as the clean set.
        image_processor: a transformers image processor to preprocess image columns (else the timm data config
            or the model config is used).
        trust_remote_code: passed to transformers when `model` is a string; off unless you ask.
        dataset_name: the clean data's name, for the model card.
        base_model_name: the teacher's name or id, for the model card (default: read from the model).
    """

    def __init__(
        self,
        model: nn.Module | str,
        args: MedicConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        data_collator: Callable | None = None,
        processing_class=None,
        compute_metrics: Callable | None = None,
        callbacks=None,
        optimizers=(None, None),
        *,
        student: nn.Module | str | None = None,
        unlabeled_dataset=None,
        image_processor=None,
        trust_remote_code: bool = False,
        dataset_name: str | None = None,
        base_model_name: str | None = None,
        **kwargs,
    ):
        args = MedicConfig() if args is None else args
        if not isinstance(args, MedicConfig):
            raise TypeError(f"args must be a MedicConfig, got {type(args).__name__}: build it with MedicConfig(...).")
        _check_unlabeled(unlabeled_dataset, args)
        # Building a cloner leaves the caller's random state as it was (the Trainer seeds it; train() seeds again).
        with random_state_kept():
            self.teacher_name, self.base_model_id = _teacher_identity(model, base_model_name)
            teacher = load_model(model, trust_remote_code=trust_remote_code) if isinstance(model, str) else model
            teacher.eval().requires_grad_(False)
            self.teacher = teacher
            self.num_prefix_tokens = prefix_tokens(teacher)  # kept per token by clone_positions="mean"
            self.dataset_name = dataset_name
            self.resumed_from: str | None = None
            self.warnings: list[str] = []

            self.student_base = None
            if isinstance(student, (str, Path)):
                # Transfer-learned teacher: start from the trusted pretrained weights it was fine-tuned from.
                self.student_base = _teacher_identity(str(student), None)
                student = student_from_base(student, teacher, seed=args.seed, trust_remote_code=trust_remote_code)
                if not args.warmup_steps and args.base_warmup:
                    args.warmup_steps = args.base_warmup  # a base-started student warms up (docs/transfer.md)
            student = make_student(teacher, seed=args.seed) if student is None else student
            self.frozen_modules: list[str] = []  # the student's early modules kept at the base's values
            self._slow_params: set[int] = set()  # early parameters trained at early_lr_scale × the learning rate
            if args.freeze_modules is not None:
                freeze_modules(student, args.freeze_modules)
            else:
                fraction = args.frozen_fraction
                if fraction is None:
                    fraction = BASE_FROZEN_FRACTION if self.student_base else 0.0
                if args.early_lr_scale > 0:  # trained slower instead of frozen, so cloned too
                    params = dict(student.named_parameters())
                    self._slow_params = {id(params[n]) for n in early_modules(student, fraction, args.hook_layers)[1]}
                else:
                    self.frozen_modules = freeze_early_modules(student, fraction, args.hook_layers)
            self._raw_train_dataset = train_dataset
            self.clone_positions = args.clone_positions  # None: "mean" from a base (docs/transfer.md), else Eq. 1
            if self.clone_positions is None:
                use_mean = self.student_base and args.stats_granularity == "channel"
                self.clone_positions = "mean" if use_mean else "each"

            # ClassifierTrainer prepares the data with the teacher's preprocessing, the student's input.
            super().__init__(
                student,
                args,
                train_dataset,
                eval_dataset,
                data_collator,
                preprocessing_model=teacher,
                image_processor=image_processor,
                processing_class=processing_class,
                compute_metrics=compute_metrics,
                callbacks=callbacks,
                optimizers=optimizers,
                **kwargs,
            )
            self.step_timer = StepTimer()  # the training steps' own time, against the whole run's
            self.add_callback(self.step_timer)
            self.weight_average = None
            if args.ema_decay > 0:
                self.weight_average = WeightAverage(self.accelerator.unwrap_model(self.model), args.ema_decay)
                self.add_callback(_UpdateAverage(self))
            # The frozen teacher is placed on the device (and under autocast) but never wrapped for DDP.
            self.teacher = self.accelerator.prepare_model(self.teacher, evaluation_mode=True)

            self._setup_neurons(teacher, student)
            self._raw_unlabeled = unlabeled_dataset
            self.unlabeled_images = self._prepare_unlabeled(unlabeled_dataset)
            self.stats = NeuronStats(self.channel_dims, args.stats_granularity, args.sigma_floor)
            self.metrics_before: dict[str, float] = {}
            self.metrics_after: dict[str, float] = {}
            self._running = {"ce": [], "clone": []}
            self._diagnostics: dict[str, dict[str, float]] | None = None

    # ------------------------------------------------------------------ set-up

    def _prepare_unlabeled(self, dataset) -> torch.Tensor | None:
        """Unlabeled images as one uint8 tensor on the device (the teacher's evaluation preprocessing); their
        batches go through `_model_input`, as the clean set's do."""
        if dataset is None:
            return None
        preprocessing = self._resolve_preprocessing()
        megabytes = DeviceImageSet.nbytes(dataset, preprocessing) / 2**20
        if megabytes > self.args.device_data_max_mb:
            raise ValueError(
                f"The unlabeled data set ({len(dataset)} images) takes {megabytes:.0f} MiB decoded, more than "
                f"device_data_max_mb={self.args.device_data_max_mb:g}: select fewer images "
                "(unlabeled_dataset.select(range(n))) or raise device_data_max_mb."
            )
        image_column = find_image_column(dataset)
        logger.info(f"Unlabeled images for the clone loss: {len(dataset)} ({image_column!r} column).")
        images = DeviceImageSet.from_dataset(dataset, image_column, None, preprocessing, device=self.args.device)
        if self.device_transform is None:  # a clean set loaded per image has none; it only acts on uint8 batches
            self.device_transform = DeviceBatchTransform(preprocessing)
        return images.images

    def _unlabeled_batch(self) -> torch.Tensor:
        """`unlabeled_batch_size` unlabeled images drawn at random (torch's generator, which the Trainer seeds and
        saves in checkpoints), augmented and normalised as the clean batches are."""
        size = self.args.unlabeled_batch_size or self.args.per_device_train_batch_size
        index = torch.randint(len(self.unlabeled_images), (size,), device=self.unlabeled_images.device)
        return self._model_input(self.unlabeled_images[index], train=True)

    def _attention_left_out(self, student: nn.Module) -> list[str]:
        """The attention layers' modules, when they are not cloned (`clone_attention`)."""
        clone = self.args.clone_attention
        if clone is None:  # the paper clones them; a student from a trusted base does not (docs/transfer.md)
            clone = not self.student_base
        names = [] if clone else attention_modules(student)
        if names:
            logger.info("Attention layers not cloned (clone_attention=False): %d modules", len(names))
        return names

    def _setup_neurons(self, teacher: nn.Module, student: nn.Module) -> None:
        """Select, pair and hook the teacher's and the student's cloned modules, and check them once on two real
        samples (`ClonedNeurons`). Modules that cannot be cloned are left out, and the log says which."""
        args = self.args
        self.attention_left_out = self._attention_left_out(student)
        self.needs_teacher_grad = args.importance in ("both", "impact") and args.effective_impact_temperature > 0
        self.neurons = ClonedNeurons(
            teacher,
            student,
            hook_layers=args.hook_layers,
            target_modules=args.target_modules,
            exclude_modules=args.exclude_modules,
            skip_modules=self.frozen_modules + self.attention_left_out,
            clone_logits=args.clone_logits,
            require_grad=self.needs_teacher_grad,
            teacher_forward=partial(forward_logits, self.teacher),  # placed on the device, under autocast
        )
        dataset = self.train_dataset
        if dataset is None:
            raise ValueError("MedicCloner needs a train_dataset (the clean samples to clone on).")
        batch = self.data_collator([dataset[i] for i in range(min(2, len(dataset)))])
        self.neurons.probe(self._model_input(batch["pixel_values"].to(self.args.device), train=False))

    # What is cloned, as `self.neurons` found it (see ClonedNeurons).

    @property
    def cloned_modules(self) -> list[str]:
        """The names of the modules whose outputs are cloned, in model order."""
        return self.neurons.cloned

    @property
    def left_out_modules(self) -> dict[str, str]:
        """Module name -> why it is not cloned."""
        return self.neurons.left_out

    @property
    def rows_per_sample(self) -> dict[str, int]:
        """Module name -> rows of its output per sample (1: the usual batch dimension)."""
        return self.neurons.rows_per_sample

    @property
    def channel_dims(self) -> dict[str, int]:
        """Module name -> channel dimension of its per-sample output (`NeuronRecorder.by_sample`)."""
        return self.neurons.channel_dims

    @property
    def neuron_counts(self) -> dict[str, int]:
        """Module name -> neurons per sample."""
        return self.neurons.neuron_counts

    @property
    def teacher_recorder(self) -> NeuronRecorder:
        """Captures the teacher's cloned outputs on every forward (`pop()` takes them)."""
        return self.neurons.teacher_recorder

    @property
    def student_recorder(self) -> NeuronRecorder:
        """Captures the student's cloned outputs while enabled (around the student's forward in the loss)."""
        return self.neurons.student_recorder

    # ------------------------------------------------------------------ statistics

    @torch.no_grad()
    def compute_statistics(self) -> NeuronStats:
        """μ and σ of every teacher neuron over the clean training set, one streaming pass, reduced across ranks.

        Each process reads a strided shard of the data set (no padding, no duplicates), so the totals are those
        of the whole set whatever the number of processes.
        """
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        shard = Subset(self.train_dataset, range(rank, len(self.train_dataset), world))
        loader = DataLoader(
            shard,
            batch_size=self.args.per_device_eval_batch_size,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
        )
        bar = tqdm(loader, desc="MEDIC statistics", disable=not self.is_local_process_zero() or self.args.disable_tqdm)
        batches = (self._model_input(batch["pixel_values"].to(self.args.device), train=True) for batch in bar)
        return self.neurons.statistics(batches, self.args.stats_granularity, self.args.sigma_floor)

    # ------------------------------------------------------------------ the loss

    def _progress(self) -> float:
        """The fraction of training done, 0 at the first step and 1 at the last."""
        total = max(1, (self.state.max_steps or 1) - 1)
        return min(1.0, self.state.global_step / total)

    def current_temperature(self) -> float:
        """τ at this step: `temperature`, moved linearly to `final_temperature` when that is set."""
        args = self.args
        if args.final_temperature is None:
            return args.temperature
        return args.temperature + (args.final_temperature - args.temperature) * self._progress()

    def current_clone_loss_weight(self) -> float:
        """λ at this step: constant, or cosine-annealed to 0 at the last step."""
        weight = self.args.clone_loss_weight
        if self.args.clone_loss_schedule == "cosine":
            weight *= 0.5 * (1.0 + math.cos(math.pi * self._progress()))
        return weight

    def _teacher_targets(
        self, pixel_values: torch.Tensor, labels: torch.Tensor, clone_rows: int | None = None
    ) -> dict[str, tuple]:
        """Teacher activations (fp32, detached) and their importance weights, one forward + one autograd.grad.

        `labels` are class indices, or class probabilities (B, C) for mixed inputs. Targets are made for the first
        `clone_rows` rows only (all when None); the teacher's logits cover every row.
        """
        args = self.args
        one_sample = pixel_values.shape[0] == 1 and self.needs_teacher_grad
        if one_sample:
            # torch's CPU BatchNorm backward (eval mode) returns wrong input gradients for a batch of one sample whose
            # incoming gradient is channels-last strided (seen on torch 2.14 in LeViT's stem, docs/method.md); two
            # copies of the sample give it its own, correct gradient (the loss is summed per sample).
            pixel_values, labels = torch.cat([pixel_values, pixel_values]), torch.cat([labels, labels])
        with torch.enable_grad() if self.needs_teacher_grad else torch.no_grad():
            logits = forward_logits(self.teacher, pixel_values)
            activations = self.teacher_recorder.pop()
            grads = [None] * len(activations)
            if not labels.is_floating_point():  # class indices, where -1 marks an unlabeled image
                labels = torch.where(labels < 0, logits.argmax(-1), labels)  # importance at the teacher's own class
            if self.needs_teacher_grad:
                # Per-sample, sum-reduced: a sample's gradient does not depend on the batch size (Eq. 3).
                loss = F.cross_entropy(logits.float(), labels, reduction="sum")
                grads = torch.autograd.grad(loss, list(activations.values()), allow_unused=True)
        temperature = self.current_temperature()
        log_now = self._is_logging_step()
        diagnostics = {} if log_now else None
        targets = {}
        with torch.no_grad():
            for (name, f), g in zip(activations.items(), grads):
                if self.needs_teacher_grad:
                    g = torch.zeros_like(f) if g is None else g
                    g = per_sample(g.float(), self.rows_per_sample[name])[:clone_rows]
                f = per_sample(f.detach().float(), self.rows_per_sample[name])[:clone_rows]
                mean, std = self.stats.mean[name], self.stats.std[name]
                w, parts = importance_weights(
                    f,
                    g,
                    mean,
                    std,
                    mode=args.importance,
                    temperature=temperature,
                    impact_temperature=args.impact_temperature,
                    impact_scale=args.impact_scale,
                    cutoff=args.importance_cutoff,
                    top_fraction=args.importance_top_fraction,
                )
                targets[name] = (f[:1], w[:1]) if one_sample else (f, w)
                if diagnostics is not None:
                    diagnostics[name] = {f"support_{k}": effective_support(v).mean().item() for k, v in parts.items()}
                    diagnostics[name]["sum_w"] = w.sum(dim=1).mean().item()
        if diagnostics is not None:
            self._diagnostics = diagnostics
        if self.args.logit_distillation > 0 or self._distils_unlabeled():  # only the distillation terms read them
            self._teacher_logits = (logits[:1] if one_sample else logits).detach().float()
        return targets

    def layer_clone_loss(self, teacher: torch.Tensor, student: torch.Tensor, std: torch.Tensor, weights: torch.Tensor):
        """One layer's term of the clone loss, per sample (B,): Eq. 1 at every position, or on each channel's mean
        over its positions (`clone_positions="mean"`)."""
        if self.clone_positions == "mean":
            return pooled_clone_loss(teacher, student, std, weights, self.num_prefix_tokens)
        return layer_clone_loss(teacher, student, std, weights)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """L = CE(student(x), y) + λ · mean over the batch of Σ_layers Σ_i w_i ((f*_i − f^c_i)/σ_i)²."""
        pixel_values, labels = self._model_input(inputs["pixel_values"], train=model.training), inputs["labels"]
        if not model.training:  # evaluation: the student's cross-entropy only
            logits = forward_logits(model, pixel_values)
            loss = F.cross_entropy(logits.float(), labels)
            return (loss, {"logits": logits}) if return_outputs else loss

        if self.args.mix_inputs != "none":
            pixel_values, labels = mix_batch(
                pixel_values, labels, self.num_classes, self.args.mix_inputs, self.args.mix_alpha
            )
        labelled = labels.shape[0]
        if self.unlabeled_images is not None:  # clone-loss-only rows, labelled -1 (the teacher's class for Eq. 3)
            unlabeled = self._unlabeled_batch().to(pixel_values.dtype)
            pixel_values = torch.cat([pixel_values, unlabeled])
            labels = torch.cat([labels, labels.new_full((unlabeled.shape[0],), -1)])
        # With unlabeled_loss="logits" the unlabeled rows (after the labelled ones) are left out of the clone loss;
        # without unlabeled images `labelled` is the whole batch.
        clone_rows = labelled if self.args.unlabeled_loss == "logits" else None
        targets = self._teacher_targets(pixel_values, labels, clone_rows)
        if self.args.student_input_noise > 0:  # the student learns the clean targets from a perturbed image
            pixel_values = pixel_values + self.args.student_input_noise * torch.randn_like(pixel_values)
        if self.args.student_input_blend > 0:  # the same, with another clean image faintly laid over it
            pixel_values = overlay_batch(pixel_values, self.args.student_input_blend)
        self.student_recorder.set_enabled(True)
        try:
            logits = forward_logits(model, pixel_values)
            student_activations = self.student_recorder.by_sample(self.student_recorder.pop())
        finally:
            self.student_recorder.set_enabled(False)
        ce = self._label_loss(logits[:labelled].float(), labels[:labelled])
        clone = logits.new_zeros(labels[:clone_rows].shape[0], dtype=torch.float32)
        for name, (teacher_f, w) in targets.items():
            student_f = student_activations[name][:clone_rows].float()
            clone = clone + self.layer_clone_loss(teacher_f, student_f, self.stats.std[name], w)
        clone = clone.mean()
        loss = ce + self.current_clone_loss_weight() * clone
        if self._distils_unlabeled():
            teacher = self._teacher_logits[labelled:]
            loss = loss + soft_target_loss(logits[labelled:].float(), teacher, self.args.distillation_temperature)
        if not torch.isfinite(loss):
            self._stop_on_non_finite(ce, clone)
        if self.args.logging_strategy != "no":
            self._running["ce"].append(ce.detach())
            self._running["clone"].append(clone.detach())
        return (loss, {"logits": logits[:labelled]}) if return_outputs else loss

    def _distils_unlabeled(self) -> bool:
        return self.unlabeled_images is not None and self.args.unlabeled_loss in ("logits", "both")

    def _label_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on the labels, mixed with distillation of the teacher's softened outputs when asked."""
        alpha = self.args.logit_distillation
        teacher = self._teacher_logits[: logits.shape[0]] if alpha > 0 else None
        return distillation_loss(logits, teacher, labels, alpha, self.args.distillation_temperature)

    def _stop_on_non_finite(self, ce: torch.Tensor, clone: torch.Tensor) -> None:
        last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been saved yet"
        raise FloatingPointError(
            f"MEDIC loss is not finite at step {self.state.global_step} (cross-entropy {ce.item()}, clone loss "
            f"{clone.item()}); training stopped and {kept}. Lower learning_rate or clone_loss_weight, or raise "
            "sigma_floor, then resume with resume_from_checkpoint."
        )

    def _is_logging_step(self) -> bool:
        steps = self.args.logging_steps
        if self.args.logging_strategy != "steps" or not steps or steps < 1:
            return False
        return (self.state.global_step + 1) % int(steps) == 0 or self.state.global_step == 0

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the mean cross-entropy and clone loss since the last log, and importance diagnostics."""
        if "loss" in logs and self._running["ce"]:
            ce = self.accelerator.reduce(torch.stack(self._running["ce"]).mean(), reduction="mean")
            clone = self.accelerator.reduce(torch.stack(self._running["clone"]).mean(), reduction="mean")
            logs["ce_loss"] = round(ce.item(), 4)
            logs["clone_loss"] = round(clone.item(), 4)
            self._running = {"ce": [], "clone": []}
            if self._diagnostics:
                logs.update(_summarise(self._diagnostics))
                self._write_diagnostics(self._diagnostics)
                self._diagnostics = None
        super().log(logs, start_time)

    def _write_diagnostics(self, diagnostics: dict[str, dict[str, float]]) -> None:
        if not self.args.importance_log_file or not self.is_world_process_zero():
            return
        os.makedirs(self.args.output_dir, exist_ok=True)
        line = {"step": self.state.global_step, "layers": diagnostics}
        with open(os.path.join(self.args.output_dir, self.args.importance_log_file), "a") as f:
            f.write(json.dumps(line) + "\n")

    # ------------------------------------------------------------------ training

    def create_optimizer(self, model=None):
        """The optimiser, with the early parameters of `early_lr_scale` in a group of their own at that fraction of
        the learning rate (the scheduler then scales each group from its own starting value)."""
        if self.optimizer is not None or not self._slow_params:  # built (and split) already, or nothing to split
            return super().create_optimizer(model)
        optimizer = super().create_optimizer(model)
        groups = []
        for group in optimizer.param_groups:
            fast = [p for p in group["params"] if id(p) not in self._slow_params]
            slow = [p for p in group["params"] if id(p) in self._slow_params]
            groups += [{**group, "params": fast}] if fast else []
            groups += [{**group, "params": slow, "lr": group["lr"] * self.args.early_lr_scale}] if slow else []
        optimizer.param_groups.clear()  # a new optimiser: no state yet
        for group in groups:
            optimizer.add_param_group(group)
        return optimizer

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """Estimates (or, on resume, reloads) the neuron statistics, then trains the student.

        A checkpoint is resumed only when it was made with the same teacher, clean data and settings (see
        `fingerprint()`); anything else raises before training, naming a new output_dir or overwrite_output_dir.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No checkpoint found in {self.args.output_dir} to resume from.")
        self._check_training_steps()
        self._load_or_compute_state(resume_from_checkpoint)
        restore_dropout = disable_dropout(self.accelerator.unwrap_model(self.model))
        try:
            output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            restore_dropout()
        if self.weight_average is not None:  # the average is the sanitized model: evaluated, saved and pushed
            self.weight_average.copy_to(self.accelerator.unwrap_model(self.model))
        if self.eval_dataset is not None:
            # Reuse an evaluation the Trainer just ran at the final step, else evaluate now.
            final = {}
            for log in self.state.log_history:
                if log.get("step") == self.state.global_step:
                    final.update(_strip_prefix(log))
            expected = self.eval_dataset.keys() if isinstance(self.eval_dataset, dict) else ["eval"]
            if {metric_name(name) for name in expected} <= set(final):
                self.metrics_after = final
            else:
                self.metrics_after = _strip_prefix(self.evaluate())
        self._check_accuracy_drop()
        return output

    def _check_training_steps(self) -> None:
        """Refuse a run that would not train: a "sanitized" model that is the untrained student is worse than none."""
        args = self.args
        if args.max_steps is not None and args.max_steps > 0:
            return
        if args.num_train_epochs <= 0:
            raise ValueError(f"num_train_epochs={args.num_train_epochs}: no training step would run. Set it above 0.")
        if not has_length(self.train_dataset):
            return
        rows, batch = len(self.train_dataset), args.per_device_train_batch_size * max(1, args.world_size)
        batches = rows // batch if args.dataloader_drop_last else math.ceil(rows / batch)
        if batches == 0:  # the Trainer would do 0 steps, exit cleanly and save the untrained student
            raise ValueError(
                f"No training step would run: {rows} clean rows in batches of {batch} "
                f"(per_device_train_batch_size x processes) with dataloader_drop_last={args.dataloader_drop_last}. "
                "Lower per_device_train_batch_size, set dataloader_drop_last to false, or use more clean data."
            )

    def _check_accuracy_drop(self) -> None:
        """A sanitized model far less accurate than its teacher is flagged: log, results and card say so."""
        before, after = self.metrics_before, self.metrics_after
        key = next((k for k in ("clean_accuracy", "accuracy") if k in before and k in after), None)
        if key is None or self.args.max_accuracy_drop is None:
            return
        drop = 100 * (before[key] - after[key])
        if drop > self.args.max_accuracy_drop:
            message = (
                f"The sanitized model's clean accuracy is {drop:.2f} points below the teacher's "
                f"({100 * after[key]:.2f}% against {100 * before[key]:.2f}%), more than max_accuracy_drop="
                f"{self.args.max_accuracy_drop:g}: it may not have trained long enough (steps done: "
                f"{self.state.global_step}) or on enough clean data. Do not use it as a replacement as it is."
            )
            self.warnings.append(message)
            logger.warning(message)

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must share with this run to be resumed: the teacher's weights, the clean data and the
        settings that change the result (hashes, plus the settings themselves to name what differs)."""
        if getattr(self, "_fingerprint", None) is None:
            settings = {name: _jsonable(getattr(self.args, name, None)) for name in FINGERPRINT_SETTINGS}
            settings["student_base"] = self.student_base[0] if self.student_base else None
            self._fingerprint = {
                "teacher": _hash_state_dict(self.accelerator.unwrap_model(self.teacher)),
                "data": _hash_dataset(self._raw_train_dataset),
                "unlabeled": None if self._raw_unlabeled is None else _hash_dataset(self._raw_unlabeled),
                "settings": settings,
            }
        return self._fingerprint

    def _check_fingerprint(self, checkpoint: str) -> None:
        state_file = os.path.join(checkpoint, STATE_FILE)
        saved = json.loads(Path(state_file).read_text()).get("fingerprint") if os.path.isfile(state_file) else None
        fix = (
            f"Choose a new output_dir, or pass --overwrite_output_dir true (MedicConfig(overwrite_output_dir=True)) "
            f"to start afresh in {self.args.output_dir}."
        )
        if saved is None:
            raise ValueError(f"{checkpoint} records no MEDIC run fingerprint, so it cannot be resumed safely. {fix}")
        current = self.fingerprint()
        differs = [part for part in ("teacher", "data", "unlabeled") if saved.get(part) != current[part]]
        saved_settings = saved.get("settings", {})
        settings = {  # a setting an older version did not record (e.g. sgd_momentum) is not held against it
            k: (saved_settings.get(k), v)
            for k, v in current["settings"].items()
            if k in saved_settings and saved_settings[k] != v
        }
        if differs or settings:
            what = [f"the {part}" for part in differs]
            what += [f"{k} ({old!r} there, {new!r} now)" for k, (old, new) in list(settings.items())[:5]]
            raise ValueError(f"{checkpoint} belongs to another run: {', '.join(what)} differ. {fix}")

    def _load_or_compute_state(self, checkpoint: str | None) -> None:
        if checkpoint:
            self._check_fingerprint(checkpoint)
        stats_file = os.path.join(checkpoint, STATS_FILE) if checkpoint else None
        if stats_file and os.path.isfile(stats_file):
            self.stats.load_state_dict(load_file(stats_file))
            state = json.loads(Path(checkpoint, STATE_FILE).read_text())
            self.metrics_before = state.get("metrics_before", {})
            self.resumed_from = Path(checkpoint).name
            if self.weight_average is not None:
                self.weight_average.load_state_dict(load_file(os.path.join(checkpoint, AVERAGE_FILE)))
            logger.warning(
                f"Resuming from {checkpoint} (same teacher, clean data and settings): its statistics and 'before' "
                "metrics are reused."
            )
        else:
            self.stats = self.compute_statistics()
            if self.eval_dataset is not None and not self.metrics_before:
                self.metrics_before = self.evaluate_teacher()
        self.stats.to(self.args.device)

    def evaluate(self, *args, **kwargs):
        """The student's metrics; those of its weight average when `ema_decay` > 0."""
        if self.weight_average is None:
            return super().evaluate(*args, **kwargs)
        with self.weight_average.applied(self.accelerator.unwrap_model(self.model)):
            return super().evaluate(*args, **kwargs)

    @torch.no_grad()
    def evaluate_teacher(self) -> dict[str, float]:
        """Accuracy of the teacher on each eval set, reported as `<name>_accuracy` (the 'before' metrics)."""
        datasets = self.eval_dataset if isinstance(self.eval_dataset, dict) else {"eval": self.eval_dataset}
        self.teacher_recorder.set_enabled(False)
        metrics = {}
        try:
            for name, dataset in datasets.items():
                correct, total = torch.zeros((), device=self.args.device), torch.zeros((), device=self.args.device)
                for batch in self.get_eval_dataloader(dataset):
                    logits = forward_logits(self.teacher, self._model_input(batch["pixel_values"], train=False))
                    preds, labels = self.accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"]))
                    correct += (preds == labels).sum()
                    total += labels.numel()
                metrics[metric_name(name)] = round((correct / total).item(), 6)
        finally:
            self.teacher_recorder.set_enabled(True)
        return metrics

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        save_file(self.stats.state_dict(), os.path.join(folder, STATS_FILE))
        state = {"metrics_before": self.metrics_before, "fingerprint": self.fingerprint()}
        Path(folder, STATE_FILE).write_text(json.dumps(state, indent=2))
        if self.weight_average is not None:
            save_file(self.weight_average.state_dict(), os.path.join(folder, AVERAGE_FILE))

    # ------------------------------------------------------------------ saving and the Hub

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Writes the student in its native format with its preprocessing (ClassifierTrainer), and a model card."""
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            self.create_model_card(output_dir=output_dir or self.args.output_dir)

    def create_model_card(self, output_dir: str | None = None, **kwargs) -> None:
        """README.md built with huggingface_hub.ModelCard: method, teacher, data, what ran, metrics, warnings."""
        if not self.is_world_process_zero():
            return
        output_dir = output_dir or self.args.output_dir
        student = self.accelerator.unwrap_model(self.model)
        family = model_family(student)
        card = build_model_card(
            base_model=self.teacher_name,
            base_model_id=self.base_model_id,
            family=family,
            dataset=self.dataset_name,
            clean_samples=len(self.train_dataset) if has_length(self.train_dataset) else None,
            hyperparameters=self.hyperparameters(),
            metrics_before=self.metrics_before or None,
            metrics_after=self.metrics_after or None,
            eval_sizes=self.eval_sizes(),
            library_name={"timm": "timm", "transformers": "transformers"}.get(family, "pytorch"),
            repo_id=self.args.hub_model_id,
            license=self.args.hub_license,
            warnings=self.warnings,
            student_base=self.student_base[0] if self.student_base else None,
            student_base_id=self.student_base[1] if self.student_base else None,
            frozen_modules=self.frozen_modules,
        )
        card.save(os.path.join(output_dir, "README.md"))

    def eval_sizes(self) -> dict[str, int]:
        """Metric name -> number of images it was measured on."""
        sets = self.eval_dataset if isinstance(self.eval_dataset, dict) else {"eval": self.eval_dataset}
        return {metric_name(name): len(ds) for name, ds in sets.items() if ds is not None and has_length(ds)}

    def hyperparameters(self) -> dict[str, Any]:
        """The settings and what actually ran (steps and epochs done), for the card and results.json."""
        a = self.args
        if a.max_steps and a.max_steps > 0:
            planned = f"{a.max_steps} step{'s' if a.max_steps != 1 else ''}"
        else:
            planned = f"{a.num_train_epochs:g} epoch{'s' if a.num_train_epochs != 1 else ''}"
        return {
            "clone_loss_weight (λ)": a.clone_loss_weight,
            "temperature (τ)": a.temperature,
            "impact_temperature": a.effective_impact_temperature,
            "importance": a.importance,
            "impact_scale": a.impact_scale,
            "importance_cutoff": a.importance_cutoff,
            "importance_top_fraction": a.importance_top_fraction,
            "final_temperature": a.final_temperature,
            "clone_loss_schedule": a.clone_loss_schedule,
            "ema_decay": a.ema_decay,
            "student_input_noise": a.student_input_noise,
            "student_input_blend": a.student_input_blend,
            "logit_distillation": a.logit_distillation,
            "distillation_temperature": a.distillation_temperature,
            "unlabeled images": len(self.unlabeled_images) if self.unlabeled_images is not None else 0,
            "unlabeled_batch_size": (a.unlabeled_batch_size or a.per_device_train_batch_size)
            if self.unlabeled_images is not None
            else None,
            "unlabeled_loss": a.unlabeled_loss if self.unlabeled_images is not None else None,
            "mix_inputs": a.mix_inputs if a.mix_inputs == "none" else f"{a.mix_inputs} (α = {a.mix_alpha:g})",
            "hook_layers": ",".join(a.hook_layers),
            "clone_logits": a.clone_logits,
            "frozen_modules": len(self.frozen_modules),
            "attention_modules_not_cloned": len(self.attention_left_out),
            "freeze_modules": a.freeze_modules,
            "early_lr_scale": a.early_lr_scale,
            "cloned_modules": len(self.teacher_recorder.modules),
            "left_out_modules": len(self.left_out_modules),
            "stats_granularity": a.stats_granularity,
            "clone_positions": self.clone_positions,
            "augment (crop + flip)": a.augment,
            "sigma_floor": a.sigma_floor,
            "optimizer": self.optimizer_description(),
            "learning_rate": a.learning_rate,
            "weight_decay": a.weight_decay,
            "lr_scheduler_type": str(getattr(a.lr_scheduler_type, "value", a.lr_scheduler_type)),
            "warmup_steps": a.warmup_steps,
            "budget": planned,
            "training steps done": self.state.global_step,
            "epochs done": round(float(self.state.epoch or 0.0), 2),
            "batch_size": a.per_device_train_batch_size * max(1, a.world_size),
            "seed": a.seed,
        }

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """The repository is created when the model is pushed, so a run can start without network access."""

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Checkpoints stay local: only the final sanitized model is pushed, by `push_to_hub()`."""

    def push_to_hub(
        self,
        commit_message: str | None = "Upload MEDIC-sanitized model",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        **kwargs,
    ) -> str | None:
        """Saves the student and its card to `output_dir`, then uploads that folder to `hub_model_id`.

        A failed upload raises and leaves the local folder intact.
        """
        self.save_model(self.args.output_dir)
        if not self.is_world_process_zero():
            return None
        repo_id = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        return push_folder_to_hub(
            self.args.output_dir,
            repo_id,
            token=token or self.args.hub_token,
            private=self.args.hub_private_repo,
            commit_message=commit_message or "Upload MEDIC-sanitized model",
            revision=revision,
        )

    def remove_hooks(self) -> None:
        """Takes every MEDIC hook off both models (they are also removed when the cloner is garbage-collected)."""
        self.neurons.remove()

    def __del__(self):
        if hasattr(self, "neurons"):  # not when __init__ failed before any hook was registered
            self.neurons.remove()


class _UpdateAverage(TrainerCallback):
    """Updates the cloner's weight average after every optimizer step."""

    def __init__(self, cloner: MedicCloner):
        self.cloner = cloner

    def on_step_end(self, args, state, control, **kwargs):
        self.cloner.weight_average.update(self.cloner.accelerator.unwrap_model(self.cloner.model))


def _check_unlabeled(dataset, args: MedicConfig) -> None:
    """Refuse unlabeled data the cloner cannot use, before anything is loaded."""
    if dataset is None:
        return
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"unlabeled_dataset must be a datasets.Dataset with an image column, got {type(dataset).__name__}: "
            "load it with medic_hf.data.load_image_dataset or datasets.Dataset.from_dict({'image': [...]})."
        )
    if len(dataset) == 0:
        raise ValueError("unlabeled_dataset is empty: check the split or the filter that made it.")
    if args.mix_inputs != "none":
        raise ValueError(
            f"mix_inputs={args.mix_inputs!r} and unlabeled_dataset cannot be combined (mixed labels have no "
            "unlabeled rows): set mix_inputs='none' or leave out the unlabeled data."
        )


def _summarise(diagnostics: dict[str, dict[str, float]]) -> dict[str, float]:
    """Layer means of the per-layer diagnostics, for the progress bar and trackers."""
    keys = sorted({k for layer in diagnostics.values() for k in layer})
    return {
        f"importance/{k}": round(float(np.mean([layer[k] for layer in diagnostics.values() if k in layer])), 5)
        for k in keys
    }


def _strip_prefix(metrics: dict[str, float]) -> dict[str, float]:
    """{"eval_clean_accuracy": a, "eval_backdoor_accuracy": b} -> {"clean_accuracy": a, "attack_success_rate": b}."""
    out = {}
    for key, value in metrics.items():
        if key.startswith("eval_") and key.endswith("accuracy"):
            out[metric_name(key.removeprefix("eval_").removesuffix("accuracy").rstrip("_") or "eval")] = value
    return out


def _jsonable(value: Any) -> Any:
    value = getattr(value, "value", value)  # enums such as lr_scheduler_type
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def _hash_state_dict(model: nn.Module) -> str:
    """sha256 of every tensor of the state dict, in key order, with names, shapes and dtypes."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _hash_dataset(dataset) -> str:
    """sha256 of the clean set's size, its labels and three of its rows as stored (raw, before any transform).

    A torch data set is described by its size and, when it has them, its `targets`: its items may be augmented at
    random and cannot be hashed."""
    digest = hashlib.sha256(f"{type(dataset).__name__}:{len(dataset) if has_length(dataset) else None};".encode())
    if isinstance(dataset, datasets.Dataset) and len(dataset):
        raw = dataset.with_format("arrow")
        label_column = next((c for c in ("labels", "label") if c in dataset.column_names), None)
        if label_column is not None:
            digest.update(str(raw[label_column].to_pylist()).encode())
        rows = sorted({0, len(dataset) // 2, len(dataset) - 1})
        digest.update(str(raw.select(rows)[:].to_pylist()).encode())
    else:
        targets = getattr(dataset, "targets", None)
        if targets is not None:
            digest.update(str([int(t) for t in targets]).encode())
    return digest.hexdigest()


def _teacher_identity(model: nn.Module | str, given_name: str | None) -> tuple[str, str | None]:
    """(name shown on the card, Hub id for the card's `base_model` or None).

    Only a model named by a Hub id (`org/name` or `hf-hub:org/name`, not a local folder) gets a `base_model`: an
    `nn.Module` carries no proof of where its weights came from (timm's `pretrained_cfg` names the default
    pretrained tag even for a randomly initialised model), and a local path is no Hub id. Local paths are shown by
    their folder name only.
    """
    name = given_name if given_name is not None else (model if isinstance(model, str) else None)
    if name is None:
        return _architecture_name(model), None
    hub_id = _hub_repo_id(name)
    return (name, hub_id) if hub_id is not None else (public_name(name), None)


def _architecture_name(model: nn.Module) -> str:
    """e.g. 'resnet18 (timm)', 'ViTForImageClassification (transformers)', 'WideResNet (PyTorch)'."""
    family = model_family(model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture") if family == "timm" else type(model).__name__
    return f"{name or type(model).__name__} ({ {'torch': 'PyTorch'}.get(family, family) })"
