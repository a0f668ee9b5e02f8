"""Mixed clean inputs for the clone step: MixUp (Zhang et al., ICLR 2018) and CutMix (Yun et al., ICCV 2019).

Both models see the same mixed batch: the teacher's activations on it are the clone targets and the labels are mixed
in the same proportion (class probabilities), as in "function matching" distillation (Beyer et al., CVPR 2022).

`overlay_batch` is the other way round: only the student sees each image with another one faintly laid over it,
while the targets stay the teacher's on the clean image, so the student learns to ignore faint whole-image overlays.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def mix_batch(pixel_values: Tensor, labels: Tensor, num_classes: int, mode: str, alpha: float = 1.0):
    """Pairs every image with a random other one of the batch. Returns (mixed images, label probabilities (B, C))."""
    if mode not in ("mixup", "cutmix"):
        raise ValueError(f"mode={mode!r}: choose 'mixup' or 'cutmix'.")
    targets = F.one_hot(labels, num_classes).float() if labels.ndim == 1 else labels.float()
    if pixel_values.shape[0] < 2:
        return pixel_values, targets
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    order = torch.randperm(pixel_values.shape[0], device=pixel_values.device)
    other = pixel_values[order]
    if mode == "mixup":
        mixed = lam * pixel_values + (1.0 - lam) * other
    else:
        mixed, lam = paste_box(pixel_values, other, lam)
    return mixed, lam * targets + (1.0 - lam) * targets[order]


def paste_box(images: Tensor, other: Tensor, lam: float) -> tuple[Tensor, float]:
    """CutMix: a random box covering about 1 − lam of the image comes from `other`; returns the kept share too."""
    height, width = images.shape[-2:]
    cut = math.sqrt(1.0 - lam)
    box_h, box_w = int(height * cut), int(width * cut)
    cy, cx = int(torch.randint(height, (1,))), int(torch.randint(width, (1,)))
    top, bottom = max(cy - box_h // 2, 0), min(cy + box_h // 2, height)
    left, right = max(cx - box_w // 2, 0), min(cx + box_w // 2, width)
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = other[..., top:bottom, left:right]
    kept = 1.0 - (bottom - top) * (right - left) / (height * width)
    return mixed, kept


def overlay_batch(pixel_values: Tensor, max_weight: float) -> Tensor:
    """Each image blended with another image of the batch, x' = (1 − a)·x + a·x_other, a ~ U(0, max_weight) per image.

    Blending commutes with the per-channel normalisation (the weights sum to 1), so normalised inputs are blended
    as the pixels would be. A batch of one image is returned unchanged.
    """
    if max_weight < 0 or max_weight >= 1:
        raise ValueError(f"max_weight={max_weight}: choose a blend weight in [0, 1).")
    batch = pixel_values.shape[0]
    if batch < 2 or max_weight == 0:
        return pixel_values
    # a shift of the batch by a random non-zero offset: every image gets a different one, never itself
    other = pixel_values.roll(int(torch.randint(1, batch, (1,))), dims=0)
    shape = (batch, *([1] * (pixel_values.ndim - 1)))  # one weight per image
    weight = max_weight * torch.rand(shape, device=pixel_values.device, dtype=pixel_values.dtype)
    return (1.0 - weight) * pixel_values + weight * other
