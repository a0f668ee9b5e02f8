"""Model handling for MEDIC: loading untrusted teachers safely, building fresh students, dropout control and saving.

MEDIC clones a possibly-trojaned *teacher* into a *student* of the teacher's exact architecture that starts from a
fresh random initialisation. This module knows how to do that for three model families:

* ``"timm"``: models built by ``timm.create_model``;
* ``"transformers"``: ``transformers.PreTrainedModel`` subclasses (e.g. ``ViTForImageClassification``);
* ``"torch"``: any other ``nn.Module``.

Security: teachers come from strangers, so nothing here ever unpickles arbitrary objects. Weights are read from
safetensors files or with ``torch.load(..., weights_only=True)``; remote code runs only when the caller passes
``trust_remote_code=True`` explicitly.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import pickle
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "ModelLoadError",
    "disable_dropout",
    "dropout_disabled",
    "forward_logits",
    "load_model",
    "load_native",
    "load_state_dict_file",
    "make_student",
    "model_family",
    "num_classes",
    "save_native",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".tar")
SAFETENSORS_NAME = "model.safetensors"
PLAIN_METADATA_NAME = "medic_model.json"
# Hub ids are "name" or "org/name", optionally prefixed by "hf-hub:" for timm.
_HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)

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
# Families and forward passes
# --------------------------------------------------------------------------------------------------------------------


def model_family(model: nn.Module) -> str:
    """Return ``"transformers"``, ``"timm"`` or ``"torch"`` for ``model``.

    transformers is checked first because some transformers models wrap timm ones (``TimmWrapper``).
    """
    # A model can only be a PreTrainedModel if transformers is already imported; checking sys.modules avoids
    # importing the (slow) modeling stack just to answer "no".
    transformers = sys.modules.get("transformers")
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        return "transformers"
    if getattr(model, "pretrained_cfg", None) is not None or type(model).__module__.startswith("timm."):
        return "timm"
    return "torch"


def _select_logits(output: Any) -> torch.Tensor:
    """Pick the logits out of a model's forward output (tensor, ModelOutput, dict or tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping):
        if "logits" in output:
            return output["logits"]
        output = tuple(output.values())
    if isinstance(output, (tuple, list)) and output:
        # By convention the classification logits come first (e.g. timm distilled heads in training mode).
        return _select_logits(output[0])
    raise TypeError(f"Cannot find logits in a model output of type {type(output).__name__}.")


