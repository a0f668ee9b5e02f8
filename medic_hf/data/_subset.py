"""The class-balanced clean subset: the same number of rows per class, seeded."""

from __future__ import annotations

import datasets
import numpy as np

from ._columns import _find_label_column, _integer_labels

# --------------------------------------------------------------------------------------------------------------------
# Class-balanced subset
# --------------------------------------------------------------------------------------------------------------------


def class_balanced_subset(
    ds: datasets.Dataset,
    *,
    fraction: float | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    label_column: str | None = None,
) -> datasets.Dataset:
    """Draw a seeded subset with the same number of rows for every class, in shuffled order.

    Asking for every row (``fraction=1.0`` or ``num_samples=len(ds)``) returns all of them, shuffled, whatever the
    class balance: a curated clean set is used as it is.

    Give either ``fraction`` (of ``len(ds)``, rounded) or ``num_samples``. Every class present in ``ds`` gets
    ``total // num_classes`` rows; the remaining ``total % num_classes`` rows go one each to the classes with
    the smallest label ids that still have rows to spare. Example: ``fraction=0.05`` of CIFAR-10 train gives
    2,500 rows, 250 per class. The draw depends only on ``seed`` and the labels, and the result is an index
    mapping over ``ds`` (``Dataset.select``), so no image is re-encoded.
    """
    if len(ds) == 0:
        raise ValueError("The data set is empty: there is nothing to draw a clean subset from. Check the split.")
    label_column = label_column or _find_label_column(ds)
    labels = _integer_labels(ds, label_column)
    total = _requested_size(len(labels), fraction, num_samples)
    rng = np.random.default_rng(seed)
    if total == len(labels):
        # Every row: a curated clean set is used as it is, balanced or not (balancing is for draws).
        return ds.select(rng.permutation(len(labels)).tolist())
    classes, counts = np.unique(labels, return_counts=True)
    per_class = _rows_per_class(total, classes, counts)

    picked = [rng.choice(np.flatnonzero(labels == c), size=n, replace=False) for c, n in zip(classes, per_class)]
    order = rng.permutation(np.concatenate(picked))
    return ds.select(order.tolist())


def _requested_size(num_rows: int, fraction: float | None, num_samples: int | None) -> int:
    """The number of rows asked for by exactly one of ``fraction`` / ``num_samples``."""
    if (fraction is None) == (num_samples is None):
        raise ValueError("Pass exactly one of fraction=... (e.g. 0.05) or num_samples=... (e.g. 2500).")
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}; e.g. fraction=0.05 keeps 5% of the rows.")
        return max(1, round(fraction * num_rows))
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples <= 0:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
    if num_samples > num_rows:
        raise ValueError(f"num_samples={num_samples} is more than the {num_rows} rows of the data set.")
    return int(num_samples)


def _rows_per_class(total: int, classes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Split ``total`` rows as evenly as possible over the classes, never above a class's row count."""
    num_classes = len(classes)
    if total < num_classes:
        raise ValueError(
            f"Asked for {total} rows but the data set has {num_classes} classes; a class-balanced subset needs at "
            "least one row per class. Raise fraction / num_samples."
        )
    per_class = np.full(num_classes, total // num_classes)
    short = per_class > counts
    if short.any():
        worst = int(np.argmin(counts))
        raise ValueError(
            f"Asked for {per_class[0]} rows per class but class {classes[worst]} has only {counts[worst]} rows "
            f"(classes short of rows: {classes[short].tolist()}). Lower fraction / num_samples to at most "
            f"{counts.min() * num_classes} rows."
        )
    remainder = total - per_class.sum()
    for i in np.flatnonzero(counts > per_class)[:remainder]:
        per_class[i] += 1
    if per_class.sum() < total:
        raise ValueError(
            f"Cannot split {total} rows evenly over {num_classes} classes with {counts.tolist()} rows: the smallest "
            f"classes run out. Lower fraction / num_samples to at most {per_class.sum()} rows."
        )
    return per_class
