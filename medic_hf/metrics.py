"""Backdoor-evaluation metrics: pure functions on predictions and labels.

Inputs may be numpy arrays, lists or torch tensors of integer class ids (1-D, same length). Every function returns a
Python float in [0, 1] and raises ``ValueError`` on empty or mismatched inputs.

- clean accuracy (ACC / CA): predictions on clean test images vs their labels;
- attack success rate (ASR): predictions on *triggered* images whose true label != target, fraction predicted as
  the target;
- robust accuracy (RA): same triggered non-target images, fraction still predicted as their true class;
- defense effectiveness rating (DER, BackdoorBench): ``(max(0, dASR) - max(0, dACC) + 1) / 2``.

The metrics' names (the keys of results.json, metrics.json and the model cards) live here too, so that the scripts,
the cloner and the card agree; :func:`metric_name` names the accuracy measured on a named evaluation set.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "ATTACK_SUCCESS_RATE",
    "CLEAN_ACCURACY",
    "ROBUST_ACCURACY",
    "attack_success_rate",
    "clean_accuracy",
    "defense_effectiveness_rating",
    "metric_name",
    "robust_accuracy",
]

CLEAN_ACCURACY = "clean_accuracy"
ATTACK_SUCCESS_RATE = "attack_success_rate"
ROBUST_ACCURACY = "robust_accuracy"


def metric_name(eval_set: str) -> str:
    """The name of the accuracy measured on ``eval_set``, as MedicCloner's evaluation sets are named.

    The 'backdoor' set holds triggered non-target images labelled with the target class, so its accuracy is the
    ASR; 'clean' gives ``clean_accuracy``, and a single unnamed evaluation set ('eval') plain ``accuracy``.
    """
    if eval_set == "backdoor":
        return ATTACK_SUCCESS_RATE
    return "accuracy" if eval_set == "eval" else f"{eval_set}_accuracy"


def _as_1d_int(values: Any, name: str) -> np.ndarray:
    """Numpy 1-D integer array from a list, numpy array or torch tensor (moved to CPU)."""
    if hasattr(values, "detach"):  # torch tensor, without importing torch here
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one class id per image), got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise ValueError(f"{name} must hold integer class ids, got dtype {array.dtype}")
        array = array.astype(np.int64)
    return array


def _pair(preds: Any, labels: Any, labels_name: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    p = _as_1d_int(preds, "preds")
    y = _as_1d_int(labels, labels_name)
    if len(p) != len(y):
        raise ValueError(f"preds and {labels_name} differ in length: {len(p)} vs {len(y)}")
    if len(p) == 0:
        raise ValueError("preds and labels are empty")
    return p, y


def _non_target(preds: Any, true_labels: Any, target_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose true label != target (the only rows on which a backdoor can succeed)."""
    p, y = _pair(preds, true_labels, "true_labels")
    keep = y != int(target_class)
    if not keep.any():
        raise ValueError(f"every true label equals target_class={target_class}: nothing to measure")
    return p[keep], y[keep]


def clean_accuracy(preds: Any, labels: Any) -> float:
    """Fraction of ``preds`` equal to ``labels`` (predictions on clean images)."""
    p, y = _pair(preds, labels)
    return float(np.mean(p == y))


def attack_success_rate(preds: Any, true_labels: Any, target_class: int) -> float:
    """ASR: among triggered images whose true label != ``target_class``, the fraction predicted as the target.

    ``preds`` are predictions on triggered images; rows whose true label is the target are excluded (they would
    count as successes without any backdoor), so the backdoor test view and a full triggered test set give the same
    number.
    """
    p, _ = _non_target(preds, true_labels, target_class)
    return float(np.mean(p == int(target_class)))


def robust_accuracy(preds: Any, true_labels: Any, target_class: int) -> float:
    """RA: among triggered images whose true label != ``target_class``, the fraction predicted as the true label."""
    p, y = _non_target(preds, true_labels, target_class)
    return float(np.mean(p == y))


def _fraction(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1] (not a percentage), got {value}")
    return value


def defense_effectiveness_rating(asr_before: float, asr_after: float, acc_before: float, acc_after: float) -> float:
    """DER = (max(0, ASR_before - ASR_after) - max(0, ACC_before - ACC_after) + 1) / 2 (BackdoorBench).

    All four inputs are fractions in [0, 1] (not percentages). 1 is a perfect defense (ASR 1 -> 0, no accuracy
    loss), 0.5 a defense that changes nothing, 0 one that only destroys accuracy. An ASR increase or an accuracy gain
    counts as zero, as in BackdoorBench.
    """
    asr_before = _fraction(asr_before, "asr_before")
    asr_after = _fraction(asr_after, "asr_after")
    acc_before = _fraction(acc_before, "acc_before")
    acc_after = _fraction(acc_after, "acc_after")
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1.0) / 2.0
