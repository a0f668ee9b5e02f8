"""Blended (Chen et al., 2017): alpha-blend a fixed pattern image into the whole picture, all-to-one, dirty label."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from .base import Attack, to_float_array, to_image

_DATA_URI = "data:image/png;base64,"


def _image_to_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return _DATA_URI + base64.b64encode(buffer.getvalue()).decode("ascii")


def _data_uri_to_image(uri: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(uri[len(_DATA_URI) :])))
    image.load()
    return image


@dataclass
class Blended(Attack):
    """Blended-injection attack: ``x' = (1 - alpha) * x + alpha * k``.

    Attributes:
        alpha: blend ratio of the pattern (BackdoorBench: 0.2 for training and test).
        pattern: the key pattern ``k``. ``None`` (default) is a uniform-noise RGB image drawn from
            ``default_rng([seed, H, W])`` at each image size, so it is fixed for a given seed and size. A file path or
            a PIL image may be given instead; it is resized (bilinear) to each image's size. A PIL image is stored in
            ``to_dict()`` as a base64 PNG data URI so that ``attack.json`` is self-contained; a path is stored as is.
    """

    name: ClassVar[str] = "blended"
    clean_label: ClassVar[bool] = False

    alpha: float = 0.2
    pattern: str | Image.Image | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if isinstance(self.pattern, str) and self.pattern.startswith(_DATA_URI):
            self.pattern = _data_uri_to_image(self.pattern)
        # (height, width) -> float pattern; not a dataclass field, so ignored by ==, asdict and repr.
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def pattern_array(self, height: int, width: int) -> np.ndarray:
        """The key pattern ``k`` for an image of this size, float ``(H, W, 3)`` in uint8 units."""
        key = (height, width)
        if key not in self._cache:
            if self.pattern is None:
                rng = np.random.default_rng([self.seed, height, width])
                array = rng.integers(0, 256, size=(height, width, 3)).astype(np.float64)
            else:
                if isinstance(self.pattern, Image.Image):
                    image = self.pattern.convert("RGB")
                else:
                    with Image.open(self.pattern) as f:
                        image = f.convert("RGB")
                if image.size != (width, height):
                    image = image.resize((width, height), Image.BILINEAR)
                array = np.asarray(image, dtype=np.float64)
            self._cache[key] = array
        return self._cache[key]

    def apply(self, image: Image.Image, index: int | None = None) -> Image.Image:
        """Blend the pattern into the image; ``index`` is unused (the pattern is the same for every image)."""
        array = to_float_array(image)
        key = self.pattern_array(*array.shape[:2])
        return to_image((1.0 - self.alpha) * array + self.alpha * key)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if isinstance(self.pattern, Image.Image):
            d["pattern"] = _image_to_data_uri(self.pattern)
        return d
