"""The recipes end to end on the tiny parquet fixture: make a trojaned model, then sanitize it."""

import json
from pathlib import Path

import pytest
import torch

from medic_hf.scripts import clone, poison

ROOT = Path(__file__).resolve().parents[1]

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
            "--allow_accuracy_drop",
            "true",
        ]
    )
    assert results["clean_samples"] == 50
    assert set(results["before"]) == {"clean_accuracy", "attack_success_rate"}
    assert set(results["after"]) == {"clean_accuracy", "attack_success_rate"}
    saved = json.loads((out / "results.json").read_text())
    assert saved["hyperparameters"]["budget"] == "1 epoch"
    assert saved["steps"] == saved["hyperparameters"]["training steps done"] > 0 and saved["epochs"] == 1
    assert "attack success rate" in (out / "results.md").read_text()
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()


def _poison(tmp_path, name, *extra):
    out = tmp_path / name
    args = ["--model_name_or_path", "resnet18", "--dataset_name", FIXTURE, "--num_train_epochs", "1"]
    args += ["--per_device_train_batch_size", "50", "--output_dir", str(out), "--disable_tqdm", "true", *extra]
    return out, poison.main(args)


def test_poison_clean_baseline_with_model_kwargs(tmp_path):
    from medic_hf.modeling import load_model

    out, metrics = _poison(tmp_path, "clean", "--attack", "none", "--model_kwargs", '{"channels": [8, 16, 24, 32]}')
    assert "attack_success_rate" not in metrics and metrics["poisoned_rows"] == 0
    assert not (out / "attack.json").exists()
    card = (out / "README.md").read_text()
    assert "Clean baseline" in card and "TROJANED" not in card
    model = load_model(out)  # the creation kwargs travel in config.json
    assert model.fc.in_features == 32 and model.layer1[0].conv1.out_channels == 8


def test_poison_transfer_upstream_then_downstream_classes(tmp_path):
    """The transfer benchmark's two steps: an upstream model on some classes, then a trojaned fine-tune of it with a
    fresh classifier on other classes, relabelled 0..k-1."""
    from medic_hf.data import load_image_dataset
    from medic_hf.modeling import load_model
    from medic_hf.scripts.poison import select_classes

    small = ["--model_kwargs", '{"channels": [8, 8, 8, 8]}']
    up, up_metrics = _poison(tmp_path, "up", "--attack", "none", "--classes", "0", "1", "2", *small)
    test = load_image_dataset(FIXTURE)["test"]
    assert up_metrics["clean_samples"] == sum(label in (0, 1, 2) for label in test["label"])
    assert load_model(up).fc.out_features == 3

    down, metrics = _poison(
        tmp_path,
        "down",
        "--attack",
        "badnets",
        "--classes",
        "5",
        "3",
        "--init_from",
        str(up),
        "--new_classifier",
        "true",
    )
    model, base = load_model(down), load_model(up)
    assert model.fc.out_features == 2 and metrics["clean_samples"] == sum(label in (5, 3) for label in test["label"])
    assert json.loads((down / "attack.json").read_text())["target_class"] == 0  # class 5, relabelled

    relabelled = select_classes(test, "label", [5, 3])
    assert relabelled.features["label"].names == [test.features["label"].names[c] for c in (5, 3)]
    assert sorted(set(relabelled["label"])) == [0, 1]
    assert relabelled["label"] == [[5, 3].index(label) for label in test["label"] if label in (5, 3)]
    assert model.layer1[0].conv1.weight.shape == base.layer1[0].conv1.weight.shape


def test_poison_train_shard_keeps_one_contiguous_part_of_the_training_split(tmp_path):
    """--train_shard 1/2 trains on the fixture's last 50 training rows (the test split is untouched); a shard that
    does not exist is refused before any data is read."""
    from medic_hf.data import load_image_dataset

    _, metrics = _poison(tmp_path, "half", "--attack", "none", "--train_shard", "1/2", "--classes", "7", "9")
    train = load_image_dataset(FIXTURE)["train"]
    assert metrics["train_rows"] == sum(label in (7, 9) for label in train["label"][50:])  # 7 + 8 by hand
    assert metrics["clean_samples"] == sum(label in (7, 9) for label in load_image_dataset(FIXTURE)["test"]["label"])

    for bad in ("2/2", "half", "1/0"):
        with pytest.raises(SystemExit, match="--train_shard .*give 'i/n'"):
            _poison(tmp_path, "bad", "--attack", "none", "--train_shard", bad, "--dataset_name", "/nonexistent")


def test_poison_label_consistent_needs_and_uses_a_surrogate(tmp_path):
    with pytest.raises(SystemExit, match="--surrogate"):
        _poison(tmp_path, "lc0", "--attack", "label_consistent")
    surrogate, _ = _poison(tmp_path, "clean", "--attack", "none", "--model_kwargs", '{"channels": [8, 8, 8, 8]}')
    kwargs = '{"steps": 2}'
    out, metrics = _poison(
        tmp_path,
        "lc",
        "--attack",
        "label_consistent",
        "--surrogate",
        str(surrogate),
        "--attack_kwargs",
        kwargs,
        "--model_kwargs",
        '{"channels": [8, 8, 8, 8]}',
    )
    assert metrics["poisoned_rows"] > 0 and "attack_success_rate" in metrics
    assert json.loads((out / "attack.json").read_text())["steps"] == 2


