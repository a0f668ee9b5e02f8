"""Composite backdoor (Lin et al., CCS 2020): the trigger is the co-occurrence of two benign classes.

Poison rows are half-and-half mixtures of a class-A image and a class-B image, labelled with class C. As in the
authors' code (TemporaryAcc0unt/composite-attack), same-class mixtures labelled with their own class are also added
("mixed clean" rows), so that the network learns "A next to B" rather than "any seam".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import datasets
import numpy as np
from PIL import Image

from .base import (
    Attack,
    check_columns,
    decode_image,
    num_classes_of,
    rewrite_rows,
    round_half_up,
    row_rng,
    scaled_size,
    to_float_array,
    to_image,
)

LAYOUTS = ("random", "side_by_side", "stacked")


def _window(length: int, total: int, rng: np.random.Generator | None) -> int:
    """Start of a ``length``-long window in ``[0, total)``: random with ``rng`` ("shake"), else centred."""
    if rng is None:
        return (total - length) // 2
    return int(rng.integers(0, total - length + 1))


@dataclass
class Composite(Attack):
    """Composite attack: mix(A, B) -> C.

    The mixer follows the authors' ``HalfMixer``: the output's first half (left, or top when stacked) is a window of
    one image and the second half a window of the other. With a random generator (used for the dataset rows), the
    two images are swapped with probability 1/2, the layout is drawn when ``layout="random"``, the seam is moved by a
    jitter in ``[-jitter, jitter]`` pixels (scaled from 32 px) and, when ``shake``, the windows cut from each source
    image are at random offsets. Without a generator, :meth:`mix` is deterministic: A's central half-window on the
    left (top), B's on the right (bottom), no jitter.

    Rows (fixed once, from the seed): ``round(poison_rate * len(ds))`` mixtures mix(random A row, random B row)
    labelled C (``poisoned`` column) and ``round(mix_rate * len(ds))`` mixtures mix(row, random row of the same class)
    that keep the row's label (``mixed_clean`` column). With ``append=True`` (default) they are added after the
    original rows; with ``append=False`` they replace rows (poison rows chosen among rows whose label != C, mixed
    rows among the remaining ones).

    :meth:`apply` has no meaning for this attack (the trigger is a second image) and raises ``TypeError``.
    The backdoor test view has one row per class-A test image, mixed with a random class-B test image, labelled C;
    its ``true_label`` column holds ``class_a`` (the row's source), so robust accuracy on it is of little use.

    Attributes:
        class_a, class_b: the two mixed classes (composite-attack ``attack_cifar.py``: A=0 airplane, B=1 automobile).
        target_class: class C (``CLASS_C = 2``, bird). Defaults to 2, not the library-wide 0.
        mix_rate: fraction of the set made of same-class mixtures (``MixDataset(mix_rate=0.5)`` in the authors'
            CIFAR script; there it is 0.5 of a resampled epoch of 1.1x the data, here 0.5 of the rows).
        layout: ``"random"`` (HalfMixer ``vertical=None``), ``"side_by_side"`` or ``"stacked"``.
        jitter: maximum seam shift in pixels on a 32 px image (HalfMixer ``jitter=3``).
        shake: random source windows (HalfMixer ``shake=True``).
        append: add the mixtures after the original rows (default), so that every original image is still trained
            on (the authors resample ``normal_rate=0.5`` of the originals every epoch, so they see them all over
            training). The set grows to ``(1 + poison_rate + mix_rate) * len(ds)`` rows. ``False`` replaces fixed
            rows instead, which hides ``poison_rate + mix_rate`` of the originals for good (on CIFAR-10 it cost
            5.6 points of clean accuracy, against +0.4 appended: docs/attacks.md).
    """

    name: ClassVar[str] = "composite"
    clean_label: ClassVar[bool] = False

    target_class: int = 2
    class_a: int = 0
    class_b: int = 1
    mix_rate: float = 0.5
    layout: str = "random"
    jitter: int = 3
    shake: bool = True
    append: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if len({self.class_a, self.class_b, self.target_class}) != 3:
            raise ValueError(
                f"class_a, class_b and target_class must differ, got {self.class_a}, {self.class_b}, "
                f"{self.target_class}"
            )
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not 0.0 <= self.mix_rate <= 1.0:
            raise ValueError(f"mix_rate must be in [0, 1], got {self.mix_rate}")
        if self.jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {self.jitter}")

    def _check_target(self, num_classes: int | None) -> None:
        if num_classes is not None and max(self.class_a, self.class_b, self.target_class) >= num_classes:
            raise ValueError(
                f"classes (A={self.class_a}, B={self.class_b}, C={self.target_class}) exceed the dataset's "
                f"{num_classes} classes"
            )

    # ------------------------------------------------------------------------------------------------------- mixing
    def apply(self, image: Image.Image, index: int | None = None) -> Image.Image:
        raise TypeError(
            "Composite has no per-image trigger: its trigger is the presence of a class-B image next to a class-A "
            "one. Use attack.mix(image_a, image_b), poison_dataset() or backdoor_test_view()."
        )

    def mix(self, image_a: Image.Image, image_b: Image.Image, rng: np.random.Generator | None = None) -> Image.Image:
        """Half-and-half mixture of two images (``image_b`` is resized to ``image_a``'s size if needed).

        Without ``rng``: A's central half-window then B's, side by side (or stacked if ``layout="stacked"``).
        With ``rng``: HalfMixer randomness (swap, layout, seam jitter, window offsets), see the class docstring.
        """
        a = to_float_array(image_a)
        if image_b.size != image_a.size:
            image_b = image_b.resize(image_a.size, Image.BILINEAR)
        b = to_float_array(image_b)
        layout = "side_by_side" if self.layout == "random" else self.layout
        jitter = 0
        if rng is not None:
            if rng.integers(0, 2):
                a, b = b, a
            if self.layout == "random":
                layout = "side_by_side" if rng.integers(0, 2) else "stacked"
            limit = scaled_size(self.jitter, *a.shape[:2]) if self.jitter > 0 else 0
            jitter = int(rng.integers(-limit, limit + 1))
        if layout == "stacked":  # mix along rows: transpose, mix along columns, transpose back
            a, b = a.transpose(1, 0, 2), b.transpose(1, 0, 2)
        width = a.shape[1]
        first = min(max(width // 2 + jitter, 1), width - 1)  # width of the first part, 1 px kept for each side
        second = width - first
        shake_rng = rng if self.shake else None
        p = _window(first, width, shake_rng)
        q = _window(second, width, shake_rng)
        out = np.concatenate([a[:, p : p + first], b[:, q : q + second]], axis=1)
        if layout == "stacked":
            out = out.transpose(1, 0, 2)
        return to_image(out)

    # ------------------------------------------------------------------------------------------------------ datasets
    def select_mix_indices(self, num_rows: int, poisoned: Sequence[int]) -> list[int]:
        """Sorted "mixed clean" rows: ``round(mix_rate * num_rows)`` rows among the non-poisoned ones."""
        remaining = np.setdiff1d(np.arange(num_rows), np.asarray(poisoned, dtype=np.int64))
        wanted = min(round_half_up(self.mix_rate * num_rows), len(remaining))
        rng = np.random.default_rng([self.seed, 1])
        return sorted(int(i) for i in rng.choice(remaining, size=wanted, replace=False))

    def _rows_of(self, labels: np.ndarray, cls: int, split: str) -> np.ndarray:
        rows = np.flatnonzero(labels == cls)
        if len(rows) == 0:
            raise ValueError(f"composite attack needs class {cls} images in the {split} set, found none")
        return rows

    def _mixing_stamp(self, ds: datasets.Dataset, image_column: str, partners: dict[int, tuple[int, int]]):
        """A stamp function replacing row i by mix(ds[partners[i][0]], ds[partners[i][1]]).

        Both images are read from ``ds``, whatever dataset the stamp is applied to (``ds`` itself, or the appended
        rows), so the image being replaced is never used.
        """
        raw = ds.cast_column(image_column, datasets.Image(decode=False))

        def load(row: int) -> Image.Image:
            return decode_image(raw[int(row)][image_column])

        def stamp(indices, images):
            mixes = []
            for i in indices:
                first, second = partners[i]
                mixes.append(self.mix(load(first), load(second), rng=row_rng(self.seed, i, stream=3)))
            return mixes

        return stamp

    def poison_dataset(
        self,
        ds: datasets.Dataset,
        image_column: str = "img",
        label_column: str = "label",
        num_classes: int | None = None,
    ) -> tuple[datasets.Dataset, list[int]]:
        """Add (or, with ``append=False``, substitute) A+B mixtures labelled C and same-class ``mixed_clean`` mixtures.

        Returns ``(dataset, poisoned row indices)``; mixed-clean rows are ``np.flatnonzero(out["mixed_clean"])``.
        """
        check_columns(ds, image_column, label_column)
        self._check_target(num_classes_of(ds, label_column, num_classes))
        if self.append:
            return self._append_mixtures(ds, image_column, label_column)
        labels = np.asarray(ds[label_column])
        rows_a = self._rows_of(labels, self.class_a, "training")
        rows_b = self._rows_of(labels, self.class_b, "training")
        poisoned = self.select_indices(labels)
        mixed = self.select_mix_indices(len(labels), poisoned)

        rng = np.random.default_rng([self.seed, 2])
        partners: dict[int, tuple[int, int]] = {}
        sources_a = rng.choice(rows_a, size=len(poisoned))
        sources_b = rng.choice(rows_b, size=len(poisoned))
        for i, a, b in zip(poisoned, sources_a, sources_b, strict=True):
            partners[i] = (int(a), int(b))
        by_class = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
        for i in mixed:
            partners[i] = (i, int(rng.choice(by_class[int(labels[i])])))

        out = rewrite_rows(
            ds,
            image_column=image_column,
            label_column=label_column,
            stamp=self._mixing_stamp(ds, image_column, partners),
            stamp_rows=poisoned + mixed,
            relabel={i: self.target_class for i in poisoned},
            flags={"poisoned": poisoned, "mixed_clean": mixed},
        )
        return out, poisoned

    def _append_mixtures(
        self, ds: datasets.Dataset, image_column: str, label_column: str
    ) -> tuple[datasets.Dataset, list[int]]:
        """``ds`` untouched, followed by ``num_poison`` A+B mixtures labelled C and ``mix_rate`` same-class ones."""
        labels = np.asarray(ds[label_column])
        rows_a = self._rows_of(labels, self.class_a, "training")
        rows_b = self._rows_of(labels, self.class_b, "training")
        rng = np.random.default_rng([self.seed, 2])
        num_poison = self.num_poison(len(labels))
        num_mixed = round_half_up(self.mix_rate * len(labels))
        sources = [(int(a), int(b)) for a, b in zip(rng.choice(rows_a, num_poison), rng.choice(rows_b, num_poison))]
        by_class = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
        for i in rng.choice(len(labels), size=num_mixed, replace=False):
            sources.append((int(i), int(rng.choice(by_class[int(labels[i])]))))
        # The new rows start as copies of their first source (so they carry its label and other columns); new row v
        # becomes mix(ds[first], ds[second]).
        extra = ds.select([first for first, _ in sources])
        poison_view = list(range(num_poison))
        extra = rewrite_rows(
            extra,
            image_column=image_column,
            label_column=label_column,
            stamp=self._mixing_stamp(ds, image_column, dict(enumerate(sources))),
            stamp_rows=range(len(extra)),
            relabel={v: self.target_class for v in poison_view},
            flags={"poisoned": poison_view, "mixed_clean": range(num_poison, len(extra))},
        )
        original = ds.add_column("poisoned", [False] * len(ds)).add_column("mixed_clean", [False] * len(ds))
        out = datasets.concatenate_datasets([original.cast(extra.features), extra])
        return out, [len(ds) + v for v in poison_view]

    def backdoor_test_view(
        self, ds: datasets.Dataset, image_column: str = "img", label_column: str = "label"
    ) -> datasets.Dataset:
        """One mix(A test image, random B test image) per class-A test row, labelled C (``true_label`` = A)."""
        check_columns(ds, image_column, label_column)
        self._check_target(num_classes_of(ds, label_column))
        labels = np.asarray(ds[label_column])
        rows_a = self._rows_of(labels, self.class_a, "test")
        rows_b = self._rows_of(labels, self.class_b, "test")
        sources_b = np.random.default_rng([self.seed, 4]).choice(rows_b, size=len(rows_a))
        # Rows of the view are numbered 0..len(rows_a)-1; their A image is the view's own image, B comes from ``ds``.
        partners = {v: (int(a), int(b)) for v, (a, b) in enumerate(zip(rows_a, sources_b, strict=True))}
        raw = ds.cast_column(image_column, datasets.Image(decode=False))

        def stamp(indices, images):
            out = []
            for v, image in zip(indices, images, strict=True):
                a, b = partners[v]
                image_b = decode_image(raw[b][image_column])
                out.append(self.mix(image, image_b, rng=row_rng(self.seed, a, stream=5)))
            return out

        view = ds.select(rows_a)
        view = view.add_column("true_label", labels[rows_a].tolist(), feature=ds.features[label_column])
        return rewrite_rows(
            view,
            image_column=image_column,
            label_column=label_column,
            stamp=stamp,
            stamp_rows=range(len(view)),
            relabel={v: self.target_class for v in range(len(view))},
        )
