"""Baseline backdoor defenses that MEDIC is compared with, behind one interface.

Every defense is a function ``defense(model, clean_data, config=None) -> nn.Module`` with a config dataclass:
a (possibly trojaned) timm / transformers / plain PyTorch classifier and a clean data set in, a repaired model of the
same class out (in eval mode, on the input's device, with a ``defense_report`` dict attribute). The input model is
never modified. ``clean_data`` is a ``datasets.Dataset`` with an image and a label column (or ready
``pixel_values`` / ``labels``), or a torch data set of ``(image, label)`` items. See docs/defenses.md.

``DEFENSES`` maps short names to ``(function, config class)``.
"""

from collections.abc import Callable

from ..config import MedicConfig
from ._training import DefenseConfig
from .anp import ANPConfig, anp, prune_by_threshold
from .cloning import PlainCloneConfig, medic, plain_clone
from .distillation import DistillationConfig, distill_logits
from .fine_pruning import FinePruningConfig, fine_prune
from .fine_tuning import FineTuningConfig, fine_tune
from .mcr import MCRConfig, bezier_coefficients, curve_point, mcr
from .nad import NADConfig, attention_map, nad
from .scratch import ScratchConfig, train_from_scratch

DEFENSES: dict[str, tuple[Callable, type]] = {
    "ft": (fine_tune, FineTuningConfig),
    "fp": (fine_prune, FinePruningConfig),
    "nad": (nad, NADConfig),
    "anp": (anp, ANPConfig),
    "mcr": (mcr, MCRConfig),
    "medic": (medic, MedicConfig),
    "clone": (plain_clone, PlainCloneConfig),
    "scratch": (train_from_scratch, ScratchConfig),
    "kd": (distill_logits, DistillationConfig),
}

__all__ = [
    "ANPConfig",
    "DEFENSES",
    "DefenseConfig",
    "DistillationConfig",
    "FinePruningConfig",
    "FineTuningConfig",
    "MCRConfig",
    "MedicConfig",
    "NADConfig",
    "PlainCloneConfig",
    "ScratchConfig",
    "anp",
    "attention_map",
    "bezier_coefficients",
    "curve_point",
    "distill_logits",
    "fine_prune",
    "fine_tune",
    "mcr",
    "medic",
    "nad",
    "plain_clone",
    "prune_by_threshold",
    "train_from_scratch",
]
