"""Which modules' outputs are cloned, and the forward hooks that capture them.

Each element of a hooked module's output is one neuron (paper footnote 3): a C×H×W map is C·H·W neurons, a T×C
token map T·C. Modules are found by type, so timm's and transformers' own norm layers are included. A module whose
output holds several rows per sample (windowed attention: batch × windows; LeViT's BatchNorm on flattened tokens:
batch × tokens) has all of a sample's rows as that sample's neurons; a module whose output has no batch dimension
(a table computed from parameters only) is no sample's neuron and is left out. `NeuronRecorder.probe` finds which.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

# Norm layers that do not subclass a torch norm are recognised by class name: timm's RmsNorm, EvoNorm*,
# FrozenBatchNorm2d, SimpleNorm; transformers' ConvNextLayerNorm, *RMSNorm, ...
_NORM_NAME = re.compile(r"(Norm\d?d?|NormAct\d?d?|NormFp32|Norm2dFp32|RMSNorm|RmsNorm)$|^EvoNorm", re.IGNORECASE)
_TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    _TORCH_NORMS = _TORCH_NORMS + (nn.RMSNorm,)


def layer_kind(module: nn.Module) -> str | None:
    """'conv', 'norm', 'linear' or None for a module that is not cloned."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.LocalResponseNorm):  # no parameters: nothing to clone there
        return None
    if isinstance(module, _TORCH_NORMS):
        return "norm"
    has_own_tensors = any(True for _ in module.parameters(recurse=False)) or any(
        True for _ in module.buffers(recurse=False)
    )
    if has_own_tensors and _NORM_NAME.search(type(module).__name__):
        return "norm"
    return None


def channel_dim(module: nn.Module) -> int:
    """The dimension of the module's output that holds its channels (features)."""
    if isinstance(module, nn.modules.conv._ConvNd | nn.modules.batchnorm._NormBase | nn.GroupNorm):
        return 1
    if isinstance(module, nn.Linear):
        return -1
    data_format = getattr(module, "data_format", None)  # transformers ConvNextLayerNorm
    if data_format is not None:
        return 1 if data_format == "channels_first" else -1
    # timm LayerNorm2d / RmsNorm2d / EvoNorm2d* / FrozenBatchNorm2d normalise an NCHW map over C.
    return 1 if "2d" in type(module).__name__.lower() else -1


