"""What the user sees is true: safe re-runs, their own data as they made it, an honest card, guards, small fixes."""

import json
import random
from pathlib import Path

import datasets
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from transformers import pipeline, set_seed

from medic_hf import MedicCloner, MedicConfig
from medic_hf.data import class_balanced_subset, subset_from_args
from medic_hf.modeling import save_native
from medic_hf.scripts import clone
from tests.conftest import calibrate, pixel_dataset
from tests.tiny_models import hf_vit, timm_resnet

ROOT = Path(__file__).resolve().parents[1]

FIXTURE = str(ROOT / "tests" / "fixtures" / "cifar_tiny")


def config(tmp_path, **overrides) -> MedicConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=8,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        disable_tqdm=True,
        max_accuracy_drop=None,
    )
    values.update(overrides)
    return MedicConfig(**values)


def image_dataset(n=12, size=32, channels=3, seed=0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    mode = "L" if channels == 1 else "RGB"
    shape = (size, size) if channels == 1 else (size, size, 3)
    images = [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode) for _ in range(n)]
    ds = datasets.Dataset.from_dict({"image": images, "label": [i % 10 for i in range(n)]})
    return ds.cast_column("image", datasets.Image())


# --------------------------------------------------------------------------------------------------------------------
# 1. Re-runs into an existing output_dir
# --------------------------------------------------------------------------------------------------------------------


def test_a_checkpoint_of_another_run_is_refused_and_the_same_run_resumes(tmp_path, caplog):
    data = pixel_dataset(16)
    teacher = calibrate(timm_resnet(), data)
    MedicCloner(teacher, config(tmp_path), train_dataset=data).train()
    assert (tmp_path / "out" / "checkpoint-2" / "medic_state.json").is_file()

    other_teacher = calibrate(timm_resnet(), data)  # another model: other weights
    with pytest.raises(ValueError, match=r"the teacher differ.*overwrite_output_dir"):
        MedicCloner(other_teacher, config(tmp_path), train_dataset=data).train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match=r"temperature \(5\.0 there, 0\.0 now\)"):
        MedicCloner(teacher, config(tmp_path, temperature=0.0), train_dataset=data).train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="the data differ"):
        other_data = pixel_dataset(16, seed=5)
        MedicCloner(teacher, config(tmp_path), train_dataset=other_data).train(resume_from_checkpoint=True)

    same = MedicCloner(teacher, config(tmp_path, max_steps=4), train_dataset=pixel_dataset(16))
    with pytest.raises(ValueError, match="max_steps"):  # a longer budget is another run too
        same.train(resume_from_checkpoint=True)
    same = MedicCloner(teacher, config(tmp_path), train_dataset=pixel_dataset(16))  # rebuilt, identical data
    with caplog.at_level("WARNING"):
        same.train(resume_from_checkpoint=True)
    assert same.resumed_from == "checkpoint-2"
    assert any("Resuming from" in r.getMessage() for r in caplog.records)


def test_recipe_run_a_then_run_b_into_the_same_folder(tmp_path):
    teacher_dir, other_dir = tmp_path / "teacher", tmp_path / "other"
    save_native(timm_resnet(), teacher_dir)
    save_native(timm_resnet(), other_dir)
    out = str(tmp_path / "out")
    common = ["--dataset_name", FIXTURE, "--clean_fraction", "1.0", "--image_size", "32", "--max_steps", "2"]
    common += ["--save_strategy", "steps", "--save_steps", "2", "--output_dir", out, "--disable_tqdm", "true"]
    common += ["--per_device_train_batch_size", "16", "--allow_accuracy_drop", "true", "--max_eval_samples", "20"]
    first = clone.main(["--model_name_or_path", str(teacher_dir), *common])
    assert first["resumed_from"] is None and first["steps"] == 2

    with pytest.raises(ValueError, match=r"another run: the teacher.*--overwrite_output_dir true"):
        clone.main(["--model_name_or_path", str(other_dir), *common])
    with pytest.raises(ValueError, match="clone_loss_weight"):
        clone.main(["--model_name_or_path", str(teacher_dir), *common, "--clone_loss_weight", "1"])

    again = clone.main(["--model_name_or_path", str(teacher_dir), *common])
    assert again["resumed_from"] == "checkpoint-2"
    assert json.loads(Path(out, "results.json").read_text())["resumed_from"] == "checkpoint-2"
    assert again["before"] == first["before"]

    def teacher_hash():
        return json.loads(Path(out, "checkpoint-2", "medic_state.json").read_text())["fingerprint"]["teacher"]

    first_teacher = teacher_hash()
    fresh = clone.main(["--model_name_or_path", str(other_dir), *common, "--overwrite_output_dir", "true"])
    assert fresh["resumed_from"] is None and fresh["steps"] == 2 and teacher_hash() != first_teacher


# --------------------------------------------------------------------------------------------------------------------
# 2. The user's own data and preprocessing
# --------------------------------------------------------------------------------------------------------------------


