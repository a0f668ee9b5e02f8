"""The recipes end to end on the tiny parquet fixture: make a trojaned model, then sanitize it."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import clone  # noqa: E402
import poison  # noqa: E402

FIXTURE = str(ROOT / "tests" / "fixtures" / "cifar_tiny")


def test_poison_then_clone(tmp_path):
    trojaned = tmp_path / "trojaned"
    metrics = poison.main(
        [
            "--model_name_or_path",
            "resnet10t",
            "--dataset_name",
            FIXTURE,
            "--attack",
            "badnets",
            "--num_train_epochs",
            "1",
            "--per_device_train_batch_size",
            "50",
            "--output_dir",
            str(trojaned),
            "--disable_tqdm",
            "true",
        ]
    )
    assert {"clean_accuracy", "attack_success_rate"} <= set(metrics)
    for name in ("attack.json", "config.json", "model.safetensors", "README.md", "metrics.json"):
        assert (trojaned / name).is_file(), name
    assert "TROJANED" in (trojaned / "README.md").read_text()

    out = tmp_path / "medic"
    config = tmp_path / "clone.yaml"
    config.write_text(f"dataset_name: {FIXTURE}\nclean_fraction: 0.5\nnum_train_epochs: 1\nlogging_steps: 1\n")
    results = clone.main(
        [
            "--config",
            str(config),
            "--model_name_or_path",
            str(trojaned),
            "--output_dir",
            str(out),
            "--per_device_train_batch_size",
            "25",
            "--disable_tqdm",
            "true",
        ]
    )
    assert results["clean_samples"] == 50
    assert set(results["before"]) == {"clean_accuracy", "attack_success_rate"}
    assert set(results["after"]) == {"clean_accuracy", "attack_success_rate"}
    saved = json.loads((out / "results.json").read_text())
    assert saved["hyperparameters"]["num_train_epochs"] == 1
    assert "attack success rate" in (out / "results.md").read_text()
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
