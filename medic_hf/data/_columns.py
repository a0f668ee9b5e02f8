"""Finding the image and label columns of a data set, and reading its labels without decoding images."""

from __future__ import annotations

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ._constants import IMAGE_COLUMN_NAMES, LABEL_COLUMN_NAMES

# --------------------------------------------------------------------------------------------------------------------
# Columns
# --------------------------------------------------------------------------------------------------------------------


def find_columns(ds: datasets.Dataset | datasets.DatasetDict) -> tuple[str, str]:
    """Return ``(image_column, label_column)`` of a data set.

    Rows already holding ``pixel_values`` give ``("pixel_values", <label column>)``. Otherwise the image
    column is ``img`` or ``image`` or else the first ``datasets.Image`` column, and the label column is ``label``
    or ``labels`` or else the first ``ClassLabel`` column (e.g. ``fine_label`` of CIFAR-100). For a
    ``DatasetDict`` the "train" split (or the first one) is inspected.
    """
    ds = _one_split(ds)
    if "pixel_values" in ds.column_names:
        return "pixel_values", _find_label_column(ds)
    return _find_image_column(ds), _find_label_column(ds)


def find_image_column(ds: datasets.Dataset | datasets.DatasetDict) -> str:
    """The image column alone (``img``, ``image`` or the first ``datasets.Image`` column), for unlabeled data."""
    return _find_image_column(_one_split(ds))


def _one_split(ds: datasets.Dataset | datasets.DatasetDict) -> datasets.Dataset:
    """A DatasetDict's "train" split (or its first split); a Dataset as it is."""
    if isinstance(ds, datasets.DatasetDict):
        return ds["train"] if "train" in ds else next(iter(ds.values()))
    return ds


def _find_image_column(ds: datasets.Dataset) -> str:
    features = ds.features or {}
    for name in IMAGE_COLUMN_NAMES:
        if name in ds.column_names:
            return name
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise ValueError(
        f"No image column found; the data set has columns {ds.column_names}. Expected 'img' or 'image' (or a "
        "datasets.Image column): rename yours with ds = ds.rename_column('<your column>', 'image'), or pass "
        "image_column=..."
    )


def _find_label_column(ds: datasets.Dataset) -> str:
    features = ds.features or {}
    for name in LABEL_COLUMN_NAMES:
        if name in ds.column_names:
            return name
    for name, feature in features.items():
        if isinstance(feature, datasets.ClassLabel):
            return name
    raise ValueError(
        f"No label column found; the data set has columns {ds.column_names}. MEDIC needs class labels: rename "
        "your label column with ds = ds.rename_column('<your column>', 'label'), or pass label_column=... "
        "(an unlabelled split, e.g. a Kaggle-style test split, cannot be used)."
    )


def _label_array(ds: datasets.Dataset, label_column: str) -> pa.ChunkedArray:
    """The label column as one arrow array, read without decoding images.

    ``Dataset.unique`` would flatten an index mapping (as left by ``select``) by rewriting every column,
    images included, to the cache; the arrow format takes only the wanted rows of the one column.
    """
    if label_column not in ds.column_names:
        raise ValueError(f"Label column '{label_column}' not found; the data set has columns {ds.column_names}.")
    return ds.with_format("arrow", columns=[label_column])[label_column]


def _integer_labels(ds: datasets.Dataset, label_column: str) -> np.ndarray:
    """The label column as an int64 numpy array, or a ValueError saying why it cannot be one."""
    column = _label_array(ds, label_column)
    if column.null_count:
        raise ValueError(
            f"{column.null_count} of {len(column)} rows have no '{label_column}' value. Drop them with "
            f"ds = ds.filter(lambda label: label is not None, input_columns='{label_column}')."
        )
    if not pa.types.is_integer(column.type):
        examples = pc.unique(column).to_pylist()[:5]
        raise ValueError(
            f"Labels in column '{label_column}' must be integer class ids, but they are {column.type} "
            f"(e.g. {examples}). For class names use ds = ds.class_encode_column('{label_column}'); for integral "
            f"floats use ds = ds.cast_column('{label_column}', datasets.Value('int64'))."
        )
    return column.to_numpy().astype(np.int64, copy=False)
