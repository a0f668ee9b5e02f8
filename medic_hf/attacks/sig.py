"""SIG (Barni et al., 2019): a horizontal sinusoidal signal added to target-class images, clean label."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from PIL import Image

from .base import Attack, to_float_array, to_image


@dataclass
class SIG(Attack):
    """Sinusoidal-signal clean-label attack.

    ``x'[i, j, c] = clip(x[i, j, c] + delta * sin(2 * pi * j * frequency / m))`` with ``j`` the column and ``m`` the
    image width, in uint8 units. The signal has ``frequency`` periods across the image whatever its size.

    Only target-class training images are stamped and labels are left unchanged. ``poison_rate`` is a fraction of the
    *whole* training set (as in BackdoorBench); the rows are drawn among target-class rows and the count is capped at
    the number of target-class rows (with a warning), e.g. 0.1 of CIFAR-10 = 5000 = every target-class image.
    The backdoor test view stamps every non-target image and labels it with the target.

    Attributes:
        delta: amplitude in uint8 units (BackdoorBench ``sig_delta: 40``).
        frequency: number of periods across the width (BackdoorBench ``sig_f: 6``).
    """

    name: ClassVar[str] = "sig"
    clean_label: ClassVar[bool] = True

    delta: float = 40.0
    frequency: float = 6.0

    def signal(self, width: int) -> np.ndarray:
        """The additive signal per column, float ``(width,)`` in uint8 units."""
        columns = np.arange(width, dtype=np.float64)
        return self.delta * np.sin(2.0 * np.pi * columns * self.frequency / width)

    def apply(self, image: Image.Image, index: int | None = None) -> Image.Image:
        """Add the sinusoid along the columns (same for every row and channel); ``index`` is unused."""
        array = to_float_array(image)
        return to_image(array + self.signal(array.shape[1])[None, :, None])
