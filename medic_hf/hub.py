"""Hugging Face Hub I/O: model cards for MEDIC-sanitized models and pushing saved folders to the Hub."""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub import constants as hf_constants

from .metrics import ATTACK_SUCCESS_RATE, CLEAN_ACCURACY

__all__ = ["build_model_card", "public_name", "push_folder_to_hub"]

_LIBRARY_NAMES = {"timm": "timm", "transformers": "transformers", "torch": "pytorch"}
_FAMILY_NAMES = {"timm": "a timm model", "transformers": "a transformers model", "torch": "a plain PyTorch model"}
# "org/name" ids only: single names are ambiguous with timm model names and local folders.
_REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_METRIC_LABELS = {
    CLEAN_ACCURACY: "Clean accuracy",
    "accuracy": "Clean accuracy",
    ATTACK_SUCCESS_RATE: "Attack success rate (ASR)",
    "asr": "Attack success rate (ASR)",
}
_REPO_PLACEHOLDER = "<namespace>/<repo-name>"
_UNSET: Any = object()  # base_model_id not given: derived from base_model


def _hub_repo_id(name: str | None) -> str | None:
    """Return ``name`` as a Hub repo id (dropping timm's ``hf-hub:`` prefix) if it looks like one, else None."""
    if not name:
        return None
    name = name.removeprefix("hf-hub:").split("@", 1)[0]
    if _REPO_ID_PATTERN.match(name) and not Path(name).exists():
        return name
    return None


def public_name(name: str | None) -> str | None:
    """A local path as its last component ("runs/resnet18-badnets" -> "resnet18-badnets"); other names as given."""
    if not name:
        return name
    path = Path(name).expanduser()
    if path.is_absolute() or path.exists() or name.startswith((".", "~")):
        return path.resolve().name or name
    return name


def _format_value(value: Any) -> str:
    """Render a value for a Markdown table cell."""
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(_format_value(v) for v in value)
    else:
        text = str(value)
    # A pipe would end the table cell early.
    return text.replace("|", "\\|").replace("\n", " ")


def _format_metric(name: str, value: Any) -> str:
    """Accuracies and rates given as fractions are shown as percentages."""
    if isinstance(value, float) and 0.0 <= value <= 1.0 and (name.endswith("accuracy") or name.endswith("rate")):
        return f"{100 * value:.2f}%"
    return _format_value(value)


def _metric_rows(
    before: Mapping[str, Any] | None, after: Mapping[str, Any] | None, sizes: Mapping[str, int] | None = None
) -> list[tuple[str, str, str, str]]:
    """Rows ``(label, before, after, images)`` for every metric given before or after cloning, first-seen order."""
    before, after, sizes = before or {}, after or {}, sizes or {}
    names = list(dict.fromkeys([*before, *after]))
    return [
        (
            _METRIC_LABELS.get(name, name.replace("_", " ").capitalize()),
            _format_metric(name, before[name]) if name in before else "—",
            _format_metric(name, after[name]) if name in after else "—",
            f"{sizes[name]:,}" if name in sizes else "—",
        )
        for name in names
    ]


def _usage_snippet(family: str, repo_id: str) -> str:
    """Python code that loads the uploaded model, for the card's "How to use" section."""
    if family == "timm":
        return f'import timm\n\nmodel = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()'
    if family == "transformers":
        return (
            "from transformers import AutoModelForImageClassification\n\n"
            f'model = AutoModelForImageClassification.from_pretrained("{repo_id}").eval()'
        )
    return (
        "from huggingface_hub import hf_hub_download\n"
        "from safetensors.torch import load_model\n\n"
        "model = MyModel()  # build the base model's architecture (see medic_model.json for its class)\n"
        f'load_model(model, hf_hub_download("{repo_id}", "model.safetensors"))\n'
        "model.eval()"
    )


def _code_or_link(name: str, repo_id: str | None, repo_type: str = "") -> str:
    if repo_id is None:
        return f"`{name}`"
    return f"[`{repo_id}`]({hf_constants.ENDPOINT}/{repo_type}{repo_id})"


