"""Label-consistent backdoor (Turner, Tsipras & Madry, 2019), "Clean Label" in the MEDIC paper.

Target-class training images are first made hard to classify with an L-inf PGD attack against a surrogate model
(pushing them away from their true class), then stamped with a small corner trigger; labels are unchanged, so the
network can only fit these hard images by relying on the trigger.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .base import (
    Attack,
    check_columns,
    num_classes_of,
    rewrite_rows,
    row_rng,
    scaled_size,
    stamp_corner_patch,
    to_float_array,
    to_image,
)

# Turner et al.'s 3x3 trigger masks (poison_attack.py of MadryLab/label-consistent-backdoor-code): +1 -> pixel set to
# the maximum, -1 -> set to 0. Note the bottom-right one is not a perfect checkerboard (its top-left cell is -1).
TURNER_MASKS: dict[str, np.ndarray] = {
    "top_left": np.array([[1, -1, -1], [-1, 1, -1], [1, -1, 1]], dtype=np.float64),
    "top_right": np.array([[-1, -1, 1], [-1, 1, -1], [1, -1, 1]], dtype=np.float64),
    "bottom_left": np.array([[1, -1, -1], [-1, 1, -1], [1, -1, 1]], dtype=np.float64),
    "bottom_right": np.array([[-1, -1, 1], [-1, 1, -1], [1, -1, 1]], dtype=np.float64),
}

# A differentiable map from a float batch in [0, 1], (N, 3, H, W), to what the surrogate expects.
InputTransform = Callable[[torch.Tensor], torch.Tensor]


def _logits(output) -> torch.Tensor:
    """Logits from a plain module, a transformers ``ImageClassifierOutput`` or a tuple."""
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


@dataclass
class LabelConsistent(Attack):
    """Label-consistent (clean-label) attack with adversarial perturbations and a corner trigger.

    ``poison_dataset(ds, surrogate=model, ...)`` runs L-inf PGD (maximising the cross-entropy of the true label,
    ``steps`` steps of ``step_size * sign(grad)``, projected to the ``epsilon`` ball and to [0, 1]) on the chosen
    target-class images in batches, rounds the result to uint8, then stamps the trigger. The surrogate sees
    ``transform(x)`` where ``x`` is the batch in [0, 1]; by default ``transform`` normalises with ``mean``/``std``
    (identity when they are None). Rows are picked as for every clean-label attack: ``poison_rate`` of the whole set,
    among target-class rows, capped at the target-class count.

    :meth:`apply` only stamps the trigger (no PGD); it is what the backdoor test view uses, as in Turner et al.

    Attributes:
        epsilon: L-inf radius in [0, 1] units (16/255: BackdoorBench's ``*_16_train.npy`` files, Turner's inf_16).
        step_size: PGD step (1.5/255, BackdoorBench ``craft_adv_dataset.py``).
        steps: PGD steps (100, BackdoorBench ``craft_adv_dataset.py``).
        random_start: start from a uniform point of the ball (False, as BackdoorBench's PGD); seeded per row.
        corners: ``"bottom_right"`` (Turner's ``config.json`` default) or ``"all"`` (``"all-corners"``, the
            BackdoorBench default) for the four-corner variant.
        amplitude: trigger amplitude in [0, 1]; 1 sets pixels to 255/0, smaller values add +-amplitude*255
            (Turner's "reduced amplitude").
        patch_size: trigger side on a 32x32 image; block-scaled like BadNets on larger images.
        mean, std: per-channel normalisation of the surrogate (e.g. ImageNet's), used when no ``transform`` is given.
        batch_size: images per PGD batch.
    """

    name: ClassVar[str] = "label_consistent"
    clean_label: ClassVar[bool] = True

    epsilon: float = 16 / 255
    step_size: float = 1.5 / 255
    steps: int = 100
    random_start: bool = False
    corners: str = "bottom_right"
    amplitude: float = 1.0
    patch_size: int = 3
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    batch_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.corners not in ("bottom_right", "all"):
            raise ValueError(f"corners must be 'bottom_right' or 'all', got {self.corners!r}")
        if not 0.0 <= self.amplitude <= 1.0:
            raise ValueError(f"amplitude must be in [0, 1], got {self.amplitude}")
        if self.epsilon < 0 or self.step_size < 0 or self.steps < 0:
            raise ValueError("epsilon, step_size and steps must be >= 0")
        # JSON turns tuples into lists; store tuples so that a loaded attack compares equal.
        self.mean = None if self.mean is None else tuple(float(v) for v in self.mean)
        self.std = None if self.std is None else tuple(float(v) for v in self.std)
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")

    # ----------------------------------------------------------------------------------------------------- triggers
    def apply(self, image: Image.Image, index: int | None = None) -> Image.Image:
        """Stamp Turner's 3x3 trigger (scaled to the image) in the chosen corner(s); ``index`` is unused."""
        array = to_float_array(image)
        height, width = array.shape[:2]
        size = scaled_size(self.patch_size, height, width)
        cells = (np.arange(size) * 3) // size  # nearest-neighbour block scaling of the 3x3 mask
        corners = ["bottom_right"] if self.corners == "bottom_right" else list(TURNER_MASKS)
        for corner in corners:
            mask = TURNER_MASKS[corner][np.ix_(cells, cells)]
            region = stamp_corner_patch(np.zeros_like(array), mask, corner)
            covered = stamp_corner_patch(np.zeros_like(array), np.ones_like(mask), corner) > 0
            # Adding +-255 then clipping is the same as overwriting with 255/0 when amplitude == 1.
            array = np.where(covered, np.clip(array + 255.0 * self.amplitude * region, 0, 255), array)
        return to_image(array)

    # ---------------------------------------------------------------------------------------------------------- PGD
    def default_transform(self) -> InputTransform:
        """Normalisation with ``mean``/``std`` (identity when they are None)."""
        if self.mean is None:
            return lambda x: x
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return lambda x: (x - mean.to(x)) / std.to(x)

    def perturb(
        self,
        images: Sequence[Image.Image],
        labels: Sequence[int],
        surrogate: torch.nn.Module,
        transform: InputTransform | None = None,
        indices: Sequence[int] | None = None,
    ) -> list[Image.Image]:
        """PGD-perturb a list of images away from their labels; returns uint8 RGB images (no trigger yet).

        Images are grouped by size and processed ``batch_size`` at a time on the surrogate's device. ``indices``
        (row numbers) seed the random start per row, so results do not depend on how rows are batched.
        """
        transform = transform or self.default_transform()
        indices = list(range(len(images))) if indices is None else list(indices)
        out: list[Image.Image | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for p, image in enumerate(images):
            by_size.setdefault(image.size, []).append(p)
        for positions in by_size.values():
            for start in range(0, len(positions), self.batch_size):
                chunk = positions[start : start + self.batch_size]
                batch = np.stack([to_float_array(images[p]) / 255.0 for p in chunk])
                starts = None
                if self.random_start:
                    starts = np.stack(
                        [row_rng(self.seed, indices[p], stream=2).uniform(-1, 1, batch.shape[1:]) for p in chunk]
                    )
                adv = self._pgd(batch, [labels[p] for p in chunk], surrogate, transform, starts)
                for p, array in zip(chunk, adv, strict=True):
                    out[p] = to_image(array * 255.0)
        return out

    def _pgd(
        self,
        batch: np.ndarray,
        labels: list[int],
        surrogate: torch.nn.Module,
        transform: InputTransform,
        starts: np.ndarray | None,
    ) -> np.ndarray:
        """L-inf PGD on a float batch ``(N, H, W, 3)`` in [0, 1]; returns the same layout."""
        parameter = next(surrogate.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        x0 = torch.from_numpy(batch).permute(0, 3, 1, 2).float().to(device)
        y = torch.as_tensor(labels, dtype=torch.long, device=device)
        x = x0.clone()
        if starts is not None:
            noise = torch.from_numpy(starts).permute(0, 3, 1, 2).float().to(device)
            x = torch.clamp(x0 + self.epsilon * noise, 0, 1)
        for _ in range(self.steps):
            x.requires_grad_(True)
            loss = F.cross_entropy(_logits(surrogate(transform(x))), y)
            (grad,) = torch.autograd.grad(loss, x)
            with torch.no_grad():
                x = x + self.step_size * grad.sign()  # ascend: away from the true class
                x = torch.clamp(torch.min(torch.max(x, x0 - self.epsilon), x0 + self.epsilon), 0, 1)
        return x.detach().permute(0, 2, 3, 1).cpu().double().numpy()

    # ------------------------------------------------------------------------------------------------------ datasets
    def poison_dataset(
        self,
        ds: datasets.Dataset,
        image_column: str = "img",
        label_column: str = "label",
        num_classes: int | None = None,
        *,
        surrogate: torch.nn.Module | None = None,
        transform: InputTransform | None = None,
    ) -> tuple[datasets.Dataset, list[int]]:
        """Perturb (PGD against ``surrogate``) and trigger the chosen target-class rows; labels unchanged.

        Args:
            surrogate: a classifier (torch module; a transformers model returning ``.logits`` works too). It is put
                in eval mode during the attack (its mode and ``requires_grad`` flags are restored afterwards).
            transform: differentiable map from the [0, 1] batch ``(N, 3, H, W)`` to the surrogate's input (resize,
                normalise, ...). Defaults to normalisation with the attack's ``mean``/``std``.
        """
        if surrogate is None:
            raise ValueError(
                "LabelConsistent.poison_dataset needs a surrogate model: poison_dataset(ds, surrogate=...)"
            )
        check_columns(ds, image_column, label_column)
        self._check_target(num_classes_of(ds, label_column, num_classes))
        labels = ds[label_column]
        indices = self.select_indices(labels)

        def stamp(rows, images):
            adversarial = self.perturb(images, [labels[i] for i in rows], surrogate, transform, indices=rows)
            return [self.apply(image) for image in adversarial]

        was_training = surrogate.training
        flags = [p.requires_grad for p in surrogate.parameters()]
        surrogate.eval()
        surrogate.requires_grad_(False)  # gradients are only needed w.r.t. the images
        try:
            out = rewrite_rows(
                ds,
                image_column=image_column,
                label_column=label_column,
                stamp=stamp,
                stamp_rows=indices,
                flags={"poisoned": indices},
                # Poisoned rows are scattered: size map batches so each holds about ``batch_size`` of them.
                batch_size=max(256, -(-self.batch_size * len(ds) // max(1, len(indices)))),
            )
        finally:
            surrogate.train(was_training)
            for p, flag in zip(surrogate.parameters(), flags, strict=True):
                p.requires_grad_(flag)
        return out, indices
