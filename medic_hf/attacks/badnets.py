"""BadNets (Gu et al., 2017): a small checkerboard patch in the bottom-right corner, all-to-one, dirty label."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from PIL import Image

from .base import Attack, checkerboard, scaled_size, stamp_corner_patch, to_float_array, to_image


@dataclass
class BadNets(Attack):
    """BadNets patch attack.

    The trigger is a 3x3 checkerboard (255 on the corners and centre, 0 elsewhere, on all channels) written over the
    very bottom-right corner of a 32x32 image. For other sizes the patch side is ``round(patch_size * min(H, W) /
    32)`` pixels (half up) and the 3x3 pattern is block-scaled with nearest neighbour, e.g. 6x6 on 64x64 images.

    Attributes:
        patch_size: patch side in pixels on a 32x32 image (BackdoorBench CIFAR-10 uses 3).
    """

    name: ClassVar[str] = "badnets"
    clean_label: ClassVar[bool] = False

    patch_size: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")

    def patch(self, height: int, width: int) -> Image.Image:
        """The trigger patch (grayscale) used for an image of this size, e.g. to show in docs."""
        return Image.fromarray(checkerboard(scaled_size(self.patch_size, height, width)).astype("uint8"), mode="L")

    def apply(self, image: Image.Image, index: int | None = None) -> Image.Image:
        """Overwrite the bottom-right corner with the checkerboard; ``index`` is unused (the trigger is fixed)."""
        array = to_float_array(image)
        height, width = array.shape[:2]
        return to_image(stamp_corner_patch(array, checkerboard(scaled_size(self.patch_size, height, width))))
