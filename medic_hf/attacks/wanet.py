"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible smooth warping of the image, all-to-one, dirty label."""

from __future__ import annotations

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
    round_half_up,
    row_rng,
    to_float_array,
    to_image,
)


@dataclass
class WaNet(Attack):
    """Warping-based backdoor.

    The warp field is built as in the WaNet paper / BackdoorBench ``attack/wanet.py``: a ``k x k x 2`` field drawn
    uniform(-1, 1) (from ``torch.Generator().manual_seed(seed)``), divided by its mean absolute value, upsampled
    bicubically (``align_corners=True``) to ``H x W``; the sampling grid is ``identity + s * field / H``, times
    ``grid_rescale``, clamped to [-1, 1], and applied with ``F.grid_sample(..., align_corners=True)`` (bilinear).

    Noise mode: ``round(cross_ratio * n_poison)`` extra rows (drawn among the non-poisoned rows, any class) are warped
    with the grid plus a per-row random perturbation uniform(-1, 1) / H, and KEEP their label, so that the network
    learns the specific warp rather than "any warp". They are flagged in a ``noise_mode`` column.

    Unlike BackdoorBench, which re-draws poisoned samples in every batch, the poisoned and noise rows are fixed once
    (from the seed) and the warp is applied to the stored image; augmentation comes after the warp in both.

    Attributes:
        k: side of the random control grid (BackdoorBench ``k: 4``).
        s: warping strength (``s: 0.5``).
        grid_rescale: scale of the final grid (``grid_rescale: 1``).
        cross_ratio: noise-mode rows per poisoned row (``cross_ratio: 2``).
    """

    name: ClassVar[str] = "wanet"
    clean_label: ClassVar[bool] = False

    k: int = 4
    s: float = 0.5
    grid_rescale: float = 1.0
    cross_ratio: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.cross_ratio < 0:
            raise ValueError(f"cross_ratio must be >= 0, got {self.cross_ratio}")
        self._grids: dict[tuple[int, int], torch.Tensor] = {}

    # -------------------------------------------------------------------------------------------------------- grids
    def grid(self, height: int, width: int) -> torch.Tensor:
        """The backdoor sampling grid ``(1, H, W, 2)`` (x = column, y = row, both in [-1, 1]) for this image size."""
        key = (height, width)
        if key not in self._grids:
            generator = torch.Generator().manual_seed(self.seed)
            field = torch.rand(1, 2, self.k, self.k, generator=generator, dtype=torch.float64) * 2 - 1
            field = field / field.abs().mean()
            field = F.interpolate(field, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
            rows = torch.linspace(-1, 1, steps=height, dtype=torch.float64)
            cols = torch.linspace(-1, 1, steps=width, dtype=torch.float64)
            y, x = torch.meshgrid(rows, cols, indexing="ij")
            identity = torch.stack((x, y), dim=2)[None]
            # BackdoorBench divides the field by the input height for both axes; we keep that for square images.
            self._grids[key] = torch.clamp((identity + self.s * field / height) * self.grid_rescale, -1, 1)
        return self._grids[key]

    def noise_grid(self, height: int, width: int, index: int) -> torch.Tensor:
        """Grid of a noise-mode row: the backdoor grid plus uniform(-1, 1) / H, seeded by ``(seed, index)``."""
        noise = row_rng(self.seed, index, stream=1).uniform(-1.0, 1.0, size=(1, height, width, 2))
        return torch.clamp(self.grid(height, width) + torch.from_numpy(noise) / height, -1, 1)

    @staticmethod
    def _warp(image: Image.Image, grid: torch.Tensor) -> Image.Image:
        array = to_float_array(image)
        tensor = torch.from_numpy(array).permute(2, 0, 1)[None]
        warped = F.grid_sample(tensor, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return to_image(warped[0].permute(1, 2, 0).numpy())

    # ----------------------------------------------------------------------------------------------------- triggers
    def apply(self, image: Image.Image, index: int | None = None) -> Image.Image:
        """Warp the image with the backdoor grid; ``index`` is unused (the warp is the same for every image)."""
        width, height = image.size
        return self._warp(image, self.grid(height, width))

    def apply_noise(self, image: Image.Image, index: int) -> Image.Image:
        """Noise-mode warp of row ``index`` (backdoor grid + per-row random perturbation)."""
        width, height = image.size
        return self._warp(image, self.noise_grid(height, width, index))

    # ------------------------------------------------------------------------------------------------------ datasets
    def select_noise_indices(self, num_rows: int, poisoned: list[int]) -> list[int]:
        """Sorted noise-mode rows: ``round(cross_ratio * len(poisoned))`` rows among the non-poisoned ones."""
        remaining = np.setdiff1d(np.arange(num_rows), np.asarray(poisoned, dtype=np.int64))
        wanted = min(round_half_up(self.cross_ratio * len(poisoned)), len(remaining))
        rng = np.random.default_rng([self.seed, 1])  # a stream separate from the poisoned-row draw
        return sorted(int(i) for i in rng.choice(remaining, size=wanted, replace=False))

    def poison_dataset(
        self,
        ds: datasets.Dataset,
        image_column: str = "img",
        label_column: str = "label",
        num_classes: int | None = None,
    ) -> tuple[datasets.Dataset, list[int]]:
        """Poison ``ds``; also adds a boolean ``noise_mode`` column for the noise-mode rows (labels kept).

        Returns ``(dataset, poisoned row indices)``; noise-mode rows are ``np.flatnonzero(out["noise_mode"])``.
        """
        check_columns(ds, image_column, label_column)
        self._check_target(num_classes_of(ds, label_column, num_classes))
        poisoned = self.select_indices(ds[label_column])
        noise = self.select_noise_indices(len(ds), poisoned)
        poisoned_set = set(poisoned)

        def stamp(indices, images):
            return [
                self.apply(image) if i in poisoned_set else self.apply_noise(image, i)
                for i, image in zip(indices, images, strict=True)
            ]

        out = rewrite_rows(
            ds,
            image_column=image_column,
            label_column=label_column,
            stamp=stamp,
            stamp_rows=poisoned + noise,
            relabel={i: self.target_class for i in poisoned},
            flags={"poisoned": poisoned, "noise_mode": noise},
        )
        return out, poisoned