def test_a_data_set_with_its_own_transform_is_used_as_it_is(tmp_path):
    """As in the transformers image-classification tutorial: ds.with_transform(fn) producing pixel_values."""

    def transform(batch):
        batch["pixel_values"] = [torch.full((3, 32, 32), 0.25) for _ in batch["image"]]
        del batch["image"]
        return batch

    ds = image_dataset().with_transform(transform)
    cloner = MedicCloner(timm_resnet(), config(tmp_path, save_strategy="no"), train_dataset=ds)
    item = cloner.train_dataset[0]
    assert torch.equal(item["pixel_values"], torch.full((3, 32, 32), 0.25)) and item["labels"] == 0
    cloner.train()
    assert cloner.state.global_step == 2

    def wrong(batch):
        return {"x": [0] * len(batch["image"]), "label": batch["label"]}

    with pytest.raises(ValueError, match="needs 'pixel_values'"):
        MedicCloner(timm_resnet(), config(tmp_path), train_dataset=image_dataset().with_transform(wrong))


def test_pixel_values_and_label_columns_need_no_renaming(tmp_path):
    ds = pixel_dataset(8).rename_column("labels", "label")
    cloner = MedicCloner(timm_resnet(), config(tmp_path, save_strategy="no"), train_dataset=ds)
    assert cloner.train_dataset[0]["labels"] == 0


def test_preprocessing_is_set_from_the_config_and_logged(tmp_path, caplog):
    # timm.create_model(..., pretrained=False) still carries the default tag's 224 px config (176 for resnet10t)
    with caplog.at_level("WARNING"):
        MedicCloner(timm_resnet(), config(tmp_path), train_dataset=image_dataset())
    assert any("resized to 176x176" in r.getMessage() for r in caplog.records)

    caplog.clear()
    args = config(tmp_path, image_size=[32], image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25])
    with caplog.at_level("INFO"):
        cloner = MedicCloner(timm_resnet(), args, train_dataset=image_dataset(), eval_dataset=image_dataset())
    assert cloner.preprocessing["input_size"] == (3, 32, 32)
    assert cloner.preprocessing["mean"] == (0.5, 0.5, 0.5) and cloner.preprocessing["std"] == (0.25, 0.25, 0.25)
    assert cloner.train_dataset[0]["pixel_values"].shape == (3, 32, 32)
    lines = [r.getMessage() for r in caplog.records if "MedicCloner preprocessing" in r.getMessage()]
    assert len(lines) == 1 and "3x32x32" in lines[0] and "horizontal flip" in lines[0]
    assert "resized" not in lines[0]


def test_a_one_channel_model_names_the_fix(tmp_path):
    model = timm.create_model("resnet10t", num_classes=10, in_chans=1)
    with pytest.raises(ValueError, match=r"1-channel images.*--image_mean 0.5 --image_std 0.5"):
        MedicCloner(model, config(tmp_path), train_dataset=image_dataset(channels=1))
    args = config(tmp_path, image_size=[32], image_mean=[0.5], image_std=[0.5], save_strategy="no")
    cloner = MedicCloner(model, args, train_dataset=image_dataset(channels=1))
    assert cloner.train_dataset[0]["pixel_values"].shape == (1, 32, 32)


# --------------------------------------------------------------------------------------------------------------------
# 3. A curated clean set is used whole
# --------------------------------------------------------------------------------------------------------------------


def test_every_row_of_an_unbalanced_set():
    ds = datasets.Dataset.from_dict({"image": [0] * 200, "label": [i % 11 if i < 190 else 10 for i in range(200)]})
    whole = class_balanced_subset(ds, fraction=1.0, seed=0)
    assert len(whole) == 200 and sorted(whole["label"]) == sorted(ds["label"])
    assert whole["label"] != ds["label"]  # shuffled
    assert len(subset_from_args(ds, num_samples=200)) == 200


# --------------------------------------------------------------------------------------------------------------------
# 4. The card and the output folder tell the truth
# --------------------------------------------------------------------------------------------------------------------


def test_the_card_of_an_untrained_timm_teacher_claims_no_hub_base(tmp_path):
    model = timm.create_model("resnet10t", num_classes=10)  # pretrained_cfg names timm/resnet10t.c3_in1k
    args = config(tmp_path, save_strategy="no", hub_model_id="me/clean-resnet", image_size=[32])
    cloner = MedicCloner(model, args, train_dataset=image_dataset(), eval_dataset={"clean": image_dataset(10)})
    cloner.train()
    cloner.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    metadata = card.split("---")[1]
    assert "base_model" not in metadata and "resnet10t.c3_in1k" not in card
    assert "`resnet10t (timm)`" in card
    assert "| training steps done | 2 |" in card and "| budget | 2 steps |" in card
    assert 'timm.create_model("hf-hub:me/clean-resnet"' in card and "<namespace>" not in card
    assert "model-index" in metadata and "license: unknown" in metadata
    assert "| Clean accuracy |" in card and "| 10 |" in card  # the evaluation set's size
    assert str(tmp_path) not in card
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    assert reloaded.pretrained_cfg["input_size"] == (3, 32, 32)  # how the clone was fed, not the 176 px default


