"""Two CPU processes (gloo) give the statistics and the first-step loss of one process with the same global batch."""

import json
import os

import torch
from accelerate import debug_launcher
from safetensors.torch import load_file, save_file
from torch import nn

from medic_hf import MedicCloner, MedicConfig
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


def first_step(out_dir: str, world_size: int) -> None:
    """Runs in every process: one MEDIC step on the global batch; rank 0 writes statistics and logged losses."""
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
        ),
        train_dataset=pixel_dataset(GLOBAL_BATCH),
    )
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


def test_two_processes_match_one(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    debug_launcher(first_step, args=(one, 1), num_processes=1)
    debug_launcher(first_step, args=(two, 2), num_processes=2)
    stats_one, stats_two = load_file(f"{one}/stats.safetensors"), load_file(f"{two}/stats.safetensors")
    assert stats_one.keys() == stats_two.keys() and stats_one
    for key in stats_one:
        assert torch.allclose(stats_one[key], stats_two[key], atol=1e-5), key
    loss_one = json.load(open(f"{one}/loss.json"))
    loss_two = json.load(open(f"{two}/loss.json"))
    assert (loss_one.pop("world"), loss_two.pop("world")) == (1, 2)
    for key in loss_one:
        assert abs(loss_one[key] - loss_two[key]) <= 1e-3 * max(1.0, abs(loss_one[key])), (key, loss_one, loss_two)