def build_model_card(
    *,
    base_model: str | None,
    family: str,
    dataset: str | None,
    clean_samples: int | None,
    hyperparameters: Mapping[str, Any],
    metrics_before: Mapping[str, Any] | None,
    metrics_after: Mapping[str, Any] | None,
    library_name: str | None = None,
    extra: str | None = None,
    repo_id: str | None = None,
    base_model_id: str | None = _UNSET,
    eval_sizes: Mapping[str, int] | None = None,
    license: str | None = None,
    warnings: list[str] | None = None,
    student_base: str | None = None,
    student_base_id: str | None = None,
    frozen_modules: list[str] | None = None,
) -> ModelCard:
    """Build the model card (README.md) of a MEDIC-sanitized model.

    Args:
        base_model: the teacher's name as shown on the card: a Hub id, timm name, folder name or architecture
            (None if unknown).
        base_model_id: the Hub id for the card's ``base_model`` metadata (which makes the Hub list this model as a
            derivative of it), or None for none. By default, ``base_model`` when it looks like a Hub id.
        family: ``"timm"``, ``"transformers"`` or ``"torch"`` (see ``medic_hf.modeling.model_family``).
        dataset: the clean data used for cloning (a Hub dataset id goes into the ``datasets`` metadata).
        clean_samples: number of clean images used.
        hyperparameters: cloning hyperparameters and what ran, shown as a table.
        metrics_before / metrics_after: metrics of the teacher and of the sanitized model, e.g.
            ``{"clean_accuracy": 0.93, "attack_success_rate": 0.99}``; either or both may be None. They also go
            into the Hub's ``model-index`` metadata.
        eval_sizes: metric name -> number of evaluation images it was measured on.
        library_name: Hub library tag; defaults from ``family`` (timm, transformers, pytorch).
        extra: Markdown appended in an "Additional information" section.
        repo_id: the repo the card is for, used in the loading snippet (a placeholder when None).
        license: the license id for the metadata; None writes "unknown" and a note that the teacher's applies.
        warnings: sentences shown in a warning section at the top of the card (e.g. a large accuracy drop).
        student_base: the trusted pretrained base the student started from (None: a fresh random initialisation);
            ``student_base_id``, its Hub id, is added to the ``base_model`` metadata.
        frozen_modules: the student's modules kept at the base's values (the first ones, in model order).
    """
    library_name = library_name or _LIBRARY_NAMES.get(family, "pytorch")
    base_repo_id = _hub_repo_id(base_model) if base_model_id is _UNSET else base_model_id
    dataset_repo_id = _hub_repo_id(dataset)
    # A card is published: local paths say nothing to its readers and leak the author's file system.
    base_model = public_name(base_model) if base_repo_id is None else base_model
    dataset = public_name(dataset) if dataset_repo_id is None else dataset
    family_name = _FAMILY_NAMES.get(family, family)
    if base_model:
        teacher_name = base_model.removeprefix("hf-hub:")
        title = f"MEDIC-sanitized {teacher_name.rstrip('/').split('/')[-1]}"
        teacher_markdown = _code_or_link(teacher_name, base_repo_id)
    else:
        title = "MEDIC-sanitized model"
        teacher_markdown = f"a user-provided image classifier ({family_name})"
    eval_sizes = dict(eval_sizes or {})
    base_ids = [i for i in (base_repo_id, student_base_id) if i]
    student_base = public_name(student_base) if student_base_id is None else student_base
    card_data = ModelCardData(
        library_name=library_name,
        license=license or "unknown",
        tags=["medic", "backdoor-removal", "image-classification", family],
        pipeline_tag="image-classification",
        base_model=base_ids[0] if len(base_ids) == 1 else (base_ids or None),
        datasets=[dataset_repo_id] if dataset_repo_id else None,
        model_name=title,
        eval_results=_eval_results(metrics_before, metrics_after, dataset, dataset_repo_id) or None,
    )
    template_path = resources.files("medic_hf") / "templates" / "model_card.md"
    with resources.as_file(template_path) as path:
        return ModelCard.from_template(
            card_data=card_data,
            template_path=str(path),
            title=title,
            family_name=family_name,
            teacher_markdown=teacher_markdown,
            dataset_markdown=_code_or_link(dataset, dataset_repo_id, "datasets/") if dataset else None,
            clean_samples=clean_samples,
            hyperparameter_rows=[(_format_value(k), _format_value(v)) for k, v in hyperparameters.items()],
            metric_rows=_metric_rows(metrics_before, metrics_after, eval_sizes),
            usage_snippet=_usage_snippet(family, repo_id or _REPO_PLACEHOLDER),
            license_known=license is not None,
            warnings=warnings or [],
            student_base_markdown=_code_or_link(student_base, student_base_id) if student_base else None,
            frozen_modules=list(frozen_modules or []),
            extra=extra,
        )


def _eval_results(
    before: Mapping[str, Any] | None, after: Mapping[str, Any] | None, dataset: str | None, dataset_id: str | None
) -> list[EvalResult]:
    """The Hub's model-index entries: each metric after MEDIC, and the teacher's before it."""
    name = dataset_id or (Path(dataset).name if dataset else "clean evaluation set")
    results = []
    for when, metrics in (("", after or {}), (" of the trojaned teacher (before MEDIC)", before or {})):
        for metric, value in metrics.items():
            if not isinstance(value, (int, float)):
                continue
            results.append(
                EvalResult(
                    task_type="image-classification",
                    dataset_type=dataset_id or name,
                    dataset_name=name,
                    metric_type="accuracy" if metric.endswith("accuracy") else metric,
                    metric_value=round(float(value), 6),
                    metric_name=_METRIC_LABELS.get(metric, metric) + when,
                )
            )
    return results


# Trainer checkpoints (optimizer state, for resuming) stay local; the Hub gets the model, its card and results.
CHECKPOINT_PATTERNS = ["checkpoint-*"]


def push_folder_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload MEDIC-sanitized model",
    revision: str | None = None,
) -> str:
    """Upload a saved model folder to a Hub model repo (created if needed) and return the repo URL.

    The folder is only read; its Trainer ``checkpoint-*`` folders are not uploaded. On any failure a
    ``RuntimeError`` explains that the local copy is intact and how to retry, so hours of cloning are never lost
    to a network or permission problem.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Cannot push {folder}: it is not a folder.")
    try:
        api = HfApi(token=token)
        repo_url = api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
        # create_repo resolves an implicit namespace ("name" -> "user/name").
        resolved_id = getattr(repo_url, "repo_id", None)
        resolved_id = resolved_id if isinstance(resolved_id, str) else repo_id
        if revision is not None:
            api.create_branch(resolved_id, branch=revision, exist_ok=True)
        api.upload_folder(
            repo_id=resolved_id,
            folder_path=str(folder),
            commit_message=commit_message,
            revision=revision,
            repo_type="model",
            ignore_patterns=CHECKPOINT_PATTERNS,
        )
    except Exception as exc:
        raise RuntimeError(
            f"Pushing {folder} to the Hub repo {repo_id!r} failed: {str(exc).rstrip('.')}. "
            f"The local folder is intact at {folder.resolve()}. To retry, log in with `hf auth login` (or "
            f"`huggingface-cli login`, or pass token=...) and run `hf upload {repo_id} {folder.resolve()}`."
        ) from exc
    return str(repo_url) if isinstance(repo_url, str) else f"{hf_constants.ENDPOINT}/{resolved_id}"
