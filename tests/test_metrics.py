"""Tests of medic_hf.metrics on hand-made predictions with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medic_hf.metrics import attack_success_rate, clean_accuracy, defense_effectiveness_rating, robust_accuracy


def test_clean_accuracy_input_types():
    preds, labels = [0, 1, 2, 3], [0, 1, 0, 3]
    assert clean_accuracy(preds, labels) == 0.75
    assert clean_accuracy(np.array(preds), np.array(labels)) == 0.75
    assert clean_accuracy(torch.tensor(preds), torch.tensor(labels)) == 0.75
    assert isinstance(clean_accuracy(torch.tensor(preds), labels), float)
    assert clean_accuracy([1.0, 2.0], [1, 2]) == 1.0  # integral floats are accepted


def test_attack_success_rate_excludes_target_rows():
    # target 0; true labels: 0 (excluded), 1, 2, 3, 4 -> predictions 0, 0, 2, 0, 0 -> 3 of 4 non-target hit
    assert attack_success_rate([0, 0, 2, 0, 0], [0, 1, 2, 3, 4], target_class=0) == 0.75
    assert attack_success_rate([5, 5], [1, 2], target_class=5) == 1.0
    assert attack_success_rate([1, 2], [1, 2], target_class=5) == 0.0


def test_robust_accuracy():
    # target 0; non-target rows: (pred 1, true 1) ok, (0, 2) hijacked, (3, 3) ok, (1, 4) wrong -> 2 / 4
    assert robust_accuracy([0, 1, 0, 3, 1], [0, 1, 2, 3, 4], target_class=0) == 0.5
    assert robust_accuracy(torch.tensor([9, 9]), torch.tensor([1, 2]), target_class=9) == 0.0


def test_defense_effectiveness_rating():
    assert defense_effectiveness_rating(1.0, 0.05, 0.9, 0.88) == pytest.approx((0.95 - 0.02 + 1) / 2)
    assert defense_effectiveness_rating(1.0, 0.05, 0.9, 0.88) == pytest.approx(0.965)
    assert defense_effectiveness_rating(1.0, 0.0, 0.9, 0.9) == 1.0  # perfect defense
    assert defense_effectiveness_rating(0.9, 0.9, 0.9, 0.9) == 0.5  # no change
    assert defense_effectiveness_rating(0.9, 0.95, 0.9, 0.95) == 0.5  # ASR rise and ACC gain both count as 0
    assert defense_effectiveness_rating(0.0, 0.0, 1.0, 0.0) == 0.0  # only destroys accuracy


def test_errors():
    with pytest.raises(ValueError, match="empty"):
        clean_accuracy([], [])
    with pytest.raises(ValueError, match="length"):
        clean_accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="1-D"):
        clean_accuracy([[0, 1]], [[0, 1]])
    with pytest.raises(ValueError, match="integer"):
        clean_accuracy([0.5], [0])
    with pytest.raises(ValueError, match="target_class"):
        attack_success_rate([0, 0], [0, 0], target_class=0)
    with pytest.raises(ValueError, match="length"):
        robust_accuracy([0, 1, 2], [1, 2], target_class=0)
    with pytest.raises(ValueError, match="percentage"):
        defense_effectiveness_rating(100.0, 5.0, 90.0, 88.0)
