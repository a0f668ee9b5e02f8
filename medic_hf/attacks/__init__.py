"""Backdoor attacks used to evaluate sanitisation: poison a training set, build the triggered test view.

Example::

    from medic_hf.attacks import BadNets

    attack = BadNets(target_class=0, poison_rate=0.1, seed=0)
    poisoned_train, rows = attack.poison_dataset(train)  # new Dataset with a boolean "poisoned" column
    asr_view = attack.backdoor_test_view(test)  # non-target images, triggered, labelled 0, with "true_label"
    attack.save("runs/badnets")  # writes runs/badnets/attack.json; load_attack("runs/badnets") reads it back
"""

from __future__ import annotations

import json
import os
from typing import Any

from .badnets import BadNets
from .base import ATTACK_FILE, Attack
from .blended import Blended
from .composite import Composite
from .label_consistent import LabelConsistent
from .sig import SIG
from .wanet import WaNet

#: attack name (the ``"name"`` key of ``to_dict()``) -> class
ATTACKS: dict[str, type[Attack]] = {
    "badnets": BadNets,
    "blended": Blended,
    "sig": SIG,
    "wanet": WaNet,
    "label_consistent": LabelConsistent,
    "composite": Composite,
}


def attack_from_dict(d: dict[str, Any]) -> Attack:
    """Rebuild any attack from its ``to_dict()`` output, dispatching on the ``"name"`` key."""
    if "name" not in d:
        raise ValueError(f"attack dict has no 'name' key; known attacks: {sorted(ATTACKS)}")
    if d["name"] not in ATTACKS:
        raise ValueError(f"unknown attack {d['name']!r}; known attacks: {sorted(ATTACKS)}")
    return ATTACKS[d["name"]].from_dict(d)


def load_attack(folder: str | os.PathLike) -> Attack:
    """Load the attack saved by ``attack.save(folder)`` (reads ``folder/attack.json``)."""
    with open(os.path.join(folder, ATTACK_FILE)) as f:
        return attack_from_dict(json.load(f))


__all__ = [
    "ATTACKS",
    "ATTACK_FILE",
    "Attack",
    "BadNets",
    "Blended",
    "Composite",
    "LabelConsistent",
    "SIG",
    "WaNet",
    "attack_from_dict",
    "load_attack",
]