def test_a_local_teacher_is_named_by_its_folder_only(tmp_path):
    folder = tmp_path / "my-trojaned-model"
    save_native(timm_resnet(), folder)
    cloner = MedicCloner(str(folder), config(tmp_path, save_strategy="no"), train_dataset=pixel_dataset(8))
    assert cloner.teacher_name == "my-trojaned-model" and cloner.base_model_id is None
    hub = MedicCloner(timm_resnet(), config(tmp_path), train_dataset=pixel_dataset(8), base_model_name="org/model")
    assert hub.base_model_id == "org/model"


def test_a_transformers_output_works_with_the_pipeline(tmp_path):
    data = image_dataset()
    args = config(tmp_path, save_strategy="no", image_size=[32])
    cloner = MedicCloner(hf_vit(), args, train_dataset=data)
    cloner.train()
    cloner.save_model()
    assert (tmp_path / "out" / "preprocessor_config.json").is_file()
    classify = pipeline("image-classification", model=str(tmp_path / "out"))
    predictions = classify(data[0]["image"])
    assert len(predictions) == 5 and all("label" in p and "score" in p for p in predictions)


# --------------------------------------------------------------------------------------------------------------------
# 5. Guards against a run that did not train
# --------------------------------------------------------------------------------------------------------------------


def test_zero_training_steps_is_an_error_before_anything_runs(tmp_path):
    args = config(
        tmp_path, max_steps=-1, num_train_epochs=1, per_device_train_batch_size=64, dataloader_drop_last=True
    )
    cloner = MedicCloner(timm_resnet(), args, train_dataset=pixel_dataset(20))
    with pytest.raises(ValueError, match="No training step would run: 20 clean rows in batches of 64"):
        cloner.train()
    assert not (tmp_path / "out" / "model.safetensors").exists() and not list((tmp_path / "out").glob("checkpoint-*"))


def test_evaluation_sees_every_image_even_with_drop_last(tmp_path):
    args = config(tmp_path, dataloader_drop_last=True, per_device_eval_batch_size=8)
    cloner = MedicCloner(timm_resnet(), args, train_dataset=pixel_dataset(16), eval_dataset=pixel_dataset(20))
    assert sum(len(b["labels"]) for b in cloner.get_eval_dataloader()) == 20
    assert cloner.args.dataloader_drop_last  # training batches still drop the last one


def test_a_large_accuracy_drop_is_flagged_in_log_results_and_card(tmp_path, caplog):
    data = pixel_dataset(16)
    teacher = calibrate(timm_resnet(), data)
    args = config(tmp_path, save_strategy="no", max_accuracy_drop=-101.0)  # any result counts as a drop
    cloner = MedicCloner(teacher, args, train_dataset=data, eval_dataset={"clean": data})
    with caplog.at_level("WARNING"):
        cloner.train()
    assert len(cloner.warnings) == 1 and "points below the teacher's" in cloner.warnings[0]
    assert any("max_accuracy_drop" in r.getMessage() for r in caplog.records)
    cloner.save_model()
    assert "## ⚠ Warning" in (tmp_path / "out" / "README.md").read_text()


# --------------------------------------------------------------------------------------------------------------------
# 6. Smaller points
# --------------------------------------------------------------------------------------------------------------------


def test_an_untrained_teacher_built_after_set_seed_gets_a_different_student(tmp_path):
    set_seed(42)
    teacher = timm_resnet()
    cloner = MedicCloner(teacher, config(tmp_path, seed=42), train_dataset=pixel_dataset(8))
    conv = cloner.model.conv1[0].weight
    assert not torch.equal(conv, teacher.conv1[0].weight)


def test_building_a_cloner_leaves_the_global_random_state_alone(tmp_path):
    teacher, data = timm_resnet(), pixel_dataset(8)
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    expected = (torch.rand(3), np.random.rand(), random.random())
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    MedicCloner(teacher, config(tmp_path, seed=0), train_dataset=data)
    got = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_empty_data_sets_are_refused_clearly(tmp_path):
    empty = datasets.Dataset.from_dict({"image": [], "label": []})
    with pytest.raises(ValueError, match="empty"):
        class_balanced_subset(empty, fraction=0.5)
    with pytest.raises(ValueError, match="empty"):
        MedicCloner(timm_resnet(), config(tmp_path), train_dataset=pixel_dataset(8).select([]))
    (tmp_path / "data").mkdir()
    empty.to_parquet(str(tmp_path / "data" / "train.parquet"))
    with pytest.raises(ValueError, match="holds an empty split"):
        clone.main(["--model_name_or_path", "x", "--dataset_name", str(tmp_path / "data")])


def test_command_line_errors_name_flags_and_abbreviations_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--clean_fraction"):
        clone.main(["--model_name_or_path", "x", "--dataset_name", FIXTURE, "--clean_fraction", "2"])
    with pytest.raises(ValueError, match="--clone_loss'"):  # not silently --clone_loss_weight
        clone.main(["--model_name_or_path", "x", "--dataset_name", FIXTURE, "--clone_loss", "5"])