def forward_logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Run ``model`` on a batch of images and return the class logits, shape ``(batch, num_classes)``."""
    if model_family(model) == "transformers":
        return _select_logits(model(pixel_values=pixel_values))
    return _select_logits(model(pixel_values))


def num_classes(model: nn.Module) -> int | None:
    """Number of output classes: timm's ``num_classes``, transformers' ``config.num_labels``, or the last Linear."""
    if model_family(model) == "transformers":
        return int(model.config.num_labels)
    value = getattr(model, "num_classes", None)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    last_linear = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last_linear = module
    return last_linear.out_features if last_linear is not None else None


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


# --------------------------------------------------------------------------------------------------------------------
# Fresh students
# --------------------------------------------------------------------------------------------------------------------


def make_student(teacher: nn.Module, *, seed: int | None = None) -> nn.Module:
    """Build a freshly initialised model of the teacher's exact architecture, ready to be trained by cloning.

    The student has the teacher's class, state-dict keys, shapes, dtypes and device; it is in train mode with every
    parameter trainable, and shares no weights with the teacher.

    * transformers: ``type(teacher)._from_config(copy of teacher.config)``, i.e. the library's own initialisation.
    * timm: ``timm.create_model(architecture, pretrained=False, **creation kwargs)``. Recent timm (1.0.31 here) records
      the creation kwargs (``depth``, ``img_size``, drop rates, ...) on the model, so this reproduces timm's own
      initialisation exactly. If that is impossible (older timm, a model changed after creation) the teacher is
      deep-copied and re-initialised with ``reset_parameters()`` on each module plus the model's ``init_weights()``.
    * plain PyTorch: a deep copy whose modules are reset with ``reset_parameters()`` / ``reset_running_stats()``.
      A parameter owned by a module without ``reset_parameters()`` raises ``ValueError``.

    Afterwards the state-dict keys and shapes are checked against the teacher's, and every floating-point parameter
    with more than one element must differ from the teacher's unless the teacher's is constant (a zero bias or unit
    norm weight of an untrained teacher legitimately equals its fresh initial value).

    Args:
        teacher: the model to clone.
        seed: seeds the initialisation (without changing the global RNG state) for reproducible students.

    Raises:
        ValueError: the student cannot be initialised reliably; the message names the parameter and the fix.
    """
    student = _fresh_model(teacher, seed)
    _match_placement(student, teacher)
    student.train()
    for param in student.parameters():
        param.requires_grad_(True)
    _check_student(student, teacher, lambda: _fresh_model(teacher, (seed or 0) + 1))
    return student


def student_from_base(
    base: str | Path | nn.Module, teacher: nn.Module, *, seed: int | None = None, trust_remote_code: bool = False
) -> nn.Module:
    """The student of a transfer-learned teacher, started from the trusted pretrained weights it was fine-tuned from.

    ``base`` is loaded under the teacher's rules (``load_model``: safetensors only, no remote code unless asked): a
    timm name with a pretrained tag, an ``hf-hub:`` id, a transformers Hub id or a local folder; or an
    ``nn.Module``. It must be the teacher's architecture: the same state-dict keys and shapes, except the
    classifier's when the base was trained for another number of classes. Then the student is a fresh model of the
    teacher's exact configuration (``make_student``) holding the base's values everywhere but in that classifier,
    which keeps its fresh initialisation.

    Raises:
        ValueError: naming the first parameter that does not fit, when the base is another architecture.
    """
    base_model = load_model(base, trust_remote_code=trust_remote_code) if isinstance(base, (str, Path)) else base
    student = make_student(teacher, seed=seed)
    student_state, base_state = student.state_dict(), base_model.state_dict()
    missing = [k for k in student_state if k not in base_state]
    unexpected = [k for k in base_state if k not in student_state]
    if missing or unexpected:
        raise ValueError(
            f"The base {_display(base)} is not the teacher's architecture: the teacher has parameters the base lacks "
            f"({missing[:3]}) and the base has parameters the teacher lacks ({unexpected[:3]}). Pass the pretrained "
            "weights the teacher was fine-tuned from."
        )
    teacher_classes, base_classes = num_classes(teacher), num_classes(base_model)
    fresh_head = []
    with torch.no_grad():
        for key, value in student_state.items():
            source = base_state[key]
            if source.shape == value.shape:
                value.copy_(source.to(value.dtype))
            elif _differs_by_classes(source.shape, value.shape, base_classes, teacher_classes):
                fresh_head.append(key)  # the classifier, made for other classes: keep its fresh initialisation
            else:
                raise ValueError(
                    f"The base {_display(base)} does not fit the teacher at {key}: shape {tuple(source.shape)} in the "
                    f"base, {tuple(value.shape)} in the teacher. The base must be the teacher's architecture (only "
                    "the classifier may differ, by its number of classes)."
                )
    if fresh_head:
        logger.warning(
            "The base has %s classes and the teacher %s: the student's classifier (%s) is freshly initialised.",
            base_classes,
            teacher_classes,
            ", ".join(fresh_head),
        )
    student.fresh_classifier = fresh_head
    return student


def _differs_by_classes(base_shape, teacher_shape, base_classes, teacher_classes) -> bool:
    """True when the shapes differ only where the base has its class count and the teacher its own."""
    if base_classes is None or teacher_classes is None or len(base_shape) != len(teacher_shape):
        return False
    pairs = [(b, t) for b, t in zip(base_shape, teacher_shape) if b != t]
    return bool(pairs) and all(b == base_classes and t == teacher_classes for b, t in pairs)


def _display(base) -> str:
    return repr(str(base)) if isinstance(base, (str, Path)) else type(base).__name__


def _fresh_model(teacher: nn.Module, seed: int | None) -> nn.Module:
    family = model_family(teacher)
    with _seeded(seed):
        if family == "transformers":
            return _transformers_student(teacher)
        if family == "timm":
            return _timm_student(teacher)
        return _reinitialised_copy(teacher, use_init_weights=False)


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed the CPU RNG for the block and restore the caller's RNG state afterwards."""
    if seed is None:
        yield
        return
    # Students are initialised on the CPU and moved afterwards, so only the CPU generator matters. The generator is
    # seeded with a value derived from `seed`, not `seed` itself: an untrained teacher built right after
    # set_seed(seed) would otherwise be re-created exactly.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(student_seed(seed))
        yield


