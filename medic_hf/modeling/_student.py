"""Fresh students: a freshly initialised model of the teacher's exact architecture, or one from a trusted base."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from ._family import model_family, num_classes
from ._loading import load_model

logger = logging.getLogger(__name__)


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
