"""Model handling for MEDIC: loading untrusted teachers safely, building fresh students, dropout control and saving.

MEDIC clones a possibly-trojaned *teacher* into a *student* of the teacher's exact architecture that starts from a
fresh random initialisation. This module knows how to do that for three model families:

* ``"timm"``: models built by ``timm.create_model``;
* ``"transformers"``: ``transformers.PreTrainedModel`` subclasses (e.g. ``ViTForImageClassification``);
* ``"torch"``: any other ``nn.Module``.

Security: teachers come from strangers, so nothing here ever unpickles arbitrary objects. Weights are read from
safetensors files or with ``torch.load(..., weights_only=True)``; remote code runs only when the caller passes
``trust_remote_code=True`` explicitly.

The code lives in private modules, one per concern: ``_family`` (families and forward passes), ``_loading``
(safe loading: Hub ids, timm names, safetensors, pickle refusal), ``_student`` (fresh students), ``_dropout``
(dropout control) and ``_saving`` (native saving and re-loading). Import from ``medic_hf.modeling``.
"""

from ._dropout import disable_dropout, dropout_disabled
from ._family import _select_logits as _select_logits
from ._family import forward_logits, model_family, num_classes
from ._loading import (
    PICKLE_SUFFIXES,
    PLAIN_METADATA_NAME,
    SAFETENSORS_NAME,
    ModelLoadError,
    load_model,
    load_state_dict_file,
)
from ._saving import load_native, save_native
from ._student import _copy_without_hooks as _copy_without_hooks
from ._student import make_student, student_from_base, student_seed

__all__ = [
    "PICKLE_SUFFIXES",
    "PLAIN_METADATA_NAME",
    "SAFETENSORS_NAME",
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
    "student_from_base",
    "student_seed",
]
