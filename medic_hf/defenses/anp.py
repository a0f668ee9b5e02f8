"""Adversarial Neuron Pruning (ANP; Wu & Wang, NeurIPS 2021).

Backdoor neurons are sensitive: a small perturbation of them makes the model misbehave on clean data. ANP gives
every neuron of every normalisation layer a mask ``m`` in [0, 1] (init 1) and multiplicative noise on its affine
parameters (``gamma * (m + delta)``, ``beta * (1 + xi)``), and optimises the masks on the clean set with

    alpha * CE(clean, m) + (1 - alpha) * CE(clean, m, perturbed)

where the perturbation is drawn uniformly in [-eps, eps] and moved by ``anp_steps`` signed-gradient ascent steps of
size ``eps / anp_steps`` (ANP's ``optimize_mask_cifar.py``; no projection back to [-eps, eps], as there). Neurons
whose mask ends at or below a fixed threshold are pruned: their ``gamma`` is set to 0 (ANP's ``pruning``), so the
neuron outputs its bias only. The threshold is a config value; nothing here looks at backdoored data.

"Neurons" are the entries of the ``weight`` of every BatchNorm / LayerNorm / GroupNorm (and timm / transformers
norm layers, e.g. timm ``BatchNormAct2d``, ``LayerNorm2d``) that has an affine weight. The masks and noise are
applied with ``torch.func.functional_call``, which swaps the ``weight`` / ``bias`` a layer reads, so any norm layer
that reads its own parameters works without replacing modules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm

from ..data import collate_batch
from ..modeling import dropout_disabled
from ..neurons import layer_kind
from ._training import (
    DefenseConfig,
    copy_model,
    finish,
    functional_logits,
    prepare_clean_data,
    resolve_device,
    seed_everything,
)

logger = logging.getLogger(__name__)


@dataclass
class ANPConfig(DefenseConfig):
    """ANP. Defaults: BackdoorBench (config/defense/anp/config.yaml), which keeps those of the ANP code
    (csdongxian/ANP_backdoor optimize_mask_cifar.py) except the batch size (ANP: 128).

    ANP optimises neuron masks, not the model: it keeps its own loop, as its reference does, with the shared
    vocabulary — `max_steps` mask iterations of SGD at `learning_rate` with `sgd_momentum`, batches of
    `per_device_train_batch_size` drawn with replacement; the epochs, weight decay and schedule fields are unused."""

    max_steps: int = field(default=2000, metadata={"help": "Mask optimisation steps (`nb_iter`, 2000)."})
    learning_rate: float = field(default=0.2, metadata={"help": "SGD learning rate of the masks (`lr`, 0.2)."})
    sgd_momentum: float = field(default=0.9, metadata={"help": "SGD momentum of the masks (ANP code: 0.9)."})
    anp_eps: float = field(default=0.4, metadata={"help": "Perturbation budget eps (0.4); 0 disables the noise."})
    anp_steps: int = field(default=1, metadata={"help": "Signed-gradient steps of the perturbation (1)."})
    anp_alpha: float = field(
        default=0.2, metadata={"help": "Weight of the clean loss; 1 - anp_alpha weighs the perturbed loss (0.2)."}
    )
    pruning_threshold: float = field(
        default=0.2,
        metadata={
            "help": "Prune neurons whose mask is <= this value (ANP paper's threshold 0.2, fixed in advance; the ANP "
            "and BackdoorBench scripts sweep thresholds and BackdoorBench keeps the one with the lowest test ASR, "
            "which a defender cannot do)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_steps < 0 or self.anp_steps < 1 or self.anp_eps < 0 or not 0 <= self.anp_alpha <= 1:
            raise ValueError("max_steps >= 0, anp_steps >= 1, anp_eps >= 0 and anp_alpha in [0, 1] are required.")


def norm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Normalisation layers with an affine ``weight`` parameter, by qualified name."""
    return {
        name: module
        for name, module in model.named_modules()
        if name and layer_kind(module) == "norm" and isinstance(getattr(module, "weight", None), nn.Parameter)
    }


class NeuronPerturbation:
    """The ANP variables of one model: a mask per norm-layer neuron and the noise on its weight and bias."""

    def __init__(self, layers: dict[str, nn.Module]):
        self.layers = layers
        self.masks = {n: torch.ones_like(m.weight, requires_grad=True) for n, m in layers.items()}
        self.noise_w = {n: torch.zeros_like(m.weight) for n, m in layers.items()}
        self.noise_b = {n: torch.zeros_like(m.bias) for n, m in layers.items() if m.bias is not None}

    def reset_noise(self, eps: float) -> None:
        for noise in (*self.noise_w.values(), *self.noise_b.values()):
            noise.uniform_(-eps, eps)

    def noise(self) -> list[torch.Tensor]:
        return [*self.noise_w.values(), *self.noise_b.values()]

    def params(self, perturbed: bool) -> dict[str, torch.Tensor]:
        """The norm layers' weight and bias under the masks (and the noise when ``perturbed``), as in ANP's
        ``NoisyBatchNorm2d``: ``weight * (mask + noise_w)``, ``bias * (1 + noise_b)``."""
        params = {}
        for name, module in self.layers.items():
            coeff = self.masks[name] + self.noise_w[name] if perturbed else self.masks[name]
            params[f"{name}.weight"] = module.weight * coeff
            if perturbed and name in self.noise_b:
                params[f"{name}.bias"] = module.bias * (1 + self.noise_b[name])
        return params


