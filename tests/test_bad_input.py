"""Bad input gets a clear error that names the fix, before anything is lost."""

import pickle

import datasets
import numpy as np
import pytest
import torch
from torch import nn
from transformers import TrainerCallback

from medic_hf import MedicCloner, MedicConfig
from medic_hf.modeling import load_state_dict_file
from tests.conftest import calibrate, pixel_dataset
from tests.tiny_models import plain_wrn


def config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        num_train_epochs=1,
        per_device_train_batch_size=8,
        save_strategy="no",
        disable_tqdm=True,
    )
    values.update(overrides)
    return MedicConfig(**values)


@pytest.fixture
def teacher():
    torch.manual_seed(1234)
    return calibrate(plain_wrn(), pixel_dataset(16))


def image_dataset(labels, num_classes=10):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in labels]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=num_classes)})
    from PIL import Image

    return datasets.Dataset.from_dict({"img": [Image.fromarray(a) for a in images], "label": labels}, features)


def test_data_set_without_labels(teacher, tmp_path):
    ds = image_dataset([0, 1, 2, 3]).remove_columns("label")
    with pytest.raises(ValueError, match="No label column.*rename_column"):
        MedicCloner(teacher, config(tmp_path), train_dataset=ds)


def test_labels_outside_the_model_classes(teacher, tmp_path):
    ds = pixel_dataset(8, num_classes=10)
    ds = ds.with_format(None).map(lambda row, i: {"labels": 42 if i == 3 else row["labels"]}, with_indices=True)
    with pytest.raises(ValueError, match="42"):
        MedicCloner(teacher, config(tmp_path), train_dataset=ds.with_format("torch"))


def test_class_count_mismatch(teacher, tmp_path):
    ds = image_dataset([0, 1, 2, 3], num_classes=100)
    with pytest.raises(ValueError, match="100 classes but the model has 10"):
        MedicCloner(teacher, config(tmp_path), train_dataset=ds)


def test_model_with_no_hookable_module(tmp_path):
    mlp = calibrate(nn.Sequential(nn.Flatten(), nn.Linear(12, 4)), pixel_dataset(4, 4, size=2))
    with pytest.raises(ValueError, match="No conv module to clone.*hook_layers"):
        MedicCloner(mlp, config(tmp_path, hook_layers=["conv"]), train_dataset=pixel_dataset(4, 4, size=2))


def test_teacher_and_student_that_do_not_match(teacher, tmp_path):
    wider = plain_wrn(widen_factor=2)
    with pytest.raises(ValueError, match="do not match"):
        MedicCloner(teacher, config(tmp_path), train_dataset=pixel_dataset(8), student=wider)


class PoisonWeights(TrainerCallback):
    """Turns the student's weights to NaN at the start of step 3, as a diverging run would."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 2:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(teacher, tmp_path):
    cfg = config(tmp_path, num_train_epochs=2, save_strategy="steps", save_steps=1, save_total_limit=None)
    cloner = MedicCloner(teacher, cfg, train_dataset=pixel_dataset(32), callbacks=[PoisonWeights()])
    with pytest.raises(FloatingPointError, match="checkpoint-2.*resume_from_checkpoint"):
        cloner.train()
    good = load_state_dict_file(tmp_path / "out" / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in good.values() if v.is_floating_point())
    assert not (tmp_path / "out" / "checkpoint-3").exists()
    cloner.remove_hooks()


class Payload:
    def __reduce__(self):
        return (open, ("/tmp/medic_hf_pwned", "w"))


def test_pickled_checkpoint_is_never_unpickled(tmp_path):
    folder = tmp_path / "trojaned"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": Payload()}))
    (folder / "config.json").write_text('{"architecture": "resnet18", "num_classes": 10}')
    with pytest.raises(ValueError, match="safetensors"):
        MedicCloner(str(folder), config(tmp_path), train_dataset=pixel_dataset(4))
    with pytest.raises(ValueError, match="unpickle"):
        load_state_dict_file(folder / "pytorch_model.bin")
    import os

    assert not os.path.exists("/tmp/medic_hf_pwned")


def test_args_must_be_a_medic_config(teacher):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="MedicConfig"):
        MedicCloner(teacher, TrainingArguments(output_dir="x"), train_dataset=pixel_dataset(4))
