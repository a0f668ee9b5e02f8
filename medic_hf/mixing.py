"""Mixed clean inputs for the clone step: MixUp (Zhang et al., ICLR 2018) and CutMix (Yun et al., ICCV 2019).

Both models see the same mixed batch: the teacher's activations on it are the clone targets and the labels are mixed
in the same proportion (class probabilities), as in "function matching" distillation (Beyer et al., CVPR 2022).
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
