"""The robust-default study's options: hard selection, τ and λ schedules, mixed inputs (docs/robust_default.md)."""

import math

import pytest
import torch

from medic_hf import MedicCloner, MedicConfig
from medic_hf.importance import importance_weights, top_k_uniform
from medic_hf.mixing import mix_batch, overlay_batch, paste_box
from tests.conftest import calibrate, pixel_dataset
from tests.test_cloner import make_config
from tests.tiny_models import ALL_TINY_MODELS


def test_top_k_uniform_by_hand():
    w = torch.tensor([[0.1, 0.5, 0.2, 0.2], [0.4, 0.3, 0.2, 0.1]])
    assert torch.equal(top_k_uniform(w, 1), torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(top_k_uniform(w[1:], 2), torch.tensor([[0.5, 0.5, 0.0, 0.0]]))


def test_top_fraction_keeps_the_most_important_neurons_with_equal_weights():
    f = torch.tensor([[[3.0]], [[0.0]], [[1.0]], [[-2.0]]]).reshape(1, 4)  # one sample, four neurons
    mean, std = torch.zeros(4), torch.ones(4)
    w, _ = importance_weights(f, None, mean, std, mode="activation", temperature=1.0, top_fraction=0.5)
    # |f - μ| / σ = 3, 0, 1, 2: the top half (ceil(0.5 · 4) = 2 neurons) is neurons 0 and 3
    assert torch.equal(w, torch.tensor([[0.5, 0.0, 0.0, 0.5]]))
    w, _ = importance_weights(f, None, mean, std, mode="activation", temperature=1.0, top_fraction=0.3)
    assert torch.equal(w, torch.tensor([[0.5, 0.0, 0.0, 0.5]]))  # ceil(0.3 · 4) = 2 as well


def test_mixup_mixes_images_and_labels_in_the_same_proportion():
    torch.manual_seed(0)
    x = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])
    mixed, targets = mix_batch(x, torch.tensor([0, 2]), 3, "mixup", alpha=1.0)
    for i in range(2):
        share_of_ones = mixed[i].mean().item()  # image 1 is all ones, image 0 all zeros
        assert targets[i].sum().item() == pytest.approx(1.0)
        assert targets[i, 2].item() == pytest.approx(share_of_ones, abs=1e-6)
        assert targets[i, 1].item() == 0


def test_cutmix_box_share_is_the_label_share():
    torch.manual_seed(1)
    x, other = torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8)
    for lam in (0.2, 0.5, 0.9):
        mixed, kept = paste_box(x, other, lam)
        assert 1.0 - mixed.mean().item() == pytest.approx(kept)


def test_mixing_a_single_image_returns_it_with_one_hot_labels():
    x = torch.rand(1, 3, 4, 4)
    mixed, targets = mix_batch(x, torch.tensor([1]), 3, "cutmix")
    assert torch.equal(mixed, x) and torch.equal(targets, torch.tensor([[0.0, 1.0, 0.0]]))


def test_overlay_blends_each_image_with_another_by_hand():
    # four constant images 0, 1, 2, 3: each blended image is (1 − a)·v + a·v_other with a in [0, 0.4), other ≠ itself
    x = torch.arange(4.0).reshape(4, 1, 1, 1).expand(4, 3, 2, 2)
    for seed in range(5):
        torch.manual_seed(seed)
        shift = int(torch.randint(1, 4, (1,)))
        weight = 0.4 * torch.rand(4)
        torch.manual_seed(seed)
        out = overlay_batch(x, 0.4)
        other = torch.arange(4.0).roll(shift)
        expected = (1 - weight) * torch.arange(4.0) + weight * other
        assert torch.allclose(out[:, :, 0, 0], expected[:, None].expand(4, 3))
        assert (other != torch.arange(4.0)).all() and (weight < 0.4).all()
        assert torch.equal(out[:, :, 0, 0], out[:, :, 1, 1])  # one weight per image, over every pixel and channel


