"""Shared machinery for the backdoor attacks.

Every attack is a small dataclass holding its (JSON-serialisable) parameters. The dataset plumbing lives here:
rows are chosen with ``numpy.random.default_rng(seed)``, the trigger is stamped on the *stored* image (before any
training-time augmentation) and a new :class:`datasets.Dataset` is returned that keeps the source's ``Image`` and
``ClassLabel`` features, with an extra boolean ``poisoned`` column.

Untouched rows are passed through as raw encoded bytes (the image column is read with ``Image(decode=False)``), so
poisoning a 50k-image dataset only decodes and re-encodes the poisoned rows.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import datasets
import numpy as np
from PIL import Image

ATTACK_FILE = "attack.json"

# A function stamping a batch of images: (row indices, images) -> stamped images, same order.
StampFn = Callable[[Sequence[int], list[Image.Image]], list[Image.Image]]


# --------------------------------------------------------------------------------------------------------------------
# Pixel helpers
# --------------------------------------------------------------------------------------------------------------------
def to_float_array(image: Image.Image) -> np.ndarray:
    """RGB image -> float64 array ``(H, W, 3)`` in uint8 units [0, 255].

    Non-RGB images (grayscale, RGBA, palette) are converted to RGB first, so every attack sees three channels.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.float64)


def to_image(array: np.ndarray) -> Image.Image:
    """Float array in uint8 units -> RGB PIL image (rounded to nearest, clipped to [0, 255])."""
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="RGB")


def round_half_up(x: float) -> int:
    """``round`` that sends .5 up (Python's ``round`` is banker's rounding: round(4.5) == 4)."""
    return int(np.floor(x + 0.5))


def scaled_size(base: int, height: int, width: int, reference: int = 32) -> int:
    """Side of a trigger that is ``base`` pixels on a ``reference``-pixel image, scaled to this image (>= 1).

    The smaller image side is used so that the trigger always fits in non-square images.
    """
    return max(1, round_half_up(base * min(height, width) / reference))


