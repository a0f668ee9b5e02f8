"""The device-resident clean set: same pixels as the per-image path, batched augmentation, used by the cloner."""

import datasets
import numpy as np
import pytest
import torch

from medic_hf import MedicCloner, MedicConfig
from medic_hf.data import DeviceBatchTransform, DeviceImageSet, build_transform, collate, random_crop_flip
from tests.test_data import CIFAR_PREPROCESSING
from tests.tiny_models import timm_resnet

PREPROCESSING = {**CIFAR_PREPROCESSING, "interpolation": "bilinear"}


def image_dataset(n=12, size=32, seed=0) -> datasets.Dataset:
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    ds = datasets.Dataset.from_dict({"img": images, "label": [i % 10 for i in range(n)]})
    return ds.cast_column("img", datasets.Image())


@pytest.mark.parametrize("size", [32, 40])
def test_decoded_set_gives_the_per_image_path_pixels(size):
    """Evaluation: the same resize / crop and normalisation as build_transform(train=False), to float precision."""
    ds = image_dataset(size=size)
    device_set = DeviceImageSet.from_dataset(ds, "img", "label", PREPROCESSING)
    assert device_set.images.dtype == torch.uint8 and device_set.images.shape == (12, 3, 32, 32)
    assert device_set.labels.tolist() == ds["label"]
    batch = collate(device_set.__getitems__([3, 0, 7]))
    got = DeviceBatchTransform(PREPROCESSING)(batch["pixel_values"], train=False)
    per_image = build_transform(PREPROCESSING, train=False)
    expected = torch.stack([per_image(ds[i]["img"]) for i in (3, 0, 7)])
    assert torch.allclose(got, expected, atol=1e-5)
    assert batch["labels"].tolist() == [ds[i]["label"] for i in (3, 0, 7)]


def test_random_crop_flip_is_a_crop_of_the_zero_padded_image_flipped_or_not():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(images, pad=2)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    offsets, flips = set(), 0
    for b in range(16):
        candidates = [
            (dy, dx, flip)
            for dy in range(5)
            for dx in range(5)
            for flip in (False, True)
            if torch.equal(
                out[b],
                padded[b, :, dy : dy + 8, dx : dx + 8].flip(-1) if flip else padded[b, :, dy : dy + 8, dx : dx + 8],
            )
        ]
        assert candidates, b
        offsets.add(candidates[0][:2])
        flips += candidates[0][2]
    assert len(offsets) > 4 and 0 < flips < 16  # offsets and flips vary per sample
    assert torch.equal(random_crop_flip(images, pad=0)[:, :, :, :].sort(-1).values, images.sort(-1).values)


def test_the_cloner_uses_the_device_set_for_image_columns_and_trains_reproducibly(tmp_path):
    def run(device_data, seed=0):
        args = MedicConfig(
            output_dir=str(tmp_path / device_data),
            max_steps=3,
            per_device_train_batch_size=4,
            save_strategy="no",
            disable_tqdm=True,
            image_size=[32],
            device_data=device_data,
            seed=seed,
            max_accuracy_drop=None,
        )
        torch.manual_seed(1)
        cloner = MedicCloner(timm_resnet(), args, train_dataset=image_dataset(), eval_dataset=image_dataset(seed=1))
        cloner.train()
        return cloner

    fast = run("auto")
    assert isinstance(fast.train_dataset, DeviceImageSet) and isinstance(fast.eval_dataset, DeviceImageSet)
    assert fast.state.global_step == 3 and fast.step_timer.steps == 3 and fast.step_timer.seconds > 0
    assert set(fast.metrics_after) == {"accuracy"}
    slow = run("never")
    assert not isinstance(slow.train_dataset, DeviceImageSet)
    # Evaluation pixels are the same on both paths: the teacher's accuracy before cloning agrees.
    assert fast.metrics_before == slow.metrics_before
    again = run("auto")
    for a, b in zip(fast.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)


def test_sets_over_the_budget_keep_the_per_image_path(tmp_path):
    args = MedicConfig(output_dir=str(tmp_path), image_size=[32], device_data_max_mb=0.01, disable_tqdm=True)
    cloner = MedicCloner(timm_resnet(), args, train_dataset=image_dataset())
    assert not isinstance(cloner.train_dataset, DeviceImageSet)
    with pytest.raises(ValueError, match="device_data"):
        MedicConfig(output_dir=str(tmp_path), device_data="always")
