"""benchmarks/default_study.py's report: run names, the grid table and the ASR-by-gap table, on hand-made results."""

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "default_study.py"


def load_script():
    spec = importlib.util.spec_from_file_location("default_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["default_study"] = module
    spec.loader.exec_module(module)
    return module


def result(after_acc: float, after_asr: float, curve: list[tuple[int, float, float]]) -> dict:
    history = []
    for epoch, accuracy, asr in curve:
        history += [{"epoch": epoch, "eval_clean_accuracy": accuracy}, {"epoch": epoch, "eval_backdoor_accuracy": asr}]
    return {
        "before": {"clean_accuracy": 0.80, "attack_success_rate": 0.99},
        "after": {"clean_accuracy": after_acc, "attack_success_rate": after_asr},
        "history": history,
    }


def write(root: Path, model: str, setting: str, seed: int, data: dict) -> None:
    path = root / "runs" / model / setting / f"seed{seed}" / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))


def test_run_names_mark_budget_and_data():
    study = load_script()
    assert study.run_name("models/badnets", "ema", 1, 30, 0.05) == "badnets/ema/seed1"
    assert study.run_name("models/badnets", "ema", 0, 60, 0.1) == "badnets/ema-e60-cf0.1/seed0"


def test_grid_and_gap_tables_from_hand_made_runs(tmp_path):
    study = load_script()
    # seed 0: 3 points lost, 2% ASR; seed 1: 1 point lost, 10% ASR -> mean 2.00 / 6.00; highest: 90% (epoch 5)
    write(tmp_path, "m", "defaults", 0, result(0.77, 0.02, [(5, 0.5, 0.9), (10, 0.77, 0.02)]))
    write(tmp_path, "m", "defaults", 1, result(0.79, 0.10, [(10, 0.785, 0.12), (15, 0.79, 0.10)]))
    write(tmp_path, "m", "ema", 0, result(0.81, 0.04, [(10, 0.81, 0.04)]))  # above the teacher: gap < 0
    found = study.load_results(tmp_path)
    grid = study.grid_table(found, ["m"], ["defaults", "ema", "top10"])
    row = grid.splitlines()[-1]
    assert row == "| `m` (80.00%, 99.0% ASR) | **2.00 / 6.00 / 90.00 (2)** | -1.00 / 4.00 / 4.00 (1) | – |"
    gaps = {line.split(" | ")[0][2:]: line.split(" | ")[1] for line in study.gap_table(found, ["m"]).splitlines()[4:]}
    # epoch 5 is left out; gaps: 3.0 (2%), 1.5 (12%), 1.0 (10%), -1.0 (4%)
    assert gaps["< 0 (above the teacher)"] == "4.0 (1) |"
    assert gaps["1–2"] == "11.0 (2) |"
    assert gaps["3–5"] == "2.0 (1) |"
    assert gaps["0–1"] == "– |" and gaps["5–10"] == "– |"


def test_der_table_compares_methods_on_the_same_models_and_seeds(tmp_path):
    study = load_script()
    write(tmp_path, "m", "defaults", 0, result(0.77, 0.02, [(10, 0.77, 0.02)]))
    write(tmp_path, "m", "defaults", 1, result(0.79, 0.10, [(10, 0.79, 0.10)]))  # no baseline at seed 1: not a pair
    cell = tmp_path / "baselines" / "cells" / "m" / "ft" / "seed0.json"
    cell.parent.mkdir(parents=True)
    before = {"clean_accuracy": 0.80, "attack_success_rate": 0.99}
    after = {"clean_accuracy": 0.70, "attack_success_rate": 0.49}
    cell.write_text(json.dumps({"attack": "m", "defense": "ft", "seed": 0, "before": before, "after": after}))
    table = study.der_table(study.load_results(tmp_path), tmp_path / "baselines", ["defaults"])
    lines = table.splitlines()
    assert "(1 of 1)" in lines[0] and lines[2] == "| model / seed | MEDIC defaults | ft |"
    # MEDIC: (0.97 - 0.03 + 1) / 2 = 97.00; ft: (0.50 - 0.10 + 1) / 2 = 70.00
    assert lines[4] == "| m / 0 | 97.00 | 70.00 |"
    assert lines[5] == "| **mean** | **97.00** | **70.00** |"
