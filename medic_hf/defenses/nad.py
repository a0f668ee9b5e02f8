"""Neural Attention Distillation (NAD; Li et al., ICLR 2021).

A copy of the trojaned model is fine-tuned on the clean set for a few epochs and becomes the teacher; the trojaned
model is then trained on the clean set with cross-entropy plus ``beta_i`` times an attention-transfer loss between
its feature maps and the teacher's at a few layers (Zagoruyko & Komodakis, ICLR 2017): the attention map of a
``(B, C, H, W)`` feature map ``a`` is ``mean_c |a_c|^p`` flattened over ``H x W`` and L2-normalised, and the loss is
the mean squared difference of the two maps.

Layers: by default the outputs of the last three stages — for timm models the modules named by ``feature_info``,
otherwise the last three children holding an ``nn.Conv2d`` (descending into wrappers such as
``model.resnet.encoder.stages``) — or the modules named in ``NADConfig.layers``. Their outputs must be 4-D feature
maps, and by default nothing after them may process tokens: a model without convolutional stages (an MLP, a
ViT, whose only convolution is its patch embedding) gets a clear error.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling import forward_logits
from ..training import ClassifierTrainer
from ._training import (
    DefenseConfig,
    copy_model,
    finish,
    fit,
    require_conv2d,
    run_folder,
    seed_everything,
    train_classifier,
    trainer_batches,
)

logger = logging.getLogger(__name__)


@dataclass
class NADConfig(DefenseConfig):
    """NAD. Defaults: BackdoorBench (config/defense/nad/cifar10.yaml and defense/nad.py) unless stated."""

    num_train_epochs: float = field(
        default=10.0,
        metadata={
            "help": "Epochs of attention distillation. BackdoorBench runs it for `te_epochs` (10); the NAD code "
            "(bboylyg/NAD config.py) uses 20."
        },
    )
    teacher_epochs: int = field(
        default=10, metadata={"help": "Epochs of fine-tuning that make the teacher (BackdoorBench `te_epochs`)."}
    )
    learning_rate: float = field(
        default=0.01, metadata={"help": "Learning rate of teacher and student (BackdoorBench 0.01)."}
    )
    weight_decay: float = field(
        default=1e-4, metadata={"help": "SGD weight decay (BackdoorBench nad yaml, NAD 1e-4)."}
    )
    lr_scheduler_type: str = field(
        default="constant",
        metadata={
            "help": "BackdoorBench's NAD resets the lr to 0.01 every epoch below 20 (adjust_learning_rate), so it is "
            "constant over its 10 epochs."
        },
    )
    betas: tuple[float, ...] = field(
        default=(500.0, 1000.0, 1000.0),
        metadata={
            "help": "Weight of the attention loss at each layer, earliest first (BackdoorBench beta1..beta3 = 500, "
            "1000, 1000; the NAD code's defaults are 0, 0, 5000). With fewer layers the last ones are used."
        },
    )
    power: float = field(default=2.0, metadata={"help": "p of the attention map mean_c |a_c|^p (NAD p = 2)."})
    layers: list[str] | None = field(
        default=None,
        metadata={"help": "Qualified names of the modules whose outputs are distilled; None: the last 3 stages."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.betas = tuple(float(b) for b in self.betas)
        if not self.betas or self.teacher_epochs < 0:
            raise ValueError("betas must not be empty and teacher_epochs must be >= 0.")


def attention_map(feature_map: torch.Tensor, p: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """``mean_c |a_c|^p`` of a ``(B, C, H, W)`` map, flattened to ``(B, H*W)`` and L2-normalised per sample."""
    if feature_map.dim() != 4:
        raise ValueError(f"attention maps need (B, C, H, W) feature maps, got shape {tuple(feature_map.shape)}.")
    am = feature_map.float().abs().pow(p).mean(dim=1).flatten(1)
    return am / (am.norm(dim=1, keepdim=True) + eps)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """NAD's AT loss: mean squared difference of the two attention maps."""
    return F.mse_loss(attention_map(student, p), attention_map(teacher, p))


def _conv_children(prefix: str, module: nn.Module) -> list[str]:
    return [
        f"{prefix}.{name}" if prefix else name
        for name, child in module.named_children()
        if any(isinstance(m, nn.Conv2d) for m in child.modules())
    ]


def default_layers(model: nn.Module, count: int = 3) -> list[str]:
    """Names of the last ``count`` stages: timm's ``feature_info`` modules, else the conv-holding children."""
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and all(isinstance(i, dict) and "module" in i for i in info):
        names = [i["module"] for i in info]
        try:
            for name in names:
                model.get_submodule(name)
        except AttributeError:
            pass
        else:
            return names[-count:]
    stages = _conv_children("", model)
    while 0 < len(stages) < count:
        inner = _conv_children(stages[-1], model.get_submodule(stages[-1]))
        if not inner:
            break
        stages = stages[:-1] + inner
    return stages[-count:]


class FeatureCapture:
    """Forward hook that keeps a module's output in ``store[name]`` and lets the model continue on a copy, so an
    in-place operation later in the model cannot change the kept values."""

    def __init__(self, name: str, store: dict):
        self.name = name
        self.store = store

    def __call__(self, module: nn.Module, inputs: tuple, output):
        self.store[self.name] = output
        return output.clone() if isinstance(output, torch.Tensor) else None