def checkerboard(size: int) -> np.ndarray:
    """The 3x3 BadNets checkerboard (255 on the corners and centre, 0 elsewhere) block-scaled to ``size`` x ``size``.

    Nearest-neighbour scaling: output pixel ``i`` takes pattern cell ``floor(3 * i / size)``, so a 6x6 patch is the
    3x3 pattern with each cell repeated as a 2x2 block. Returns a float array ``(size, size)`` with values 0/255.
    """
    pattern = np.array([[255, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=np.float64)
    cells = (np.arange(size) * 3) // size
    return pattern[np.ix_(cells, cells)]


def row_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """A generator for one row, independent of batching and row order (seeded by ``(seed, stream, index)``)."""
    return np.random.default_rng([int(seed), int(stream), int(index)])


def stamp_corner_patch(array: np.ndarray, patch: np.ndarray, corner: str = "bottom_right") -> np.ndarray:
    """Overwrite a corner of ``array`` (H, W, 3) with a 2-D ``patch`` on all channels; returns a new array."""
    out = array.copy()
    p = patch.shape[0]
    height, width = out.shape[:2]
    rows = slice(0, p) if corner.startswith("top") else slice(height - p, height)
    cols = slice(0, p) if corner.endswith("left") else slice(width - p, width)
    out[rows, cols, :] = patch[:, :, None]
    return out


# --------------------------------------------------------------------------------------------------------------------
# Encoded-image helpers (rows of an ``Image(decode=False)`` column are {"bytes": ..., "path": ...} dicts)
# --------------------------------------------------------------------------------------------------------------------
def decode_image(value: Any) -> Image.Image:
    """Decode one raw ``Image(decode=False)`` value (or pass a PIL image through)."""
    if isinstance(value, Image.Image):
        return value
    if value.get("bytes") is not None:
        image = Image.open(io.BytesIO(value["bytes"]))
    else:
        image = Image.open(value["path"])
    image.load()
    return image


def encode_image(image: Image.Image) -> dict[str, Any]:
    """PNG-encode an image into the raw form stored by ``datasets.Image`` (lossless, so triggers survive exactly)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def check_columns(ds: datasets.Dataset, image_column: str, label_column: str) -> None:
    missing = [c for c in (image_column, label_column) if c not in ds.column_names]
    if missing:
        raise ValueError(f"dataset has no column(s) {missing}; columns are {ds.column_names}")
    if not isinstance(ds.features[image_column], datasets.Image):
        feature = ds.features[image_column]
        raise ValueError(f"column {image_column!r} must have the datasets.Image feature, got {feature}")


def num_classes_of(ds: datasets.Dataset, label_column: str, num_classes: int | None = None) -> int | None:
    """Number of classes: the explicit argument, else the ClassLabel feature, else None (unknown)."""
    if num_classes is not None:
        return int(num_classes)
    feature = ds.features[label_column]
    return int(feature.num_classes) if isinstance(feature, datasets.ClassLabel) else None


def rewrite_rows(
    ds: datasets.Dataset,
    *,
    image_column: str,
    label_column: str,
    stamp: StampFn,
    stamp_rows: Iterable[int],
    relabel: dict[int, int] | None = None,
    flags: dict[str, Iterable[int]] | None = None,
    batch_size: int = 256,
) -> datasets.Dataset:
    """Return a copy of ``ds`` where the rows in ``stamp_rows`` have their image replaced by ``stamp``.

    ``relabel`` maps row index -> new label; ``flags`` maps a new boolean column name -> rows where it is True.
    Other columns and the features of the source (Image, ClassLabel, ...) are kept.
    """
    stamp_set = set(int(i) for i in stamp_rows)
    relabel = {int(k): int(v) for k, v in (relabel or {}).items()}
    flag_sets = {name: set(int(i) for i in rows) for name, rows in (flags or {}).items()}

    image_feature = ds.features[image_column]
    features = ds.features.copy()
    for name in flag_sets:
        features[name] = datasets.Value("bool")

    def process(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        images = batch[image_column]
        positions = [p for p, i in enumerate(indices) if i in stamp_set]
        if positions:
            stamped = stamp([indices[p] for p in positions], [decode_image(images[p]) for p in positions])
            for p, image in zip(positions, stamped, strict=True):
                images[p] = encode_image(image)
        if relabel:
            batch[label_column] = [relabel.get(i, y) for i, y in zip(indices, batch[label_column])]
        for name, rows in flag_sets.items():
            batch[name] = [i in rows for i in indices]
        return batch

    raw = ds.cast_column(image_column, datasets.Image(decode=False))
    out = raw.map(
        process,
        with_indices=True,
        batched=True,
        batch_size=batch_size,
        features=features,
        load_from_cache_file=False,
        # A fresh fingerprint: skips hashing ``process`` (whose closure may hold a torch model) and never reuses a
        # stale cache file.
        new_fingerprint=uuid.uuid4().hex,
        desc="stamping trigger",
    )
    # ``features`` already carries the source Image feature; make the decode flag explicit anyway.
    return out.cast_column(image_column, image_feature)


# --------------------------------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Attack:
    """Base class of all attacks.

    Attributes:
        target_class: the class the backdoor maps to.
        poison_rate: fraction of the *whole* training set that is poisoned (see subclasses for clean-label capping).
        seed: seeds every random choice (poisoned rows, noise patterns), so an attack is reproducible.
    """

    name: ClassVar[str] = "base"
    #: dirty-label all-to-one attacks relabel poisoned rows to ``target_class`` and pick them among non-target rows;
    #: clean-label attacks pick target-class rows and keep labels.
    clean_label: ClassVar[bool] = False

    target_class: int = 0
    poison_rate: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.poison_rate <= 1.0:
            raise ValueError(f"poison_rate must be in [0, 1], got {self.poison_rate}")
        if self.target_class < 0:
            raise ValueError(f"target_class must be >= 0, got {self.target_class}")

    # ----------------------------------------------------------------------------------------------------- triggers
    def apply(self, image: Image.Image, index: int | None = None) -> Image.Image:
        """Stamp the trigger on one RGB image; same size out, uint8 values. ``index`` is the row (if any)."""
        raise TypeError(f"{type(self).__name__} does not define a per-image trigger")

    def stamp_batch(self, indices: Sequence[int], images: list[Image.Image]) -> list[Image.Image]:
        """Stamp several images (rows ``indices``); the default applies :meth:`apply` one by one."""
        return [self.apply(image, index=int(i)) for i, image in zip(indices, images, strict=True)]

    # --------------------------------------------------------------------------------------------------- selection
    def _check_target(self, num_classes: int | None) -> None:
        if num_classes is not None and self.target_class >= num_classes:
            raise ValueError(f"target_class={self.target_class} but the dataset has {num_classes} classes")

    def num_poison(self, dataset_size: int) -> int:
        """Number of rows to poison: ``poison_rate`` of the whole set, rounded half up."""
        return round_half_up(self.poison_rate * dataset_size)

    def select_indices(self, labels: Sequence[int]) -> list[int]:
        """Sorted row indices to poison, drawn with ``default_rng(seed)`` without replacement.

        Dirty-label attacks draw among rows whose label != target; clean-label ones among target-class rows, capped
        at the number of target-class rows (with a warning when the cap applies).
        """
        labels = np.asarray(labels)
        if self.clean_label:
            candidates = np.flatnonzero(labels == self.target_class)
        else:
            candidates = np.flatnonzero(labels != self.target_class)
        wanted = self.num_poison(len(labels))
        if wanted > len(candidates):
            kind = "target-class" if self.clean_label else "non-target"
            warnings.warn(
                f"{self.name}: poison_rate={self.poison_rate} asks for {wanted} rows but only "
                f"{len(candidates)} {kind} rows exist; poisoning all of them",
                stacklevel=3,
            )
            wanted = len(candidates)
        rng = np.random.default_rng(self.seed)
        chosen = rng.choice(candidates, size=wanted, replace=False)
        return sorted(int(i) for i in chosen)

    # ------------------------------------------------------------------------------------------------------ datasets
    def poison_dataset(
        self,
        ds: datasets.Dataset,
        image_column: str = "img",
        label_column: str = "label",
        num_classes: int | None = None,
    ) -> tuple[datasets.Dataset, list[int]]:
        """Return ``(poisoned copy of ds, sorted poisoned row indices)``; adds a boolean ``poisoned`` column."""
        check_columns(ds, image_column, label_column)
        self._check_target(num_classes_of(ds, label_column, num_classes))
        indices = self.select_indices(ds[label_column])
        relabel = {} if self.clean_label else {i: self.target_class for i in indices}
        out = rewrite_rows(
            ds,
            image_column=image_column,
            label_column=label_column,
            stamp=self.stamp_batch,
            stamp_rows=indices,
            relabel=relabel,
            flags={"poisoned": indices},
        )
        return out, indices

    def backdoor_test_view(
        self, ds: datasets.Dataset, image_column: str = "img", label_column: str = "label"
    ) -> datasets.Dataset:
        """Every image whose true label != target, triggered and labelled ``target_class`` (ASR is measured here).

        The original label is kept in a ``true_label`` column (same feature as the label column), for robust
        accuracy.
        """
        check_columns(ds, image_column, label_column)
        self._check_target(num_classes_of(ds, label_column))
        labels = np.asarray(ds[label_column])
        keep = np.flatnonzero(labels != self.target_class)
        view = ds.select(keep)
        view = view.add_column("true_label", labels[keep].tolist(), feature=ds.features[label_column])
        return rewrite_rows(
            view,
            image_column=image_column,
            label_column=label_column,
            stamp=self.stamp_batch,
            stamp_rows=range(len(view)),
            relabel={i: self.target_class for i in range(len(view))},
        )

    # -------------------------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable parameters, with the attack ``name`` used by :func:`attack_from_dict`."""
        return {"name": self.name, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Attack:
        """Rebuild an attack of this class from :meth:`to_dict` output (the ``name`` key is checked, then dropped)."""
        d = dict(d)
        name = d.pop("name", cls.name)
        if name != cls.name:
            raise ValueError(f"{cls.__name__}.from_dict got a dict for attack {name!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.name} parameters {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)

    def save(self, folder: str | os.PathLike) -> str:
        """Write ``attack.json`` into ``folder`` (created if needed); returns the file path."""
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, ATTACK_FILE)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        return path
