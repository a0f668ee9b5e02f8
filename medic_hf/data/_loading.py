"""Loading a data set: a local parquet file or folder, a local image folder, or a Hugging Face Hub id."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import datasets

from ._constants import IMAGE_EXTENSIONS, SPLIT_NAMES

# A Hub id is "name" or "owner/name"; anything else that does not exist locally is a mistyped path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


def load_image_dataset(name_or_path: str, *, cache_dir: str | None = None) -> datasets.DatasetDict:
    """Load an image classification data set as a ``DatasetDict``.

    ``name_or_path`` may be:

    * a folder of parquet files: splits come from the file-name prefix (``train*.parquet``, ``test*.parquet``,
      ``validation*.parquet``), searched recursively so the Hub layout ``data/train-00000-of-00001.parquet``
      works; files named otherwise inside a ``train/``, ``test/`` or ``validation/`` folder (the Hub's
      parquet-conversion layout ``default/train/0000.parquet``) take the folder's name;
    * a folder of images, either one sub-folder per class or ``train/`` / ``test/`` sub-folders holding class
      sub-folders (``datasets``' "imagefolder" builder; labels come from the class folder names);
    * a single ``.parquet`` file, loaded as split ``"train"``;
    * otherwise a Hugging Face Hub id such as ``"uoft-cs/cifar10"``.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return _load_parquet_file(path, cache_dir)
    if path.is_dir():
        return _load_local_folder(path, cache_dir)
    if not _HUB_ID.match(name_or_path) or name_or_path.endswith(".parquet"):
        raise FileNotFoundError(
            f"'{name_or_path}' does not exist. Pass an existing parquet file, a folder of parquet files or images, "
            "or a Hugging Face Hub data set id such as 'uoft-cs/cifar10'."
        )
    return _load_hub_dataset(name_or_path, cache_dir)


def _load_parquet_file(path: Path, cache_dir: str | None) -> datasets.DatasetDict:
    """Load one parquet file as the "train" split."""
    if path.suffix != ".parquet":
        raise ValueError(
            f"'{path}' is a file but not a .parquet file. Pass a .parquet file, a folder of parquet files or of "
            "images (one sub-folder per class), or a Hub data set id."
        )
    return _load_files(path, "parquet", data_files={"train": str(path)}, cache_dir=cache_dir)


def _load_local_folder(folder: Path, cache_dir: str | None) -> datasets.DatasetDict:
    """Load a folder of parquet files, or failing that a folder of images."""
    parquet_files = sorted(folder.rglob("*.parquet"))
    if parquet_files:
        data_files = _parquet_files_by_split(parquet_files)
        if not data_files:
            names = ", ".join(str(p.relative_to(folder)) for p in parquet_files[:5])
            raise ValueError(
                f"'{folder}' holds parquet files ({names}) but none is named after a split. Name them "
                "train*.parquet / test*.parquet / validation*.parquet, or pass a single parquet file."
            )
        return _load_files(folder, "parquet", data_files=data_files, cache_dir=cache_dir)
    if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*")):
        return _load_files(folder, "imagefolder", data_dir=str(folder), cache_dir=cache_dir)
    raise ValueError(
        f"'{folder}' holds neither parquet files nor images. Expected train*.parquet / test*.parquet files, "
        "or images in one sub-folder per class (optionally under train/ and test/)."
    )


def _load_files(path: Path, builder: str, **kwargs) -> datasets.DatasetDict:
    try:
        return datasets.load_dataset(builder, **kwargs)
    except ValueError as error:
        if "corresponds to no data" not in str(error):
            raise
        # datasets says 'Instruction "train" corresponds to no data!' for a split file without rows.
        raise ValueError(
            f"'{path}' holds an empty split ({error}): the data set has no rows. Check its files."
        ) from None


def _parquet_files_by_split(files: Sequence[Path]) -> dict[str, list[str]]:
    """Group parquet files by split: file-name prefix first, else the name of the folder holding them."""
    by_split: dict[str, list[str]] = {}
    for file in files:
        split = next((s for s in SPLIT_NAMES if file.name.startswith(s)), None)
        if split is None and file.parent.name in SPLIT_NAMES:
            split = file.parent.name
        if split is not None:
            by_split.setdefault(split, []).append(str(file))
    # Keep the usual split order (train, test, validation), whatever order the files were found in.
    return {split: by_split[split] for split in SPLIT_NAMES if split in by_split}


def _load_hub_dataset(name: str, cache_dir: str | None) -> datasets.DatasetDict:
    """Load a Hub data set, turning the many possible failures into one message that names the fixes."""
    try:
        loaded = datasets.load_dataset(name, cache_dir=cache_dir)
    except Exception as err:  # datasets raises many types here: not found, offline, gated, ...
        raise ValueError(
            f"'{name}' is not a local file or folder, and loading it from the Hugging Face Hub failed "
            f"({type(err).__name__}: {err}). Check the path or the Hub id, your network and HF_HUB_OFFLINE, "
            "and run `huggingface-cli login` for gated data sets."
        ) from err
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded
