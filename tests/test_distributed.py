"""Two CPU processes (gloo) give the statistics and the first-step loss of one process with the same global batch."""

import json
import os

import datasets
import numpy as np
import pytest
import torch
from accelerate import debug_launcher
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from medic_hf import MedicCloner, MedicConfig
from medic_hf.data import DeviceImageSet
from tests.conftest import calibrate, pixel_dataset

GLOBAL_BATCH = 16


def group_norm_net() -> nn.Module:
    # No BatchNorm: a training-mode BN normalises over each process's half batch, which would rightly change the loss.
    torch.manual_seed(1234)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    return calibrate(net, pixel_dataset(GLOBAL_BATCH))


def image_dataset(n: int) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
    return datasets.Dataset.from_dict({"img": images, "label": [i % 10 for i in range(n)]}).cast_column(
        "img", datasets.Image()
    )


def first_step(out_dir: str, world_size: int, images: bool = False) -> None:
    """Runs in every process: one MEDIC step on the global batch; rank 0 writes statistics and logged losses.

    With `images`, the clean set is an image column, held decoded by each process (device_data="auto"), without
    augmentation so that both runs feed the same pixels."""
    preprocessing = dict(image_size=[32], image_mean=[0.5] * 3, image_std=[0.25] * 3, augment=False)
    cloner = MedicCloner(
        group_norm_net(),
        MedicConfig(
            output_dir=out_dir,
            per_device_train_batch_size=GLOBAL_BATCH // world_size,
            max_steps=1,
            logging_steps=1,
            save_strategy="no",
            disable_tqdm=True,
            use_cpu=True,
            **(preprocessing if images else {}),
        ),
        train_dataset=image_dataset(GLOBAL_BATCH) if images else pixel_dataset(GLOBAL_BATCH),
    )
    assert isinstance(cloner.train_dataset, DeviceImageSet) == images
    cloner.train()
    if cloner.is_world_process_zero():
        save_file(cloner.stats.state_dict(), os.path.join(out_dir, "stats.safetensors"))
        log = next(log for log in cloner.state.log_history if "loss" in log)
        with open(os.path.join(out_dir, "loss.json"), "w") as f:
            json.dump(
                {"world": cloner.accelerator.num_processes, **{k: log[k] for k in ("loss", "ce_loss", "clone_loss")}},
                f,
            )
    cloner.remove_hooks()


@pytest.mark.parametrize("images", [False, True], ids=["pixel_values", "device_resident_images"])
def test_two_processes_match_one(tmp_path, images):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    debug_launcher(first_step, args=(one, 1, images), num_processes=1)
    debug_launcher(first_step, args=(two, 2, images), num_processes=2)
    stats_one, stats_two = load_file(f"{one}/stats.safetensors"), load_file(f"{two}/stats.safetensors")
    assert stats_one.keys() == stats_two.keys() and stats_one
    for key in stats_one:
        assert torch.allclose(stats_one[key], stats_two[key], atol=1e-5), key
    loss_one = json.load(open(f"{one}/loss.json"))
    loss_two = json.load(open(f"{two}/loss.json"))
    assert (loss_one.pop("world"), loss_two.pop("world")) == (1, 2)
    for key in loss_one:
        assert abs(loss_one[key] - loss_two[key]) <= 1e-3 * max(1.0, abs(loss_one[key])), (key, loss_one, loss_two)


def base_started_steps(folder: str) -> None:
    """Runs in every process: two MEDIC steps of a student started from the base folder, whose early modules are
    frozen by default; rank 0 saves the student."""
    cloner = MedicCloner(
        f"{folder}/teacher",
        MedicConfig(
            output_dir=f"{folder}/out",
            per_device_train_batch_size=GLOBAL_BATCH // 2,
            max_steps=2,
            save_strategy="no",
            disable_tqdm=True,
            use_cpu=True,
            max_accuracy_drop=None,
        ),
        train_dataset=pixel_dataset(GLOBAL_BATCH),
        student=f"{folder}/base",
    )
    assert cloner.frozen_modules
    cloner.train()
    if cloner.is_world_process_zero():
        student = cloner.accelerator.unwrap_model(cloner.model)
        save_file({k: v.contiguous() for k, v in student.state_dict().items()}, f"{folder}/student.safetensors")
        with open(f"{folder}/frozen.json", "w") as f:
            json.dump(cloner.frozen_modules, f)
    cloner.remove_hooks()


def test_a_base_started_student_with_frozen_modules_trains_on_two_processes(tmp_path):
    from medic_hf.modeling import save_native
    from tests.test_transfer import fine_tuned
    from tests.tiny_models import timm_resnet

    torch.manual_seed(0)
    base = timm_resnet(num_classes=5)
    save_native(base, tmp_path / "base")
    save_native(fine_tuned(base, calibrate(timm_resnet(), pixel_dataset(8))), tmp_path / "teacher")
    debug_launcher(base_started_steps, args=(str(tmp_path),), num_processes=2)
    student, before = load_file(f"{tmp_path}/student.safetensors"), base.state_dict()
    frozen = json.load(open(f"{tmp_path}/frozen.json"))
    for name in (n for n, _ in base.named_parameters() if n.rsplit(".", 1)[0] in frozen):
        assert torch.equal(student[name], before[name]), name  # kept at the base's values under DDP
    assert not torch.equal(student["layer4.0.conv1.weight"], before["layer4.0.conv1.weight"])