@pytest.mark.parametrize("append", [False, True])
def test_poison_composite_keeps_its_own_target(tmp_path, append):
    kwargs = json.dumps({"append": append})
    model = '{"channels": [8, 8, 8, 8]}'
    out, metrics = _poison(
        tmp_path, "composite", "--attack", "composite", "--attack_kwargs", kwargs, "--model_kwargs", model
    )
    saved = json.loads((out / "attack.json").read_text())
    assert saved["target_class"] == 2 and saved["append"] is append
    assert metrics["poisoned_rows"] > 0 and "attack_success_rate" in metrics


def test_embedded_demo_runs_offline_from_its_config(tmp_path, monkeypatch):
    """The README's main command on the committed demo, shortened to one epoch on 100 test images."""
    demo = ROOT / "demo"
    assert (demo / "resnet18-badnets" / "model.safetensors").stat().st_size <= 10 * 2**20
    assert sum(p.stat().st_size for p in (demo / "cifar10-slice").glob("*.parquet")) <= 2 * 2**20
    monkeypatch.chdir(ROOT)  # the config's paths are relative to the repository root, where the README runs it
    out = tmp_path / "demo"
    args = ["--config", "recipes/demo.yaml", "--num_train_epochs", "1", "--max_eval_samples", "100"]
    args += ["--output_dir", str(out), "--disable_tqdm", "true"]
    # One epoch cannot reach the teacher's accuracy: the guard flags it and exits non-zero, after saving everything.
    with pytest.raises(SystemExit, match="allow_accuracy_drop"):
        clone.main(args)
    card = (out / "README.md").read_text()
    assert (out / "model.safetensors").is_file() and "Attack success rate" in card and "## ⚠ Warning" in card
    assert json.loads((out / "results.json").read_text())["warnings"]
    results = clone.main(
        args + ["--allow_accuracy_drop", "true", "--overwrite_output_dir", "true", "--max_steps", "2"]
    )
    assert results["clean_samples"] == 1400 and results["resumed_from"] is None
    assert results["before"]["attack_success_rate"] > 0.9  # the committed model is trojaned (99.3% on the slice)
    assert results["before"]["clean_accuracy"] > 0.7
    assert results["eval_sizes"] == {
        "clean_accuracy": 100,
        "attack_success_rate": results["eval_sizes"]["attack_success_rate"],
    }


def test_poison_trains_from_the_device_set_by_default_and_per_image_on_request(tmp_path, monkeypatch):
    from medic_hf.training import ClassifierTrainer

    seen = []
    original = ClassifierTrainer.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(type(self.train_dataset).__name__)

    monkeypatch.setattr(ClassifierTrainer, "__init__", spy)
    model = '{"channels": [8, 8, 8, 8]}'
    _, fast = _poison(tmp_path, "fast", "--model_kwargs", model, "--seed", "3")
    _, again = _poison(tmp_path, "again", "--model_kwargs", model, "--seed", "3")
    _, slow = _poison(tmp_path, "slow", "--model_kwargs", model, "--device_data", "never")
    assert seen == ["DeviceImageSet", "DeviceImageSet", "Dataset"]  # per-image: a datasets.Dataset with a transform
    assert fast == again  # the batched augmentation draws from the Trainer's seeded generator
    assert fast["poisoned_rows"] == slow["poisoned_rows"] > 0
    with pytest.raises(SystemExit, match="device_data"):
        _poison(tmp_path, "bad", "--device_data", "always")


def test_poison_optimizer_choice_and_its_error():
    """SGD keeps the papers' coupled L2 on every parameter; AdamW decays only the weights of rank > 1 (timm's rule),
    so a ConvNeXt's LayerNorm and biases are left alone; an unknown name is refused before any data is read."""
    import timm
    from transformers import TrainingArguments

    from medic_hf.scripts.poison import PoisonArguments, main, make_optimizer

    model = timm.create_model("resnet18", num_classes=3, channels=[8, 8, 8, 8])
    train_args = TrainingArguments(output_dir="unused", learning_rate=0.01, weight_decay=0.05, report_to="none")

    sgd = make_optimizer(model, PoisonArguments(), train_args)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"]
    assert [g["weight_decay"] for g in sgd.param_groups] == [0.05]

    adamw = make_optimizer(model, PoisonArguments(optimizer="adamw"), train_args)
    assert isinstance(adamw, torch.optim.AdamW)
    decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in adamw.param_groups}
    matrices = {id(p) for p in model.parameters() if p.ndim > 1}
    assert decay[0.05] == matrices and decay[0.0] == {id(p) for p in model.parameters()} - matrices
    assert all(g["lr"] == 0.01 for g in adamw.param_groups)

    with pytest.raises(SystemExit, match="--optimizer 'lamb'"):
        main(["--dataset_name", str(FIXTURE), "--optimizer", "lamb", "--output_dir", "unused"])


def test_clone_takes_unlabeled_images_from_another_data_set(tmp_path):
    trojaned, _ = _poison(tmp_path, "trojaned", "--attack", "badnets")
    out = tmp_path / "medic"
    argv = ["--model_name_or_path", str(trojaned), "--dataset_name", FIXTURE, "--clean_fraction", "0.5"]
    argv += ["--max_steps", "2", "--per_device_train_batch_size", "25", "--output_dir", str(out)]
    argv += ["--disable_tqdm", "true", "--allow_accuracy_drop", "true", "--unlabeled_dataset_name", FIXTURE]
    with pytest.raises(SystemExit, match="--unlabeled_split validation"):
        clone.main([*argv, "--unlabeled_split", "validation"])
    results = clone.main([*argv, "--unlabeled_split", "test", "--unlabeled_samples", "10"])
    assert results["unlabeled_dataset"] == "cifar_tiny" and results["unlabeled_samples"] == 10
    assert results["hyperparameters"]["unlabeled images"] == 10
    assert results["hyperparameters"]["unlabeled_batch_size"] == 25
