"""Which modules' outputs are cloned, and the forward hooks that capture them.

Each element of a hooked module's output is one neuron (paper footnote 3): a C×H×W map is C·H·W neurons, a T×C
token map T·C. Modules are found by type, so timm's and transformers' own norm layers are included.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

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
) -> dict[str, nn.Module]:
    """Qualified name -> module for every module whose output is cloned.

    A timm norm+act layer (BatchNormAct2d, ...) is reported under its own name but is captured at its `drop`
    child, i.e. after normalisation and before the activation: the paper clones normalisation outputs.
    """
    kinds = set(kinds)
    found = {}
    for name, module in model.named_modules():
        if not name or layer_kind(module) not in kinds:
            continue
        if target_modules is not None and not _matches(name, target_modules):
            continue
        if exclude_modules is not None and _matches(name, exclude_modules):
            continue
        found[name] = module
    return found


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


class NeuronRecorder:
    """Registers one OutputCapture per cloned module; `remove()` takes every hook off again."""

    def __init__(self, modules: dict[str, nn.Module], *, require_grad: bool = False):
        self.store: dict[str, torch.Tensor] = {}
        self.captures = {name: OutputCapture(name, self.store) for name in modules}
        self.modules = modules
        self.last_shapes: dict[str, torch.Size] = {}
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
        """The captured outputs of the last forward, in module order; the store is emptied."""
        captured = {name: self.store[name] for name in self.modules if name in self.store}
        self.store.clear()
        return captured

    @torch.no_grad()
    def probe(self, forward) -> list[str]:
        """Run `forward()` once; mark outputs that the model overwrites in place; return modules that never fired.

        The names of the modules whose output *is* `forward`'s return value (e.g. the classifier producing the
        logits) are kept in `result_modules`.
        """
        self.store.clear()
        result = forward()
        silent = [name for name in self.modules if name not in self.store]
        self.last_shapes = {name: output.shape for name, output in self.store.items()}
        self.result_modules = [
            name
            for name, output in self.store.items()
            if isinstance(result, torch.Tensor) and output.shape == result.shape and torch.equal(output, result)
        ]
        for name, output in self.store.items():
            capture = self.captures[name]
            capture.clone_output = output._version != capture.version_at_capture
        self.store.clear()
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

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.store.clear()
