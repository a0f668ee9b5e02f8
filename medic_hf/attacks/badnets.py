"""BadNets (Gu et al., 2017): a small checkerboard patch in the bottom-right corner, all-to-one, dirty label."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from PIL import Image

from .base import Attack, checkerboard, scaled_size, stamp_corner_patch, to_float_array, to_image


@dataclass
class BadNets(Attack):
    """BadNets patch attack.

    The trigger is a 3x3 checkerboard (255 on the corners and centre, 0 elsewhere, on all channels) written over the
    very bottom-right corner of a 32x32 image. For other sizes the patch side is ``round(patch_size * min(H, W) /
    32)`` pixels (half up) and the 3x3 pattern is block-scaled with nearest neighbour, e.g. 6x6 on 64x64 images.

    With ``pattern="white"`` the patch is a solid white square instead: it survives the stride-4 stem of
    ImageNet-style networks (timm ``resnet18`` at 32x32) and random-crop augmentation much better than the
    one-pixel checkerboard, which such a model did not learn in 8 epochs (docs/removal.md).

    Attributes:
        patch_size: patch side in pixels on a 32x32 image (BackdoorBench CIFAR-10 uses 3).
        pattern: ``"checkerboard"`` (default) or ``"white"``.
    """

    name: ClassVar[str] = "badnets"
    clean_label: ClassVar[bool] = False

    patch_size: int = 3
    pattern: str = "checkerboard"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if self.pattern not in ("checkerboard", "white"):
            raise ValueError(f"pattern must be 'checkerboard' or 'white', got {self.pattern!r}")

    def patch(self, height: int, width: int) -> Image.Image:
        """The trigger patch (grayscale) used for an image of this size, e.g. to show in docs."""
        return Image.fromarray(self._pattern(scaled_size(self.patch_size, height, width)).astype("uint8"), mode="L")

    def _pattern(self, size: int):
        board = checkerboard(size)
        return board if self.pattern == "checkerboard" else np.full_like(board, 255)

    def apply(self, image: Image.Image, index: int | None = None) -> Image.Image:
        """Overwrite the bottom-right corner with the patch; ``index`` is unused (the trigger is fixed)."""
        array = to_float_array(image)
        height, width = array.shape[:2]
        return to_image(stamp_corner_patch(array, self._pattern(scaled_size(self.patch_size, height, width))))
