"""Neuron statistics, importance weights (paper Eqs. 2-4) and the clone loss (Eq. 1).

Every function here works on one layer's output `f` of shape (B, ...); a sample's neurons are its flattened
output elements. Weights are computed per sample and per layer, so they do not depend on the rest of the batch.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor


def reduce_dims(ndim: int, channel_dim: int, granularity: str) -> list[int]:
    """Dimensions averaged over for μ/σ: the batch only ('neuron'), or every dimension but the channels."""
    if granularity == "neuron":
        return [0]
    return [d for d in range(ndim) if d != channel_dim % ndim]


class NeuronStats:
    """Streaming mean and standard deviation of every neuron of every cloned layer (one pass, float64 sums).

    `update()` on each batch, `finalize()` once: it sums the counts across processes, so every rank ends with the
    statistics of the whole clean set. μ and σ are stored in a shape that broadcasts against the layer's output.
    """

    def __init__(self, channel_dims: dict[str, int], granularity: str = "channel", sigma_floor: float = 1e-2):
        self.channel_dims = channel_dims
        self.granularity = granularity
        self.sigma_floor = sigma_floor
        self.sums: dict[str, Tensor] = {}
        self.sumsq: dict[str, Tensor] = {}
        self.counts: dict[str, Tensor] = {}
        self.mean: dict[str, Tensor] = {}
        self.std: dict[str, Tensor] = {}

    @torch.no_grad()
    def update(self, activations: dict[str, Tensor]) -> None:
        for name, f in activations.items():
            f = f.detach().double()
            dims = reduce_dims(f.ndim, self.channel_dims[name], self.granularity)
            count = torch.tensor(math.prod(f.shape[d] for d in dims), dtype=torch.float64, device=f.device)
            s, sq = f.sum(dim=dims, keepdim=True), (f * f).sum(dim=dims, keepdim=True)
            if name in self.sums:
                self.sums[name] += s
                self.sumsq[name] += sq
                self.counts[name] += count
            else:
                self.sums[name], self.sumsq[name], self.counts[name] = s, sq, count

    @torch.no_grad()
    def finalize(self) -> None:
        if not self.sums:
            raise ValueError("No activations were recorded: the clean data set is empty.")
        for name in self.sums:
            s, sq, n = self.sums[name], self.sumsq[name], self.counts[name]
            if dist.is_available() and dist.is_initialized():
                for t in (s, sq, n):
                    dist.all_reduce(t, op=dist.ReduceOp.SUM)
            mean = s / n
            std = (sq / n - mean * mean).clamp_min(0).sqrt()
            layer_scale = std.mean()
            if layer_scale < 1e-8:
                # The whole layer is constant on the clean set (e.g. timm's zero-initialised last BN of a block in
                # an untrained model): there is no scale to normalise by, so compare it in raw units.
                std = torch.ones_like(std)
            else:
                # Floor relative to the layer's scale: a neuron constant on the clean set must not blow up the loss.
                std = torch.maximum(std, self.sigma_floor * layer_scale)
            self.mean[name] = mean.float()
            self.std[name] = std.float()
        self.sums, self.sumsq, self.counts = {}, {}, {}

    def state_dict(self) -> dict[str, Tensor]:
        state = {f"mean.{k}": v.contiguous() for k, v in self.mean.items()}
        state.update({f"std.{k}": v.contiguous() for k, v in self.std.items()})
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.mean = {k[len("mean.") :]: v for k, v in state.items() if k.startswith("mean.")}
        self.std = {k[len("std.") :]: v for k, v in state.items() if k.startswith("std.")}
        missing = set(self.channel_dims) - set(self.mean)
        if missing:
            raise ValueError(f"Saved statistics lack layers {sorted(missing)[:5]}: they were made for another model.")

    def to(self, device) -> NeuronStats:
        self.mean = {k: v.to(device) for k, v in self.mean.items()}
        self.std = {k: v.to(device) for k, v in self.std.items()}
        return self


def activation_weights(f: Tensor, mean: Tensor, std: Tensor, temperature: float) -> Tensor:
    """Eq. 2: softmax over the layer's neurons of τ·|f − μ| / σ. Returns (B, N)."""
    z = ((f - mean).abs() / std).flatten(1)
    return torch.softmax(temperature * z, dim=1)


def impact_values(grad: Tensor, std: Tensor, scale: str = "sigma") -> Tensor:
    """|σ·∂ℓ/∂f| (Eq. 3's proxy gradient), optionally divided by its RMS per sample. Returns (B, N)."""
    g = (grad * std).abs().flatten(1)
    if scale == "rms":
        g = g / g.pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(1e-12)
    return g