def test_overlay_leaves_single_images_and_zero_weight_alone():
    x = torch.rand(1, 3, 4, 4)
    assert torch.equal(overlay_batch(x, 0.3), x)
    y = torch.rand(4, 3, 4, 4)
    assert torch.equal(overlay_batch(y, 0.0), y)
    with pytest.raises(ValueError, match="max_weight"):
        overlay_batch(y, 1.0)


def test_schedules_of_temperature_and_clone_weight(tmp_path):
    data = pixel_dataset(8)
    teacher = calibrate(ALL_TINY_MODELS["plain_wrn"](), data)
    config = make_config(tmp_path, final_temperature=9.0, clone_loss_schedule="cosine", max_steps=5)
    cloner = MedicCloner(teacher, config, train_dataset=data)
    cloner.state.max_steps = 5
    expected = {0: (5.0, 10.0), 2: (7.0, 5.0), 4: (9.0, 0.0)}  # τ linear 5 → 9, λ = 10·(1 + cos(π t / 4)) / 2
    for step, (tau, weight) in expected.items():
        cloner.state.global_step = step
        assert cloner.current_temperature() == pytest.approx(tau)
        assert cloner.current_clone_loss_weight() == pytest.approx(weight, abs=1e-9)
    cloner.state.global_step = 1
    assert cloner.current_clone_loss_weight() == pytest.approx(5 * (1 + math.cos(math.pi / 4)))
    cloner.remove_hooks()


@pytest.mark.parametrize(
    "options",
    [
        {"importance_top_fraction": 0.25},
        {"final_temperature": 10.0, "clone_loss_schedule": "cosine"},
        {"mix_inputs": "mixup"},
        {"mix_inputs": "cutmix", "mix_alpha": 0.5},
        {"student_input_noise": 0.3},
        {"student_input_blend": 0.3},
        {"logit_distillation": 0.5, "distillation_temperature": 2.0},
    ],
)
def test_each_option_trains_and_is_in_the_fingerprint_and_card(options, tmp_path):
    data = pixel_dataset(16)
    teacher = calibrate(ALL_TINY_MODELS["plain_wrn"](), data)
    cloner = MedicCloner(teacher, make_config(tmp_path, num_train_epochs=1, **options), train_dataset=data)
    cloner.train()
    losses = [log["loss"] for log in cloner.state.log_history if "loss" in log]
    assert losses and all(math.isfinite(loss) for loss in losses)
    settings = cloner.fingerprint()["settings"]
    assert all(settings[name] == value for name, value in options.items())
    assert set(options) <= set(cloner.hyperparameters()) | {"mix_alpha"}
    cloner.remove_hooks()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"importance_top_fraction": 0.0}, "importance_top_fraction"),
        ({"importance_top_fraction": 1.5}, "importance_top_fraction"),
        ({"final_temperature": -1.0}, "final_temperature"),
        ({"clone_loss_schedule": "linear"}, "clone_loss_schedule"),
        ({"mix_inputs": "cutout"}, "mix_inputs"),
        ({"mix_alpha": 0.0}, "mix_alpha"),
        ({"student_input_noise": -0.1}, "student_input_noise"),
        ({"student_input_blend": -0.1}, "student_input_blend"),
        ({"student_input_blend": 1.0}, "student_input_blend"),
        ({"logit_distillation": 1.5}, "logit_distillation"),
        ({"distillation_temperature": 0.0}, "distillation_temperature"),
    ],
)
def test_bad_values_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        MedicConfig(output_dir="x", **options)


def test_weight_average_by_hand():
    from medic_hf.averaging import WeightAverage

    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(2.0)
    average = WeightAverage(model, decay=0.75, warmup=False)
    with torch.no_grad():
        model.weight.fill_(6.0)
    average.update(model)  # 0.75 · 2 + 0.25 · 6 = 3
    assert average.shadow["weight"].item() == pytest.approx(3.0)
    with average.applied(model):
        assert model.weight.item() == pytest.approx(3.0)
    assert model.weight.item() == pytest.approx(6.0)
    warm = WeightAverage(model, decay=0.999)
    assert warm.current_decay() == pytest.approx(0.1)  # timm's warmup: (1 + 0) / (10 + 0)


