"""Saving a model in its library's native safetensors format, and loading it back."""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from ._family import model_family
from ._loading import PLAIN_METADATA_NAME, SAFETENSORS_NAME, ModelLoadError, _reason, _refuse_pickle_only, load_model

# --------------------------------------------------------------------------------------------------------------------
# Saving and re-loading
# --------------------------------------------------------------------------------------------------------------------


def save_native(model: nn.Module, output_dir: str | Path, *, safe_serialization: bool = True) -> Path:
    """Save ``model`` in its library's native safetensors format and return the folder.

    * timm: ``timm.models.save_for_hf`` -> ``config.json`` (with the creation kwargs under ``model_args``) +
      ``model.safetensors``; loadable with ``timm.create_model("local-dir:<dir>", pretrained=True)``.
    * transformers: ``model.save_pretrained(dir)`` -> ``config.json`` + ``model.safetensors``.
    * plain PyTorch: ``model.safetensors`` + ``medic_model.json``, which records the class's import path for
      information only (it is never used to import code); reload with ``load_native(dir, model=instance)``.

    ``safe_serialization=False`` is refused: medic_hf writes only safetensors, the format its loaders accept.
    """
    if not safe_serialization:
        raise ValueError(
            "medic_hf only writes safetensors, because its own loaders refuse pickled weights. "
            "Call save_native with safe_serialization=True."
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    family = model_family(model)
    if family == "timm":
        import timm.models

        try:
            timm.models.save_for_hf(model, str(output_dir), safe_serialization=True)
        except RuntimeError as error:
            if "share memory" not in str(error):
                raise
            # Modules shared between blocks (timm CoaT's position encodings): safetensors refuses aliased tensors,
            # so each name gets its own copy; loading assigns the same values to the shared module twice.
            tensors = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}
            safetensors.torch.save_file(tensors, str(output_dir / SAFETENSORS_NAME), metadata={"format": "pt"})
            timm.models._hub.save_config_for_hf(model, output_dir / "config.json")
    elif family == "transformers":
        # transformers 5 always writes safetensors and has no safe_serialization argument.
        model.save_pretrained(output_dir)
    else:
        safetensors.torch.save_model(model, str(output_dir / SAFETENSORS_NAME), metadata={"format": "pt"})
        cls = type(model)
        metadata = {
            "library": "pytorch",
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "weights": SAFETENSORS_NAME,
            "note": "Informational only: medic_hf never imports code from this file. Build the model yourself and "
            "call medic_hf.modeling.load_native(folder, model=instance).",
        }
        (output_dir / PLAIN_METADATA_NAME).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return output_dir


def load_native(
    output_dir: str | Path, *, model: nn.Module | None = None, trust_remote_code: bool = False
) -> nn.Module:
    """Load a folder written by :func:`save_native`, in eval mode.

    Without ``model`` the folder's config decides (timm or transformers, see :func:`load_model`). With ``model``
    (required for plain PyTorch), the folder's ``model.safetensors`` is loaded into it strictly and it is returned.
    """
    output_dir = Path(output_dir)
    if model is None:
        return load_model(str(output_dir), trust_remote_code=trust_remote_code)
    weights = output_dir / SAFETENSORS_NAME
    if not weights.is_file():
        _refuse_pickle_only(output_dir)
        raise ModelLoadError(f"{output_dir} has no {SAFETENSORS_NAME} to load into the given model.")
    device = next(model.parameters(), torch.empty(0)).device
    # load_model (not load_file + load_state_dict) restores tensors that save_model de-duplicated when shared.
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(weights), strict=False, device=str(device))
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        missing, unexpected, detail = [], [], f" ({_reason(exc).splitlines()[0]})"
    else:
        detail = ""
    if missing or unexpected or detail:
        raise ModelLoadError(
            f"{weights} does not match the given model{detail} (missing: {sorted(missing)[:5]}, unexpected: "
            f"{sorted(unexpected)[:5]}). Pass an instance built with the same architecture and arguments."
        )
    return model.eval()
