"""Loading untrusted models safely: local folders, timm names and Hub ids, safetensors only, pickles refused."""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".tar")
SAFETENSORS_NAME = "model.safetensors"
PLAIN_METADATA_NAME = "medic_model.json"
# Hub ids are "name" or "org/name", optionally prefixed by "hf-hub:" for timm.
_HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")

_CONVERT_FIX = (
    "Convert the weights to safetensors yourself in an environment you trust (load them there and save with "
    "safetensors.torch.save_file / model.save_pretrained / timm.models.save_for_hf), or build the model in Python "
    "and pass the nn.Module instead of a path."
)


class ModelLoadError(ValueError):
    """A model or checkpoint could not be loaded safely; the message says how to fix it."""


def _reason(exc: BaseException) -> str:
    """An exception's message without a trailing period, for embedding in a longer sentence."""
    return str(exc).strip().rstrip(".") or type(exc).__name__


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict without ever running pickled code.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``, which
    only reconstructs tensors and plain containers. Common checkpoint wrappers (``{"state_dict": ...}``,
    ``{"model": ...}``) and a ``module.`` prefix left by ``DataParallel`` are removed.

    Raises:
        ModelLoadError (a ValueError): the file is a pickle that needs arbitrary code to load, or holds no state dict.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(str(path), device="cpu")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelLoadError(
            f"Refusing to unpickle {path}: it contains objects other than tensors, and unpickling a file from an "
            f"untrusted source can run arbitrary code. {_CONVERT_FIX}"
        ) from exc
    return _unwrap_state_dict(loaded, path)