def impact_weights(grad: Tensor, std: Tensor, temperature: float, scale: str = "sigma") -> Tensor:
    """Eq. 3: softmax over the layer's neurons of τ·|σ·∂ℓ/∂f|. Returns (B, N)."""
    return torch.softmax(temperature * impact_values(grad, std, scale), dim=1)


def importance_weights(
    f: Tensor,
    grad: Tensor | None,
    mean: Tensor,
    std: Tensor,
    *,
    mode: str = "both",
    temperature: float = 5.0,
    impact_temperature: float | None = None,
    impact_scale: str = "sigma",
    cutoff: float = 0.0,
    top_fraction: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. 4, w = sqrt(w_act · w_imp), or one criterion alone, or uniform. Returns w (B, N) and the parts.

    With `cutoff` > 0, weights below cutoff / N are set to 0: a neuron less important than that on a sample is not
    cloned at all for it, instead of being cloned with a small weight. With `top_fraction`, the ceil(top_fraction·N)
    neurons of highest weight get 1/k each and the others 0 (hard selection).
    """
    n = f[0].numel()
    tau_imp = temperature if impact_temperature is None else impact_temperature
    parts = {}
    if mode in ("both", "activation"):
        parts["activation"] = activation_weights(f, mean, std, temperature)
    if mode in ("both", "impact"):
        if grad is not None:
            parts["impact"] = impact_weights(grad, std, tau_imp, impact_scale)
        elif tau_imp == 0:  # softmax(0 · g) is uniform whatever g is: no gradient needed
            parts["impact"] = f.new_full((f.shape[0], n), 1.0 / n)
        else:
            raise ValueError("the impact criterion needs the gradient of the teacher's loss")
    if mode == "both":
        w = (parts["activation"] * parts["impact"]).sqrt()
    elif mode == "none":
        w = f.new_full((f.shape[0], n), 1.0 / n)
    else:
        w = parts[mode]
    if cutoff > 0:
        w = torch.where(w >= cutoff / n, w, torch.zeros_like(w))
    if top_fraction is not None:
        w = top_k_uniform(w, math.ceil(top_fraction * n))
    return w, parts


def top_k_uniform(w: Tensor, k: int) -> Tensor:
    """Weight 1/k on each row's k largest entries, 0 elsewhere. Returns a tensor shaped like w (B, N)."""
    selected = torch.zeros_like(w).scatter_(1, w.topk(k, dim=1).indices, 1.0 / k)
    return selected


def layer_clone_loss(teacher: Tensor, student: Tensor, std: Tensor, weights: Tensor) -> Tensor:
    """Eq. 1 for one layer: Σ_i w_i ((f*_i − f^c_i)/σ_i)², per sample. Returns (B,)."""
    d = ((teacher - student) / std).pow(2).flatten(1)
    return (weights * d).sum(dim=1)


def pooled_clone_loss(
    teacher: Tensor, student: Tensor, std: Tensor, weights: Tensor, num_prefix_tokens: int = 0
) -> Tensor:
    """Eq. 1 on each channel's mean over its positions, per sample: Σ_c W_c ((mean f*_c − mean f^c_c) / σ_c)², W_c
    the channel's weights summed over its positions (the same total weight as Eq. 1). The positions are the
    dimensions where σ is shared (`stats_granularity="channel"`); a layer with one value per channel, (B, C), keeps
    Eq. 1, and so do the first `num_prefix_tokens` tokens of a (B, N, C) token sequence (a class token, which the
    classifier reads on its own). Returns (B,)."""
    dims = [d for d in range(1, teacher.ndim) if std.shape[d] == 1]
    if not dims:
        return layer_clone_loss(teacher, student, std, weights)
    weights = weights.reshape(teacher.shape)
    kept = teacher.new_zeros(teacher.shape[0])
    if num_prefix_tokens and dims == [1] and teacher.ndim == 3:
        prefix = slice(0, num_prefix_tokens)
        kept = layer_clone_loss(teacher[:, prefix], student[:, prefix], std, weights[:, prefix].flatten(1))
        tokens = slice(num_prefix_tokens, None)
        teacher, student, weights = teacher[:, tokens], student[:, tokens], weights[:, tokens]
    d = ((teacher.mean(dim=dims) - student.mean(dim=dims)) / std.mean(dim=dims)).pow(2)
    return kept + (weights.sum(dim=dims) * d).flatten(1).sum(dim=1)


def effective_support(w: Tensor) -> Tensor:
    """exp(entropy of w) / N per sample, with w renormalised: 1 for uniform weights, 1/N for one-hot."""
    p = w / w.sum(dim=1, keepdim=True).clamp_min(1e-30)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(dim=1)
    return entropy.exp() / w.shape[1]