def _matches(name: str, patterns: list[str] | str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_clone_modules(
    model: nn.Module,
    kinds: Iterable[str] = ("conv", "norm", "linear"),
    target_modules: list[str] | str | None = None,
    exclude_modules: list[str] | str | None = None,
    skip: Iterable[str] = (),
) -> dict[str, nn.Module]:
    """Qualified name -> module for every module whose output is cloned.

    A timm norm+act layer (BatchNormAct2d, ...) is reported under its own name but is captured at its `drop`
    child, i.e. after normalisation and before the activation: the paper clones normalisation outputs.
    """
    kinds, skip = set(kinds), set(skip)
    found = {}
    for name, module in model.named_modules():
        if not name or name in skip or layer_kind(module) not in kinds:
            continue
        if target_modules is not None and not _matches(name, target_modules):
            continue
        if exclude_modules is not None and _matches(name, exclude_modules):
            continue
        found[name] = module
    return found


def attention_modules(model: nn.Module) -> list[str]:
    """Names of the modules inside attention layers, in model order: every descendant of a module whose class name
    contains "Attention" (timm's Attention and WindowAttention, transformers' ViTAttention, SwinAttention, ...), so
    their query / key / value and output projections. A model without such layers (a ResNet, a ConvNeXt) has none."""
    names: dict[str, None] = {}
    for name, module in model.named_modules():
        if "attention" in type(module).__name__.lower():
            names.update({f"{name}.{child}" if name else child: None for child, _ in module.named_modules() if child})
    return list(names)


# Parameters holding the tokens a ViT-like model puts before its patch tokens: timm's and transformers' names.
PREFIX_TOKEN_PARAMETERS = ("cls_token", "dist_token", "reg_token", "distillation_token", "register_tokens")


def prefix_tokens(model: nn.Module) -> int:
    """How many tokens (class, distillation, register) the model puts before its patch tokens, counted from its
    parameters of those names (`PREFIX_TOKEN_PARAMETERS`, each (1, n, C)); 0 for a CNN or a Swin. A model that adds
    its class token late (CaiT) counts it for every block."""
    return sum(
        p.shape[1] for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in PREFIX_TOKEN_PARAMETERS
    )


def freeze_modules(model: nn.Module, patterns: list[str] | str) -> list[str]:
    """Stops training the parameters of every module whose name matches `patterns` (suffixes or one regex, as
    `target_modules`); returns the frozen parameters' names. A pattern that matches nothing is an error: a typo would
    otherwise silently train the whole model."""
    matched = [name for name, _ in model.named_modules() if name and _matches(name, patterns)]
    if not matched:
        examples = ", ".join(name for name, _ in list(model.named_modules())[1:6])
        raise ValueError(
            f"freeze_modules={patterns!r} matches no module of the student; give module-name suffixes or one regex "
            f"matching whole names, e.g. {examples}."
        )
    frozen = []
    for name, param in model.named_parameters():
        if any(name == m or name.startswith(m + ".") for m in matched):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def early_modules(
    model: nn.Module, fraction: float, kinds: Iterable[str] = ("conv", "norm", "linear")
) -> tuple[list[str], list[str]]:
    """The first `fraction` of the model's conv / norm / linear modules, in the order the model registers them (its
    depth from the input, for timm, transformers and torchvision classifiers), and the names of every parameter
    registered before the first module after them (theirs, and a ViT's class token and position embeddings)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"frozen_fraction={fraction}: use a value in [0, 1) (0 trains every parameter).")
    modules = list(find_clone_modules(model, kinds))
    count = int(fraction * len(modules))
    if count == 0:
        return [], []
    trained = tuple(name + "." for name in modules[count:])
    names = [name for name, _ in model.named_parameters()]
    cut = next((i for i, name in enumerate(names) if name.startswith(trained)), None)
    if cut is None:  # e.g. only parameter-free norms after the cut: the whole model would be frozen
        raise ValueError(f"frozen_fraction={fraction} leaves no module with parameters to train: use a smaller one.")
    return modules[:count], names[:cut]


def freeze_early_modules(
    model: nn.Module, fraction: float, kinds: Iterable[str] = ("conv", "norm", "linear")
) -> list[str]:
    """Stops training the `early_modules` of the model and the parameters before them; returns the frozen modules'
    names. Their outputs can no longer change, so they are not worth cloning."""
    modules, names = early_modules(model, fraction, kinds)
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(False)
    return modules


def capture_point(module: nn.Module) -> nn.Module:
    """The module whose forward output is the neuron values of `module` (see find_clone_modules)."""
    drop, act = getattr(module, "drop", None), getattr(module, "act", None)
    if layer_kind(module) == "norm" and isinstance(drop, nn.Module) and isinstance(act, nn.Module):
        return drop
    return module


class OutputCapture:
    """Forward hook storing a module's output tensor in `store[name]` while `enabled`.

    `clone_output` is set for modules whose output is later overwritten in place by the model itself (an in-place
    ReLU, `x += shortcut`): the hook then hands the model a copy, so the captured values (and their autograd
    history) stay those of the module.
    """

    def __init__(self, name: str, store: dict[str, torch.Tensor]):
        self.name = name
        self.store = store
        self.enabled = True
        self.clone_output = False
        self.require_grad = False
        self.version_at_capture = None

    def __call__(self, module, inputs, output):
        if not self.enabled:
            return None
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"module {self.name!r} returned {type(output).__name__}, not a tensor; exclude it.")
        if self.require_grad and torch.is_grad_enabled() and not output.requires_grad:
            # Frozen teacher: make the first captured output a graph leaf so later activations are tracked and
            # autograd.grad can reach every captured layer, without gradients for the teacher's parameters.
            output.requires_grad_(True)
        self.store[self.name] = output
        self.version_at_capture = output._version
        return output.clone() if self.clone_output else None


def per_sample(f: torch.Tensor, rows: int) -> torch.Tensor:
    """(B·k, ...) -> (B, k, ...): a sample's neurons are its k contiguous rows (windows, patches, tokens)."""
    return f if rows == 1 else f.reshape(f.shape[0] // rows, rows, *f.shape[1:])


def per_sample_channel_dim(dim: int, rows: int) -> int:
    """The channel dimension of `per_sample(f, rows)`, given that of `f`."""
    return dim + 1 if rows > 1 and dim >= 0 else dim


def probe_batches(pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches for the layout check: [x0, x1] and [x0, x2, x1], x2 an image unlike both.

    A module's output relates to the batch as MEDIC expects when, between the two, its leading dimension grows from
    2k to 3k rows and sample x0's rows (first) and x1's rows (second, then third) are unchanged.
    """
    x0 = pixel_values[:1]
    x1 = pixel_values[1:2] if len(pixel_values) > 1 else x0.flip(-1)
    x2 = 0.5 * (x0.flip(-2) + x1.flip(-1))
    return torch.cat([x0, x1]), torch.cat([x0, x2, x1])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-6) if a.numel() else 1.0
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4 * scale)


def batch_layout(out_2: torch.Tensor, out_3: torch.Tensor) -> tuple[str, int]:
    """How a module's output relates to the batch, from its outputs on the two `probe_batches`.

    Returns ('per_sample', k) when dim 0 holds k contiguous rows per sample (k = 1: the usual batch dimension),
    ('batch_free', 0) when the output does not grow with the batch (a table computed from parameters, a (1, ...)
    positional term), or ('unsupported', 0).
    """
    if out_2.shape == out_3.shape:
        return "batch_free", 0
    if out_2.ndim == 0 or out_2.shape[1:] != out_3.shape[1:] or out_2.shape[0] % 2:
        return "unsupported", 0
    k = out_2.shape[0] // 2
    if out_3.shape[0] != 3 * k:
        return "unsupported", 0
    # Rows grouped by sample, in batch order: x0 first in both batches, x1 second then third.
    if k > 1 and not (_same(out_2[:k], out_3[:k]) and _same(out_2[k:], out_3[2 * k :])):
        return "unsupported", 0
    return "per_sample", k


class NeuronRecorder:
    """Registers one OutputCapture per cloned module; `remove()` takes every hook off again."""

    def __init__(self, modules: dict[str, nn.Module], *, require_grad: bool = False):
        self.store: dict[str, torch.Tensor] = {}
        self.captures = {name: OutputCapture(name, self.store) for name in modules}
        self.modules = modules
        self.last_shapes: dict[str, torch.Size] = {}
        self.rows_per_sample: dict[str, int] = {}
        self.batch_free: list[str] = []
        self.unsupported: dict[str, str] = {}
        self.result_modules: list[str] = []
        self.handles = []
        for name, module in modules.items():
            self.captures[name].require_grad = require_grad
            self.handles.append(capture_point(module).register_forward_hook(self.captures[name]))

    def set_enabled(self, enabled: bool) -> None:
        for capture in self.captures.values():
            capture.enabled = enabled
        if not enabled:
            self.store.clear()

    def pop(self) -> dict[str, torch.Tensor]:
        """The captured outputs of the last forward, in module order, as the modules gave them; store emptied."""
        captured = {name: self.store[name] for name in self.modules if name in self.store}
        self.store.clear()
        return captured

    def by_sample(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each output as (B, ...) with a sample's neurons in its row: (B·k, ...) outputs become (B, k, ...)."""
        return {name: per_sample(f, self.rows_per_sample.get(name, 1)) for name, f in outputs.items()}

    @torch.no_grad()
    def probe(self, forward: Callable[[torch.Tensor], Any], pixel_values: torch.Tensor) -> list[str]:
        """Run `forward` on the two `probe_batches` of `pixel_values`; return the modules that never fired.

        Finds, per module: how its output relates to the batch (`rows_per_sample`, `batch_free`, `unsupported`,
        see `batch_layout`), its shape on two samples (`last_shapes`), whether the model overwrites it in place
        (then the hook hands the model a copy), and whether it *is* `forward`'s result, e.g. the classifier
        producing the logits (`result_modules`).
        """
        batch_2, batch_3 = probe_batches(pixel_values)
        self.store.clear()
        result = forward(batch_2)
        outputs_2 = dict(self.store)
        for name, output in outputs_2.items():
            capture = self.captures[name]
            capture.clone_output = output._version != capture.version_at_capture
        outputs_2 = {name: output.clone() for name, output in outputs_2.items()}
        self.store.clear()
        forward(batch_3)
        outputs_3 = dict(self.store)
        self.store.clear()

        silent = [name for name in self.modules if name not in outputs_2 or name not in outputs_3]
        self.last_shapes = {name: output.shape for name, output in outputs_2.items()}
        same_shape = {
            name: output
            for name, output in outputs_2.items()
            if isinstance(result, torch.Tensor) and output.shape == result.shape
        }
        # The logits' module, also when they are its output flattened (a 1x1-conv classifier: timm DLA, DPN).
        self.result_modules = [
            name
            for name, output in outputs_2.items()
            if isinstance(result, torch.Tensor)
            and output.numel() == result.numel()
            and output.shape[:1] == result.shape[:1]
            and torch.equal(output.reshape(result.shape), result)
        ]
        if not self.result_modules:
            # Logits averaged over several heads (timm / transformers LeViT with distillation): each head's Linear.
            self.result_modules = [name for name in same_shape if isinstance(self.modules[name], nn.Linear)]
        self.rows_per_sample, self.batch_free, self.unsupported = {}, [], {}
        for name in self.modules:
            if name in silent:
                continue
            layout, rows = batch_layout(outputs_2[name], outputs_3[name])
            if layout == "per_sample":
                self.rows_per_sample[name] = rows
            elif layout == "batch_free":
                self.batch_free.append(name)
            else:
                self.unsupported[name] = (
                    f"{tuple(outputs_2[name].shape)} on 2 samples, {tuple(outputs_3[name].shape)} on 3"
                )
        return silent

    def drop(self, names: Iterable[str]) -> None:
        """Stop capturing these modules (e.g. modules whose forward is never called)."""
        names = set(names)
        keep = [i for i, name in enumerate(self.captures) if name not in names]
        for i, handle in enumerate(self.handles):
            if i not in keep:
                handle.remove()
        self.handles = [self.handles[i] for i in keep]
        self.captures = {name: c for name, c in self.captures.items() if name not in names}
        self.modules = {name: m for name, m in self.modules.items() if name not in names}
        self.rows_per_sample = {name: k for name, k in self.rows_per_sample.items() if name not in names}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.store.clear()
