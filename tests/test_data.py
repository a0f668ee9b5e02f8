"""Tests for medic_hf.data, on the tiny CIFAR-10 parquet fixture (tests/fixtures/make_fixtures.py) and
on small in-memory / tmp_path data sets. Everything runs offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import shutil  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from medic_hf.data import (  # noqa: E402
    TorchImageDataset,
    build_transform,
    class_balanced_subset,
    collate_batch,
    find_columns,
    load_image_dataset,
    prepare_dataset,
    prepare_for_model,
    resolve_preprocessing,
    subset_from_args,
)

FIXTURE = Path(__file__).parent / "fixtures" / "cifar_tiny"
CIFAR_PREPROCESSING = {
    "input_size": (3, 32, 32),
    "mean": (0.4914, 0.4822, 0.4465),
    "std": (0.247, 0.243, 0.261),
    "interpolation": "bicubic",
    "crop_pct": 1.0,
}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_cache"))


@pytest.fixture(scope="session")
def cifar_tiny(cache_dir):
    return load_image_dataset(str(FIXTURE), cache_dir=cache_dir)


def random_image(seed: int, size=(32, 32)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def labelled_dataset(labels, image_column="img", label_feature=None) -> datasets.Dataset:
    features = datasets.Features(
        {image_column: datasets.Image(), "label": label_feature or datasets.ClassLabel(num_classes=10)}
    )
    images = [random_image(i, (8, 8)) for i in range(len(labels))]
    return datasets.Dataset.from_dict({image_column: images, "label": list(labels)}, features=features)


def write_class_folders(root: Path, classes=("cat", "dog"), per_class=3):
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            random_image(i, (12, 10)).save(root / name / f"{i}.png")


# --- load_image_dataset ----------------------------------------------------------------------------------------------


def test_load_parquet_folder(cifar_tiny):
    assert list(cifar_tiny) == ["train", "test"]
    assert (cifar_tiny["train"].num_rows, cifar_tiny["test"].num_rows) == (100, 50)
    features = cifar_tiny["train"].features
    assert isinstance(features["img"], datasets.Image)
    assert isinstance(features["label"], datasets.ClassLabel) and features["label"].num_classes == 10


def test_load_single_parquet_file(cache_dir):
    loaded = load_image_dataset(str(FIXTURE / "test.parquet"), cache_dir=cache_dir)
    assert list(loaded) == ["train"] and loaded["train"].num_rows == 50


def test_load_hub_parquet_layouts(tmp_path, cache_dir):
    # The Hub's own layout (data/train-00000-of-00001.parquet) and its parquet conversion (default/test/0000.parquet).
    (tmp_path / "data").mkdir()
    (tmp_path / "default" / "test").mkdir(parents=True)
    shutil.copy(FIXTURE / "train.parquet", tmp_path / "data" / "train-00000-of-00001.parquet")
    shutil.copy(FIXTURE / "test.parquet", tmp_path / "default" / "test" / "0000.parquet")
    loaded = load_image_dataset(str(tmp_path), cache_dir=cache_dir)
    assert {split: ds.num_rows for split, ds in loaded.items()} == {"train": 100, "test": 50}


def test_load_imagefolder_class_folders(tmp_path, cache_dir):
    write_class_folders(tmp_path)
    loaded = load_image_dataset(str(tmp_path), cache_dir=cache_dir)
    assert list(loaded) == ["train"] and loaded["train"].num_rows == 6
    assert find_columns(loaded["train"]) == ("image", "label")
    assert loaded["train"].features["label"].names == ["cat", "dog"]


def test_load_imagefolder_split_folders(tmp_path, cache_dir):
    write_class_folders(tmp_path / "train", per_class=3)
    write_class_folders(tmp_path / "test", per_class=2)
    loaded = load_image_dataset(str(tmp_path), cache_dir=cache_dir)
    assert {split: ds.num_rows for split, ds in loaded.items()} == {"train": 6, "test": 4}


def test_load_errors(tmp_path, cache_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_dataset(str(tmp_path / "missing"), cache_dir=cache_dir)
    with pytest.raises(ValueError, match="neither parquet files nor images"):
        load_image_dataset(str(tmp_path), cache_dir=cache_dir)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a .parquet file"):
        load_image_dataset(str(tmp_path / "notes.txt"), cache_dir=cache_dir)
    shutil.copy(FIXTURE / "test.parquet", tmp_path / "part0.parquet")
    with pytest.raises(ValueError, match="none is named after a split"):
        load_image_dataset(str(tmp_path), cache_dir=cache_dir)


def test_load_hub_id_failure_is_explained(monkeypatch, tmp_path):
    # Offline, an unknown Hub id fails fast; the error says what was tried and what to check.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="Hugging Face Hub failed"):
        load_image_dataset("medic-hf-tests/no-such-dataset", cache_dir=str(tmp_path))


# --- find_columns ----------------------------------------------------------------------------------------------------


def test_find_columns_variants(cifar_tiny):
    assert find_columns(cifar_tiny["train"]) == ("img", "label")
    assert find_columns(cifar_tiny) == ("img", "label")  # a DatasetDict: its train split
    renamed = cifar_tiny["train"].rename_columns({"img": "photo", "label": "fine_label"})
    assert find_columns(renamed) == ("photo", "fine_label")  # by feature type: Image and ClassLabel
    plain = datasets.Dataset.from_dict({"image": ["a.png"], "labels": [1]})
    assert find_columns(plain) == ("image", "labels")
    ready = datasets.Dataset.from_dict({"pixel_values": [[0.0]], "labels": [0], "img": ["x"]})
    assert find_columns(ready) == ("pixel_values", "labels")


def test_find_columns_missing(cifar_tiny):
    with pytest.raises(ValueError, match=r"No label column.*\['img'\].*rename_column"):
        find_columns(cifar_tiny["train"].remove_columns("label"))
    with pytest.raises(ValueError, match=r"No image column.*\['label'\].*rename_column"):
        find_columns(cifar_tiny["train"].remove_columns("img"))


# --- class_balanced_subset -------------------------------------------------------------------------------------------


def test_subset_is_balanced_and_sized(cifar_tiny):
    train = cifar_tiny["train"]
    half = class_balanced_subset(train, fraction=0.5, seed=0)
    assert len(half) == 50 and set(Counter(half["label"]).values()) == {5}
    assert half["label"][:] != sorted(half["label"][:])  # shuffled, not grouped by class
    # 23 rows over 10 classes: 2 each, the 3 extra rows go to the smallest label ids.
    odd = class_balanced_subset(train, num_samples=23, seed=0)
    assert sorted(Counter(odd["label"]).items()) == [(c, 3 if c < 3 else 2) for c in range(10)]
    assert len(class_balanced_subset(train, fraction=1.0)) == 100


def test_subset_is_seeded(cifar_tiny):
    train = cifar_tiny["train"].add_column("row", list(range(100)))
    first = class_balanced_subset(train, fraction=0.3, seed=1)["row"][:]
    assert class_balanced_subset(train, fraction=0.3, seed=1)["row"][:] == first
    assert class_balanced_subset(train, fraction=0.3, seed=2)["row"][:] != first
    assert len(set(first)) == 30


def test_subset_errors(cifar_tiny):
    train = cifar_tiny["train"]
    for fraction in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
            class_balanced_subset(train, fraction=fraction)
    with pytest.raises(ValueError, match="exactly one"):
        class_balanced_subset(train, fraction=0.5, num_samples=10)
    with pytest.raises(ValueError, match="exactly one"):
        class_balanced_subset(train)
    with pytest.raises(ValueError, match="more than the 100 rows"):
        class_balanced_subset(train, num_samples=101)
    with pytest.raises(ValueError, match="at least one row per class"):
        class_balanced_subset(train, num_samples=5)
    unbalanced = labelled_dataset([0] * 8 + [1] * 2)
    with pytest.raises(ValueError, match="class 1 has only 2 rows.*at most 4 rows"):
        class_balanced_subset(unbalanced, num_samples=6)


def test_subset_from_args(cifar_tiny):
    assert len(subset_from_args(cifar_tiny, fraction=0.2)) == 20
    assert len(subset_from_args(cifar_tiny, split="test", num_samples=30)) == 30  # num_samples wins
    with pytest.raises(ValueError, match=r"Split 'validation' not found.*\['train', 'test'\]"):
        subset_from_args(cifar_tiny, split="validation")


# --- resolve_preprocessing / build_transform -------------------------------------------------------------------------


def test_preprocessing_from_timm_model():
    model = timm.create_model(
        "resnet18",
        num_classes=10,
        pretrained_cfg_overlay=dict(
            input_size=(3, 32, 32), mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.243, 0.261), crop_pct=1.0
        ),
    )
    assert resolve_preprocessing(model) == CIFAR_PREPROCESSING
    assert resolve_preprocessing(model, input_size=64)["input_size"] == (3, 64, 64)


def test_preprocessing_from_image_processors():
    from transformers import CLIPImageProcessor, ViTImageProcessor

    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3], image_std=[0.3] * 3)
    assert resolve_preprocessing(image_processor=processor) == {
        "input_size": (3, 32, 32),
        "mean": (0.1, 0.2, 0.3),
        "std": (0.3, 0.3, 0.3),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }
    clip = resolve_preprocessing(image_processor=CLIPImageProcessor())  # resize 224 then center-crop 224
    assert clip["input_size"] == (3, 224, 224) and clip["crop_pct"] == 1.0 and clip["interpolation"] == "bicubic"


def test_preprocessing_from_transformers_model_config():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=32, patch_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8
    )
    preprocessing = resolve_preprocessing(ViTForImageClassification(config))
    assert preprocessing["input_size"] == (3, 32, 32) and preprocessing["mean"] == (0.5, 0.5, 0.5)


def test_preprocessing_needs_explicit_values_for_plain_models():
    model = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"input_size, mean, std.*Linear.*image_size=\[32\].*--image_size 32"):
        resolve_preprocessing(model)
    explicit = resolve_preprocessing(model, input_size=(32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    assert explicit == {
        "input_size": (3, 32, 32),
        "mean": (0.5, 0.5, 0.5),
        "std": (0.25, 0.25, 0.25),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }


def test_eval_transform_is_deterministic_and_resizes():
    transform = build_transform(CIFAR_PREPROCESSING, train=False)
    image = random_image(0)
    out = transform(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out, transform(image))
    # A 32x32 image passes through unresized: the output is just the normalised pixels.
    mean = torch.tensor(CIFAR_PREPROCESSING["mean"]).view(3, 1, 1)
    std = torch.tensor(CIFAR_PREPROCESSING["std"]).view(3, 1, 1)
    expected = (torch.from_numpy(np.array(image)).permute(2, 0, 1) / 255.0 - mean) / std
    assert torch.allclose(out, expected, atol=1e-5)
    assert transform(random_image(1, (64, 48)).convert("L")).shape == (3, 32, 32)
    imagenet = dict(CIFAR_PREPROCESSING, input_size=(3, 224, 224), crop_pct=0.875)
    assert build_transform(imagenet, train=False)(random_image(2, (400, 300))).shape == (3, 224, 224)


def test_train_transform_is_random():
    transform = build_transform(CIFAR_PREPROCESSING, train=True)
    image = random_image(0)
    torch.manual_seed(0)
    outputs = [transform(image) for _ in range(8)]
    assert all(out.shape == (3, 32, 32) for out in outputs)
    assert any(not torch.equal(outputs[0], out) for out in outputs[1:])


# --- prepare_dataset / collate_batch ---------------------------------------------------------------------------------


def test_prepare_hf_dataset_items(cifar_tiny):
    prepared = prepare_dataset(
        cifar_tiny["train"], transform=build_transform(CIFAR_PREPROCESSING, train=False), num_classes=10
    )
    item = prepared[0]
    assert set(item) == {"pixel_values", "labels"}
    assert item["pixel_values"].shape == (3, 32, 32) and item["pixel_values"].dtype == torch.float32
    assert item["labels"].dtype == torch.int64 and item["labels"].item() == cifar_tiny["train"][0]["label"]


def test_collators_batch_prepared_items(cifar_tiny):
    from transformers import default_data_collator

    prepared = prepare_dataset(cifar_tiny["test"], transform=build_transform(CIFAR_PREPROCESSING, train=True))
    rows = [prepared[i] for i in range(4)]
    for collate in (collate_batch, default_data_collator):
        batch = collate(rows)
        assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["labels"].dtype == torch.int64
        assert batch["labels"].shape == (4,)
    loader = torch.utils.data.DataLoader(prepared, batch_size=16, collate_fn=collate_batch)
    assert next(iter(loader))["pixel_values"].shape == (16, 3, 32, 32)


def test_prepare_rejects_bad_labels(cifar_tiny):
    transform = build_transform(CIFAR_PREPROCESSING, train=False)
    with pytest.raises(ValueError, match="model has 5 classes.*labels up to 9.*num_classes=10"):
        prepare_dataset(cifar_tiny["train"], transform=transform, num_classes=5)
    with pytest.raises(ValueError, match="No label column"):
        prepare_dataset(cifar_tiny["train"].remove_columns("label"), transform=transform)
    with pytest.raises(ValueError, match="negative labels \\[-1\\]"):
        prepare_dataset(labelled_dataset([0, -1], label_feature=datasets.Value("int64")), transform=transform)
    with pytest.raises(ValueError, match="must be integer class ids.*class_encode_column"):
        prepare_dataset(labelled_dataset(["cat", "dog"], label_feature=datasets.Value("string")), transform=transform)
    with pytest.raises(ValueError, match="1 of 2 rows have no 'label'"):
        prepare_dataset(labelled_dataset([0, None], label_feature=datasets.Value("int64")), transform=transform)


def test_prepare_checks_selected_rows_only(cifar_tiny):
    # Labels are read through select()'s index mapping, and the ClassLabel sets num_classes when not given.
    subset = class_balanced_subset(cifar_tiny["train"], fraction=0.2)
    prepared = prepare_dataset(subset, transform=build_transform(CIFAR_PREPROCESSING, train=False))
    assert len(prepared) == 20 and prepared[3]["labels"].item() == subset[3]["label"]


class TupleDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_prepare_torch_dataset_of_tuples_and_dicts():
    transform = build_transform(CIFAR_PREPROCESSING, train=False)
    tuples = prepare_dataset(TupleDataset([(random_image(i), i % 3) for i in range(6)]), transform=transform)
    assert isinstance(tuples, TorchImageDataset) and len(tuples) == 6
    assert tuples[4]["pixel_values"].shape == (3, 32, 32) and tuples[4]["labels"].dtype == torch.int64
    tensors = TupleDataset([{"image": torch.zeros(3, 32, 32, dtype=torch.float64), "label": torch.tensor(2)}])
    item = prepare_dataset(tensors, transform=transform, num_classes=3)[0]
    assert item["pixel_values"].dtype == torch.float32 and item["labels"].item() == 2
    batch = collate_batch([tuples[0], tuples[1]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["labels"].tolist() == [0, 1]


def test_prepare_torch_dataset_rejects_bad_labels():
    transform = build_transform(CIFAR_PREPROCESSING, train=False)
    with pytest.raises(ValueError, match="model has 2 classes but the data set has labels up to 7"):
        prepare_dataset(TupleDataset([(random_image(0), 7)]), transform=transform, num_classes=2)
    with pytest.raises(ValueError, match="must be .image, label. tuples"):
        prepare_dataset(TupleDataset([random_image(0)]), transform=transform)
    with pytest.raises(ValueError, match="integer class ids"):
        prepare_dataset(TupleDataset([(random_image(0), 0.5)]), transform=transform)


def test_pixel_values_rows_pass_through():
    pixels = np.random.default_rng(0).normal(size=(3, 3, 8, 8)).astype(np.float32)
    ready = datasets.Dataset.from_dict({"pixel_values": list(pixels), "labels": [0, 1, 2]})
    prepared = prepare_dataset(ready, transform=None, num_classes=3)
    item = prepared[1]
    assert item["pixel_values"].dtype == torch.float32
    assert torch.allclose(item["pixel_values"], torch.from_numpy(pixels[1]))
    assert item["labels"].dtype == torch.int64 and item["labels"].item() == 1


# --- prepare_for_model -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train, augment", [(False, True), (True, False), (True, True)])
def test_prepare_for_model_augments_training_images_only(cifar_tiny, train, augment):
    from .tiny_models import timm_resnet

    images = cifar_tiny["train"].select(range(4))
    prepared = prepare_for_model(images, timm_resnet(), train=train, augment=augment, input_size=32, num_classes=10)
    torch.manual_seed(0)
    draws = [prepared[0]["pixel_values"] for _ in range(4)]
    assert draws[0].shape == (3, 32, 32) and prepared[0]["labels"].item() == images[0]["label"]
    assert any(not torch.equal(draws[0], draw) for draw in draws[1:]) is (train and augment)


@pytest.mark.parametrize("kind", ["pixel_values rows", "torch data set"])
def test_prepare_for_model_passes_ready_tensors_through(kind):
    # A plain PyTorch model has no known preprocessing, and ready tensors need none.
    pixels = torch.randn(3, 3, 8, 8)
    if kind == "pixel_values rows":
        ready = datasets.Dataset.from_dict({"pixel_values": list(pixels.numpy()), "labels": [0, 1, 2]})
    else:
        ready = TupleDataset([(pixels[i], i) for i in range(3)])
    item = prepare_for_model(ready, torch.nn.Linear(4, 3), train=True, num_classes=3)[1]
    assert torch.allclose(item["pixel_values"], pixels[1]) and item["labels"].item() == 1


def test_prepare_for_model_needs_preprocessing_for_images(cifar_tiny):
    with pytest.raises(ValueError, match="Cannot tell the preprocessing"):
        prepare_for_model(cifar_tiny["train"], torch.nn.Linear(4, 3), train=False)


@pytest.mark.parametrize("augment", [True, False])
def test_cloner_augments_clean_images_only_when_asked(cifar_tiny, tmp_path, augment):
    from medic_hf import MedicCloner, MedicConfig

    from .tiny_models import timm_resnet

    config = MedicConfig(output_dir=str(tmp_path), augment=augment, disable_tqdm=True, save_strategy="no")
    cloner = MedicCloner(timm_resnet(), config, train_dataset=cifar_tiny["train"].select(range(8)))
    torch.manual_seed(0)
    # The clean set is decoded once (uint8); the cloner augments each batch as it feeds the models.
    batch = torch.stack([cloner.train_dataset[i]["pixel_values"] for i in range(8)])
    draws = [cloner._model_input(batch, train=True) for _ in range(2)]
    assert torch.equal(cloner._model_input(batch, train=False), cloner._model_input(batch, train=False))
    # crop + flip: two draws of the same rows differ; without augmentation they are identical
    assert torch.equal(draws[0], draws[1]) is not augment
    assert cloner.hyperparameters()["augment (crop + flip)"] is augment
    cloner.remove_hooks()