def optimize_masks(model: nn.Module, loader, config: ANPConfig, device: torch.device) -> dict[str, torch.Tensor]:
    """ANP's mask optimisation (``mask_train``) on ``model`` (its weights frozen); returns the final masks."""
    layers = norm_layers(model)
    model.requires_grad_(False)
    state = NeuronPerturbation(layers)
    mask_optimizer = torch.optim.SGD(state.masks.values(), lr=config.learning_rate, momentum=config.sgd_momentum)
    step_size = config.anp_eps / config.anp_steps
    model.train()  # as ANP's mask_train: BatchNorm normalises with batch statistics
    with dropout_disabled(model), tqdm(total=len(loader), desc="ANP masks", disable=config.disable_tqdm) as bar:
        for batch in loader:
            pixel_values, labels = batch["pixel_values"].to(device), batch["labels"].to(device)
            if config.anp_eps > 0:
                # Step 1: the adversarial neuron perturbation, random start then signed gradient ascent.
                with torch.no_grad():
                    state.reset_noise(config.anp_eps)
                for _ in range(config.anp_steps):
                    noise = state.noise()
                    for n in noise:
                        n.requires_grad_(True)
                    loss = F.cross_entropy(functional_logits(model, state.params(True), pixel_values).float(), labels)
                    grads = torch.autograd.grad(loss, noise, allow_unused=True)
                    with torch.no_grad():
                        for n, g in zip(noise, grads):
                            if g is not None:
                                n.add_(step_size * g.sign())
                            n.requires_grad_(False)
            # Step 2: update the masks on the clean and the perturbed loss.
            loss_nat = F.cross_entropy(functional_logits(model, state.params(False), pixel_values).float(), labels)
            loss = config.anp_alpha * loss_nat
            if config.anp_eps > 0:
                loss_rob = F.cross_entropy(functional_logits(model, state.params(True), pixel_values).float(), labels)
                loss = loss + (1 - config.anp_alpha) * loss_rob
            mask_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            mask_optimizer.step()
            with torch.no_grad():
                for mask in state.masks.values():
                    mask.clamp_(0.0, 1.0)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return {name: mask.detach() for name, mask in state.masks.items()}


@torch.no_grad()
def prune_by_threshold(model: nn.Module, masks: dict[str, torch.Tensor | list], threshold: float) -> dict[str, list]:
    """Set the norm weight (gamma) of every neuron whose mask is ``<= threshold`` to 0, in place; returns the flat
    indices pruned per layer. ``masks`` maps layer names to mask values (tensors, or lists as in ``defense_report``).
    """
    pruned = {}
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        index = torch.nonzero(torch.as_tensor(mask).flatten() <= threshold).flatten()
        weight.view(-1)[index.to(weight.device)] = 0
        if index.numel():
            pruned[name] = index.tolist()
    return pruned


def anp(model: nn.Module, clean_data, config: ANPConfig | None = None) -> nn.Module:
    """Adversarial Neuron Pruning: optimise neuron masks under adversarial neuron perturbation, prune by threshold.

    ``defense_report``: ``pruned`` (layer -> neuron indices), ``num_pruned``, ``num_neurons``, ``threshold`` and
    ``masks`` (layer -> final mask values, a flat list), so that :func:`prune_by_threshold` can re-prune a copy of the
    input model at another threshold without optimising again.
    """
    config = ANPConfig() if config is None else config
    if not norm_layers(model):
        raise ValueError(
            f"ANP perturbs and prunes neurons of normalisation layers (BatchNorm, LayerNorm, GroupNorm with affine "
            f"weights), but {type(model).__name__} has none. Use fine_prune, fine_tune or medic instead."
        )
    seed_everything(config.seed)
    device = resolve_device(config)
    work = copy_model(model).to(device)
    dataset = prepare_clean_data(work, clean_data, config, train=True)
    sampler = RandomSampler(
        dataset,
        replacement=True,
        num_samples=config.max_steps * config.per_device_train_batch_size,
        generator=torch.Generator().manual_seed(config.seed),
    )
    loader = DataLoader(
        dataset,
        batch_size=config.per_device_train_batch_size,
        sampler=sampler,
        collate_fn=collate_batch,
        num_workers=config.dataloader_num_workers,
    )
    masks = optimize_masks(work, loader, config, device)
    del work

    repaired = copy_model(model)
    pruned = prune_by_threshold(repaired, masks, config.pruning_threshold)
    num_pruned = sum(len(v) for v in pruned.values())
    num_neurons = sum(m.numel() for m in masks.values())
    logger.info("ANP: pruned %d of %d neurons (mask <= %s).", num_pruned, num_neurons, config.pruning_threshold)
    report = {
        "defense": "anp",
        "threshold": config.pruning_threshold,
        "num_pruned": num_pruned,
        "num_neurons": num_neurons,
        "pruned": pruned,
        "masks": {name: mask.flatten().tolist() for name, mask in masks.items()},
    }
    return finish(repaired, model, report)