def _hook(model: nn.Module, layers: list[str], store: dict) -> list:
    return [model.get_submodule(name).register_forward_hook(FeatureCapture(name, store)) for name in layers]


@torch.no_grad()
def _probe_layers(model: nn.Module, layers: list[str], pixel_values: torch.Tensor) -> tuple[list[str], str | None]:
    """One forward on a real batch: the ``layers`` whose output is a 4-D feature map, and the first module (if any)
    that finishes after the last of them with a 3-D ``(batch, tokens, features)`` output — a sign that the model
    goes on as a transformer, so these maps are not its last stages."""
    store: dict = {}
    finished: list[tuple[str, int]] = []
    handles = _hook(model, layers, store)
    handles += [
        module.register_forward_hook(
            lambda m, i, out, name=name: finished.append((name, out.dim() if isinstance(out, torch.Tensor) else 0))
        )
        for name, module in model.named_modules()
        if name
    ]
    try:
        forward_logits(model.eval(), pixel_values)
    finally:
        for handle in handles:
            handle.remove()
    maps = [n for n in layers if isinstance(store.get(n), torch.Tensor) and store[n].dim() == 4]
    names = [name for name, _ in finished]
    last = max((names.index(n) for n in maps), default=len(names))
    tokens = next((name for name, dim in finished[last + 1 :] if dim == 3), None)
    return maps, tokens


class NADTrainer(ClassifierTrainer):
    """:class:`ClassifierTrainer` whose loss adds ``beta`` x the attention-transfer loss between the model's feature
    maps and a fine-tuned ``teacher``'s at ``layers`` (:meth:`distil_from` hooks both)."""

    def distil_from(self, teacher: nn.Module, layers: list[str], betas: tuple[float, ...], power: float) -> None:
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.layers, self.betas, self.power = layers, betas, power
        self.student_maps: dict = {}
        self.teacher_maps: dict = {}
        student = self.accelerator.unwrap_model(self.model)
        self.handles = _hook(student, layers, self.student_maps) + _hook(self.teacher, layers, self.teacher_maps)

    def remove_hooks(self) -> None:
        for handle in getattr(self, "handles", []):
            handle.remove()
        self.handles = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pixel_values, labels = self._model_input(inputs["pixel_values"], train=model.training), inputs["labels"]
        with torch.no_grad():
            forward_logits(self.teacher, pixel_values)
        logits = forward_logits(model, pixel_values)
        loss = F.cross_entropy(logits.float(), labels)
        for name, beta in zip(self.layers, self.betas):
            loss = loss + beta * attention_loss(self.student_maps[name], self.teacher_maps[name].detach(), self.power)
        return (loss, {"logits": logits}) if return_outputs else loss


def nad(model: nn.Module, clean_data, config: NADConfig | None = None) -> nn.Module:
    """Neural Attention Distillation: fine-tune a teacher copy, then distil its attention maps into the model.

    ``defense_report``: ``layers``, ``betas``, ``teacher_losses`` and ``losses`` (the logged training losses).
    """
    config = NADConfig() if config is None else config
    require_conv2d(model, "NAD distils attention maps of convolutional feature maps", "fine_tune or medic")
    seed_everything(config.seed)
    student = copy_model(model).requires_grad_(True)
    requested = list(config.layers) if config.layers is not None else default_layers(student)
    for name in requested:
        student.get_submodule(name)  # raises AttributeError naming a mistyped layer
    with run_folder(config) as run_config:
        trainer = NADTrainer(student, run_config, train_dataset=clean_data)
        # Before any training: the layers must give 4-D maps, and (by default) be the model's last stages.
        pixel_values, _ = next(trainer_batches(trainer, train=False))
        layers, tokens = _probe_layers(trainer.model, requested, pixel_values[:2])
        if not layers or (config.layers is not None and len(layers) < len(requested)):
            raise ValueError(
                f"NAD needs (B, C, H, W) feature maps, but the outputs of {requested} in {type(model).__name__} are "
                "not (all) 4-D. Pass NADConfig(layers=[...]) naming convolutional stages."
            )
        if config.layers is None and tokens is not None:
            raise ValueError(
                f"NAD distils the attention maps of a CNN's last stages, but {type(model).__name__} processes tokens "
                f"after its convolutional feature maps {layers} ({tokens} outputs a 3-D tensor): it is a "
                "transformer. Use another defense, or name 4-D layers yourself with NADConfig(layers=[...])."
            )
        if len(layers) > len(config.betas):
            raise ValueError(f"{len(layers)} layers but only {len(config.betas)} betas: give one beta per layer.")
        betas = config.betas[-len(layers) :]

        teacher = copy_model(model)
        teacher_losses = train_classifier(
            teacher, clean_data, dataclasses.replace(config, num_train_epochs=config.teacher_epochs)
        )
        trainer.distil_from(teacher, layers, betas, config.power)
        try:
            losses = fit(trainer)
        finally:
            trainer.remove_hooks()
    logger.info("NAD: distilled attention at %s with betas %s.", layers, betas)
    report = {"defense": "nad", "layers": layers, "betas": list(betas), "teacher_losses": teacher_losses}
    return finish(student, model, {**report, "losses": losses})