def _unwrap_state_dict(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    """Find the ``name -> tensor`` mapping inside a loaded checkpoint."""
    for key in ("state_dict", "model_state_dict", "model", "net"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ModelLoadError(
            f"{path} does not hold a state dict (a mapping of parameter names to tensors). "
            "Save model.state_dict() (ideally with safetensors.torch.save_file) and load that instead."
        )
    state_dict = dict(loaded)
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    return state_dict


def load_model(name_or_path: str | Path, *, trust_remote_code: bool = False, **kwargs) -> nn.Module:
    """Load a (possibly trojaned) classifier by local folder, timm name or Hugging Face Hub id, in eval mode.

    Resolution order:

    1. ``local-dir:<path>`` or an existing folder: a timm export (``config.json`` with ``"architecture"``) is loaded
       with ``timm.create_model("local-dir:<path>", pretrained=True)``; a transformers export (``"model_type"``)
       with ``AutoModelForImageClassification.from_pretrained(..., use_safetensors=True)``. Folders whose weights
       are only pickles (``pytorch_model.bin``, ``*.pt``, ``*.pth``) are refused.
    2. ``hf-hub:<org/name>``: a timm model from the Hub.
    3. A timm registry name (``"resnet18"``, ``"resnet18.a1_in1k"``): ``timm.create_model(name, pretrained=True)``.
    4. Any other Hub id: its ``config.json`` decides between timm and transformers (transformers when unclear).

    Extra ``kwargs`` go to ``timm.create_model`` or ``from_pretrained``.

    Raises:
        ModelLoadError (a ValueError): with a message that names the fix.
    """
    name = str(name_or_path)
    if name.startswith("local-dir:"):
        model = _load_local_dir(Path(name.removeprefix("local-dir:")), trust_remote_code, kwargs)
    elif Path(name).is_dir():
        model = _load_local_dir(Path(name), trust_remote_code, kwargs)
    elif Path(name).is_file():
        raise ModelLoadError(
            f"{name} is a single weights file, which does not say which architecture it belongs to. Build the "
            "model in Python, load the weights with medic_hf.modeling.load_state_dict_file(path) and "
            "model.load_state_dict(...), and pass the nn.Module instead."
        )
    elif name.startswith("hf-hub:"):
        model = _create_timm(name, kwargs)
    elif _is_timm_registry_name(name):
        model = _create_timm(name, kwargs)
    elif _HUB_ID_PATTERN.match(name):
        model = _load_hub_id(name, trust_remote_code, kwargs)
    else:
        raise ModelLoadError(
            f"{name!r} is not an existing folder, a timm model name or a Hugging Face Hub id ('org/name'). "
            "Check the spelling or path."
        )
    return model.eval()


def _is_timm_registry_name(name: str) -> bool:
    import timm

    base_name = name.split(".", 1)[0]
    return "/" not in name and timm.is_model(base_name)


def _create_timm(name: str, kwargs: dict) -> nn.Module:
    """``timm.create_model(name, pretrained=True)``; timm reads hub weights via safetensors or weights_only."""
    import timm

    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:
        raise ModelLoadError(
            f"timm could not load {name!r}: {_reason(exc)}. Check the name, your network access "
            "(HF_HUB_OFFLINE), and, for private or gated repos, that you are logged in (`hf auth login`)."
        ) from exc


def _read_json(path: Path) -> dict:
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _has_safetensors(folder: Path) -> bool:
    return any(p.name.endswith((".safetensors", ".safetensors.index.json")) for p in folder.iterdir())


def _refuse_pickle_only(folder: Path) -> None:
    """Raise if ``folder`` has pickled weights but no safetensors weights."""
    if _has_safetensors(folder):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ModelLoadError(
            f"{folder} holds only pickled weights ({', '.join(pickles)}); medic_hf never unpickles files from "
            f"untrusted sources because that can run arbitrary code. {_CONVERT_FIX}"
        )
    raise ModelLoadError(
        f"{folder} holds no weights (no *.safetensors file). Save the model with medic_hf.modeling.save_native, "
        "model.save_pretrained or timm.models.save_for_hf(..., safe_serialization=True) and load that folder."
    )


def _load_local_dir(folder: Path, trust_remote_code: bool, kwargs: dict) -> nn.Module:
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is not a folder.")
    _refuse_pickle_only(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        if (folder / PLAIN_METADATA_NAME).is_file():
            raise ModelLoadError(
                f"{folder} holds a plain PyTorch model; its code cannot be imported automatically. Build the model "
                "in Python and call medic_hf.modeling.load_native(folder, model=your_model)."
            )
        raise ModelLoadError(
            f"{folder} has no config.json, so its architecture is unknown. Build the model in Python, load the "
            "weights with load_state_dict_file, and pass the nn.Module instead."
        )
    config = _read_json(config_path)
    if "architecture" in config:
        if not (folder / SAFETENSORS_NAME).is_file():
            raise ModelLoadError(f"{folder} is a timm export without {SAFETENSORS_NAME}. {_CONVERT_FIX}")
        return _create_timm(f"local-dir:{folder}", kwargs)
    if "model_type" in config:
        return _from_pretrained_transformers(str(folder), trust_remote_code, kwargs)
    raise ModelLoadError(
        f"{config_path} is neither a timm config ('architecture') nor a transformers config ('model_type'). Build "
        "the model in Python and pass the nn.Module instead."
    )


def _from_pretrained_transformers(name: str, trust_remote_code: bool, kwargs: dict) -> nn.Module:
    from transformers import AutoModelForImageClassification

    try:
        # use_safetensors=True makes transformers fail rather than fall back to unpickling pytorch_model.bin.
        return AutoModelForImageClassification.from_pretrained(
            name, use_safetensors=True, trust_remote_code=trust_remote_code, **kwargs
        )
    except Exception as exc:
        raise ModelLoadError(
            f"transformers could not load {name!r} as an image classifier from safetensors weights: "
            f"{_reason(exc)}. If the repo only has pickled weights: {_CONVERT_FIX} If it needs custom code you "
            "have reviewed, pass trust_remote_code=True."
        ) from exc


def _load_hub_id(repo_id: str, trust_remote_code: bool, kwargs: dict) -> nn.Module:
    """Load a Hub repo, asking its config.json whether it is a timm or a transformers model."""
    from huggingface_hub import hf_hub_download

    try:
        config = _read_json(Path(hf_hub_download(repo_id, "config.json", revision=kwargs.get("revision"))))
    except Exception as exc:
        raise ModelLoadError(
            f"Could not fetch config.json of Hub repo {repo_id!r}: {_reason(exc)}. Check the id, your network access "
            "(HF_HUB_OFFLINE), and, for private or gated repos, that you are logged in (`hf auth login`); or pass "
            "a local folder."
        ) from exc
    if "architecture" in config and "model_type" not in config:
        timm_kwargs = {k: v for k, v in kwargs.items() if k != "revision"}
        revision = kwargs.get("revision")
        return _create_timm(f"hf-hub:{repo_id}" + (f"@{revision}" if revision else ""), timm_kwargs)
    return _from_pretrained_transformers(repo_id, trust_remote_code, kwargs)