def student_seed(seed: int) -> int:
    """The seed of the student's initialisation for a run seeded with `seed` (a fixed hash of it)."""
    digest = hashlib.sha256(f"medic_hf student {seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def _transformers_student(teacher: nn.Module) -> nn.Module:
    config = copy.deepcopy(teacher.config)
    # _from_config runs the library's own weight initialisation (post_init); _check_student verifies it happened.
    # No dtype argument (transformers 4 calls it torch_dtype): _match_placement copies the teacher's dtypes.
    return type(teacher)._from_config(config)


def _timm_student(teacher: nn.Module) -> nn.Module:
    """Recreate the teacher with timm's factory, falling back to a re-initialised copy."""
    architecture = (teacher.pretrained_cfg or {}).get("architecture")
    if architecture:
        try:
            student = _recreate_timm(teacher, architecture)
        except Exception as exc:  # any factory failure means the kwargs are not recoverable
            logger.info(
                "timm.create_model(%r) could not rebuild the teacher (%s); re-initialising a copy.", architecture, exc
            )
        else:
            if _same_structure(student, teacher):
                return student
            logger.info(
                "timm.create_model(%r) did not reproduce the teacher's state dict; re-initialising a copy.",
                architecture,
            )
    return _reinitialised_copy(teacher, use_init_weights=True)


def _recreate_timm(teacher: nn.Module, architecture: str) -> nn.Module:
    import timm

    # _model_args holds the creation kwargs (drop rates included); get_model_args adds changes made after
    # creation, such as reset_classifier(num_classes). Older timm versions lack them and take the fallback path.
    args = dict(getattr(teacher, "_model_args", {}))
    get_model_args = getattr(timm.models, "get_model_args", None)
    if get_model_args is not None:
        args.update(get_model_args(teacher))
    args["num_classes"] = teacher.num_classes
    student = timm.create_model(architecture, pretrained=False, **args)
    # Keep the teacher's preprocessing config (mean/std, input size) so exports of the student describe it correctly.
    student.pretrained_cfg = copy.deepcopy(teacher.pretrained_cfg)
    student.default_cfg = student.pretrained_cfg
    return student


def _same_structure(student: nn.Module, teacher: nn.Module) -> bool:
    student_sd, teacher_sd = student.state_dict(), teacher.state_dict()
    return student_sd.keys() == teacher_sd.keys() and all(
        student_sd[k].shape == teacher_sd[k].shape for k in teacher_sd
    )


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _copy_without_hooks(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that carries none of its hooks (e.g. another cloner's activation captures)."""
    saved = {}
    for module in model.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(module, attr, None)
            if hooks:
                saved[(id(module), attr)] = (module, hooks.copy())
                hooks.clear()
    try:
        return copy.deepcopy(model)
    finally:
        for (_, attr), (module, hooks) in saved.items():
            getattr(module, attr).update(hooks)


def _reinitialised_copy(teacher: nn.Module, *, use_init_weights: bool) -> nn.Module:
    """Deep-copy ``teacher`` and re-initialise every parameter, refusing parameters nothing resets."""
    student = _copy_without_hooks(teacher)
    covered = set()
    for module in student.modules():
        reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
        if callable(reset):
            reset()
            covered.update(id(p) for p in module.parameters(recurse=False))
        if callable(getattr(module, "reset_running_stats", None)):
            module.reset_running_stats()
    init_weights = getattr(student, "init_weights", None)
    if use_init_weights and callable(init_weights):
        # timm models' init_weights re-applies their init scheme, including naked parameters such as ViT's
        # pos_embed; _check_student then verifies that nothing kept the teacher's values.
        init_weights()
        return student
    naked = [(name, p) for name, p in student.named_parameters() if id(p) not in covered]
    if naked:
        # Parameters owned directly by a module without reset_parameters(): position embeddings, class tokens,
        # relative-position tables (torchvision's ViT and Swin). timm and torchvision initialise those with a
        # (truncated) normal of std 0.02; never keep the teacher's, possibly trojaned, values.
        with torch.no_grad():
            for _, param in naked:
                nn.init.trunc_normal_(param, std=0.02)
        names = ", ".join(name for name, _ in naked[:6]) + (f" and {len(naked) - 6} more" if len(naked) > 6 else "")
        logger.warning(
            "Re-initialised parameter(s) %s with a truncated normal (std 0.02): their module has no "
            "reset_parameters(). For another initialisation, give that module a reset_parameters() method or pass "
            "a freshly initialised student.",
            names,
        )
    return student


def _match_placement(student: nn.Module, teacher: nn.Module) -> None:
    """Give each student parameter and buffer the device and dtype of the teacher's tensor of the same name."""
    teacher_params = dict(teacher.named_parameters())
    for name, param in student.named_parameters():
        ref = teacher_params.get(name)
        if ref is not None and (param.device != ref.device or param.dtype != ref.dtype):
            param.data = param.data.to(device=ref.device, dtype=ref.dtype)
    teacher_buffers = dict(teacher.named_buffers())
    for name, buffer in student.named_buffers():
        ref = teacher_buffers.get(name)
        if ref is not None and (buffer.device != ref.device or buffer.dtype != ref.dtype):
            module_name, _, attr = name.rpartition(".")
            student.get_submodule(module_name)._buffers[attr] = buffer.to(device=ref.device, dtype=ref.dtype)


def _is_constant(tensor: torch.Tensor) -> bool:
    flat = tensor.detach().flatten()
    return bool((flat == flat[0]).all())


def _check_student(student: nn.Module, teacher: nn.Module, another_fresh: Callable[[], nn.Module]) -> None:
    """Verify the student matches the teacher's structure and kept none of its (non-constant) weights.

    A parameter equal to the teacher's is allowed only when the architecture initialises it the same way whatever
    the seed (`another_fresh()` builds a second student with another seed): e.g. timm ConViT's identity `v.weight`.
    """
    if not _same_structure(student, teacher):
        student_sd, teacher_sd = student.state_dict(), teacher.state_dict()
        diff = sorted(set(student_sd).symmetric_difference(teacher_sd)) or [
            k for k in teacher_sd if student_sd[k].shape != teacher_sd[k].shape
        ]
        raise ValueError(
            f"The student's state dict differs from the teacher's (first differences: {diff[:5]}). Build a freshly "
            "initialised student of the same architecture yourself and pass it in."
        )
    teacher_params = dict(teacher.named_parameters())
    equal = []
    for name, param in student.named_parameters():
        ref = teacher_params[name]
        if param is ref or (param.numel() > 0 and param.data_ptr() == ref.data_ptr()):
            raise ValueError(f"Student parameter {name} shares memory with the teacher's.")
        # Constant tensors (zero biases, unit norm weights, layer-scale) legitimately equal an untrained teacher's.
        if ref.is_floating_point() and ref.numel() > 1 and not _is_constant(ref) and torch.equal(param, ref):
            equal.append(name)
    if equal:
        other = dict(another_fresh().named_parameters())
        seeded = dict(student.named_parameters())
        equal = [name for name in equal if not torch.equal(other[name].to(seeded[name]), seeded[name])]
    if not equal:
        return
    if all(torch.equal(p, teacher_params[n]) for n, p in student.named_parameters()):
        raise ValueError(
            f"The student's fresh initialisation equals the teacher's weights exactly (e.g. {equal[0]}): the teacher "
            "looks untrained and initialised from the same random state. Train the teacher (or load its weights), "
            "or pass another seed."
        )
    raise ValueError(
        f"Student parameter {equal[0]} still equals the teacher's after re-initialisation. Fix: give the module that "
        "owns it a reset_parameters() method, or build a freshly initialised student yourself."
    )


# --------------------------------------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------------------------------------


def _dropout_settings(model: nn.Module) -> list[tuple[Any, str]]:
    """List ``(object, attribute)`` pairs that hold a dropout-like probability used by ``model``.

    Covers ``nn.Dropout*.p``, timm ``DropPath.drop_prob``, and float module attributes whose name contains "drop",
    which models read functionally at forward time (timm ResNet's ``drop_rate``, transformers ViT's
    ``attention_dropout``, ``nn.MultiheadAttention.dropout``).

    A transformers ``config`` is deliberately left alone: image models copy its rates into modules at construction,
    and changing it would leak zero dropout into any ``config.json`` saved while dropout is disabled.
    """
    settings = []
    seen = set()

    def add(owner: Any, attr: str) -> None:
        if (id(owner), attr) not in seen:
            seen.add((id(owner), attr))
            settings.append((owner, attr))

    for module in model.modules():
        if isinstance(module, _DROPOUT_MODULES):
            add(module, "p")
        for attr, value in vars(module).items():
            if "drop" in attr.lower() and isinstance(value, float):
                add(module, attr)
    return settings


def disable_dropout(model: nn.Module) -> Callable[[], None]:
    """Set every dropout / drop-path rate in ``model`` to 0 and return a function that restores the old values.

    Use this across a long training run; prefer :func:`dropout_disabled` for a block of code. Only modules are
    changed (never a transformers config or timm's recorded creation kwargs), so saving the model while dropout is
    disabled still writes the original rates.
    """
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr in _dropout_settings(model)]
    for owner, attr, _ in saved:
        setattr(owner, attr, 0.0)

    def restore() -> None:
        # Reverse order so an attribute listed twice ends with its original value.
        for owner, attr, value in reversed(saved):
            setattr(owner, attr, value)

    return restore


@contextlib.contextmanager
def dropout_disabled(*models: nn.Module) -> Iterator[None]:
    """Context manager: dropout and stochastic depth off in all ``models`` inside the block, restored afterwards."""
    restores = []
    try:
        for model in models:
            restores.append(disable_dropout(model))
        yield
    finally:
        for restore in reversed(restores):
            restore()


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