def test_ema_student_is_what_is_evaluated_saved_and_resumed(tmp_path):
    from safetensors.torch import load_file

    data = pixel_dataset(16)
    teacher = calibrate(ALL_TINY_MODELS["plain_wrn"](), data)
    config = make_config(tmp_path, num_train_epochs=2, ema_decay=0.9, save_strategy="epoch")
    cloner = MedicCloner(teacher, config, train_dataset=data, eval_dataset=data)
    cloner.train()
    average = cloner.weight_average
    assert average.updates == cloner.state.global_step
    student = cloner.accelerator.unwrap_model(cloner.model).state_dict()
    assert all(torch.equal(student[name], value) for name, value in average.shadow.items())
    checkpoint = tmp_path / "out" / f"checkpoint-{cloner.state.global_step}"
    saved = load_file(str(checkpoint / "medic_average.safetensors"))
    assert int(saved["updates"]) == average.updates
    cloner.remove_hooks()
    # a resumed run reloads the average instead of starting it again from the fresh student
    first = tmp_path / "out" / "checkpoint-2"
    assert int(load_file(str(first / "medic_average.safetensors"))["updates"]) == 2
    resumed = MedicCloner(teacher, config, train_dataset=data, eval_dataset=data)
    resumed.train(resume_from_checkpoint=str(first))
    assert resumed.weight_average.updates == cloner.state.global_step  # 2 reloaded + 2 after the resume
    resumed.remove_hooks()


def test_logit_distillation_by_hand(tmp_path):
    data = pixel_dataset(8)
    teacher = calibrate(ALL_TINY_MODELS["plain_wrn"](), data)
    cloner = MedicCloner(
        teacher, make_config(tmp_path, logit_distillation=0.25, distillation_temperature=2.0), train_dataset=data
    )
    cloner._teacher_logits = torch.tensor([[2.0, 0.0]])
    student, label = torch.tensor([[0.0, 0.0]]), torch.tensor([0])
    p = torch.softmax(torch.tensor([1.0, 0.0]), dim=0)  # the teacher at T = 2
    kl = float((p * (p.log() - math.log(0.5))).sum())  # against the student's uniform output
    expected = 0.75 * math.log(2.0) + 0.25 * 4.0 * kl
    assert cloner._label_loss(student, label).item() == pytest.approx(expected, rel=1e-5)
    cloner.remove_hooks()


def test_defaults_are_the_robust_default_study_choice_and_plain_cloning_keeps_tau_zero(tmp_path):
    """Issue 16 chose τ sharpened 5 → 10 with a weight average (docs/robust_default.md); plain cloning, the
    reference that copies the backdoor, must not inherit the schedule."""
    from medic_hf.defenses import PlainCloneConfig, plain_clone

    config = MedicConfig(output_dir=str(tmp_path))
    assert (config.temperature, config.final_temperature, config.ema_decay) == (5.0, 10.0, 0.998)
    data = pixel_dataset(8)
    teacher = calibrate(ALL_TINY_MODELS["plain_wrn"](), data)
    plain = PlainCloneConfig(output_dir=str(tmp_path), max_steps=4)
    cloner = MedicCloner(teacher, plain, train_dataset=data)
    cloner.state.max_steps = 4
    for step in (0, 2, 4):
        cloner.state.global_step = step
        assert cloner.current_temperature() == 0.0
    cloner.remove_hooks()
    with pytest.raises(ValueError, match="final_temperature=10.0"):
        plain_clone(teacher, data, PlainCloneConfig(output_dir=str(tmp_path), final_temperature=10.0))
