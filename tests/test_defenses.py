"""The baseline defenses (medic_hf.defenses): every defense on tiny models, plus hand-computable checks."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from medic_hf.data import load_image_dataset
from medic_hf.defenses import (
    DEFENSES,
    ANPConfig,
    DistillationConfig,
    FinePruningConfig,
    FineTuningConfig,
    MCRConfig,
    MedicConfig,
    NADConfig,
    PlainCloneConfig,
    ScratchConfig,
    anp,
    attention_map,
    bezier_coefficients,
    curve_point,
    fine_prune,
    fine_tune,
    mcr,
    nad,
    plain_clone,
    prune_by_threshold,
)
from medic_hf.defenses._training import functional_logits
from medic_hf.defenses.anp import NeuronPerturbation, norm_layers
from medic_hf.defenses.nad import default_layers
from medic_hf.modeling import forward_logits
from medic_hf.training import distillation_loss
from tests.conftest import calibrate, pixel_dataset
from tests.tiny_models import ALL_TINY_MODELS

FIXTURE = Path(__file__).parent / "fixtures" / "cifar_tiny"
COMMON = dict(
    per_device_train_batch_size=8, per_device_eval_batch_size=8, disable_tqdm=True, dataloader_pin_memory=False
)


def tiny_config(name: str, tmp_path):
    """The smallest run of each defense: one epoch (or two ANP steps) of batch 8."""
    if name in ("medic", "clone"):
        return DEFENSES[name][1](
            output_dir=str(tmp_path / name),
            num_train_epochs=1,
            per_device_train_batch_size=8,
            save_strategy="no",
            disable_tqdm=True,
            dataloader_pin_memory=False,
            importance_log_file=None,
        )
    return {
        "ft": FineTuningConfig(num_train_epochs=1, **COMMON),
        "fp": FinePruningConfig(num_train_epochs=1, **COMMON),
        "nad": NADConfig(num_train_epochs=1, teacher_epochs=1, **COMMON),
        # Two steps barely move the masks: prune every neuron whose mask moved below 1.
        "anp": ANPConfig(max_steps=2, pruning_threshold=0.999, **COMMON),
        "mcr": MCRConfig(num_train_epochs=1, ft_epochs=1, **COMMON),
        "scratch": ScratchConfig(num_train_epochs=1, **COMMON),
        "kd": DistillationConfig(num_train_epochs=1, **COMMON),
    }[name]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model_name", ["timm_resnet", "plain_wrn", "hf_resnet"])
@pytest.mark.parametrize("defense", sorted(DEFENSES))
def test_defense_matrix(defense, model_name, tmp_path):
    torch.manual_seed(0)
    data = pixel_dataset(16)
    model = calibrate(ALL_TINY_MODELS[model_name](), data)
    before = snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    function, _ = DEFENSES[defense]

    repaired = function(model, data, tiny_config(defense, tmp_path))

    assert type(repaired) is type(model)
    assert repaired is not model and not repaired.training
    after = repaired.state_dict()
    assert list(after) == list(before)
    changed = [k for k in before if before[k].is_floating_point() and not torch.equal(after[k], before[k])]
    assert changed, "the defense returned the input's weights"
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before), "the input model was modified"
    assert not model.training and [p.requires_grad for p in model.parameters()] == flags
    assert repaired.defense_report["defense"] == defense
    json.dumps(repaired.defense_report)  # plain numbers, lists and strings: ready for a results file
    with torch.no_grad():
        logits = forward_logits(repaired, data[:2]["pixel_values"])
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


@pytest.mark.parametrize("defense", ["ft", "nad", "scratch"])
def test_a_frozen_model_is_trained_whole_and_stays_frozen(defense, tmp_path):
    """A model handed over frozen (as a cloner's teacher is) is still repaired; the input keeps its flags."""
    data = pixel_dataset(8)
    model = calibrate(ALL_TINY_MODELS["timm_resnet"](), data).requires_grad_(False)
    before = snapshot(model)
    repaired = DEFENSES[defense][0](model, data, tiny_config(defense, tmp_path))
    changed = [k for k, v in repaired.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("conv1") or k.startswith("layer1") for k in changed), changed
    assert not any(p.requires_grad for p in model.parameters())


def test_image_columns_get_the_models_preprocessing(tmp_path):
    """A timm model on CIFAR images (an `img` Image column): resized, augmented and normalised like the model's."""
    clean = load_image_dataset(str(FIXTURE / "train.parquet"), cache_dir=str(tmp_path))["train"].select(range(16))
    model = ALL_TINY_MODELS["timm_resnet"]().eval()
    repaired = fine_tune(model, clean, FineTuningConfig(num_train_epochs=1, **COMMON))
    assert len(repaired.defense_report["losses"]) == 1


# ---------------------------------------------------------------------------------------------------- fine-pruning


class ControlledCNN(nn.Module):
    """A 1x1 conv whose channels are constants (its bias), global pooling and a linear classifier: the mean
    activation of channel c on any data is relu(bias[c])."""

    def __init__(self, bias=(3.0, 1.0, 4.0, 2.0), num_classes: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(3, len(bias), 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(len(bias), num_classes)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.copy_(torch.tensor(bias))

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def tensor_data(n: int = 10, label: int = 0) -> torch.utils.data.Dataset:
    """A plain torch data set of ``(image tensor, label)`` items."""
    images = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.TensorDataset(images, torch.full((n,), label))


@pytest.mark.parametrize(("max_ratio", "expected"), [(0.25, [1]), (0.5, [1, 3]), (0.75, [1, 3, 0])])
def test_fine_pruning_prunes_least_active_channels_first(max_ratio, expected):
    model = ControlledCNN()
    config = FinePruningConfig(num_train_epochs=0, acc_ratio=10.0, max_prune_ratio=max_ratio, **COMMON)
    repaired = fine_prune(model, tensor_data(), config)
    assert repaired.defense_report["pruned_channels"] == expected
    kept = [c for c in range(4) if c not in expected]
    assert (repaired.fc.weight[:, expected] == 0).all()
    assert torch.equal(repaired.fc.weight[:, kept], model.fc.weight[:, kept])


def test_fine_pruning_stops_before_the_clean_accuracy_drops():
    """Class 0 wins only through the least active channel: pruning it would cost all accuracy, so nothing is."""
    model = ControlledCNN()
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
        model.fc.bias.copy_(torch.tensor([0.0, 0.5]))
    repaired = fine_prune(model, tensor_data(label=0), FinePruningConfig(num_train_epochs=0, **COMMON))
    assert repaired.defense_report["pruned_channels"] == []
    assert repaired.defense_report["val_accuracy_before"] == 1.0


def test_fine_pruning_keeps_pruned_channels_at_zero_while_fine_tuning():
    data = pixel_dataset(16)
    model = calibrate(ALL_TINY_MODELS["plain_wrn"](), data)
    config = FinePruningConfig(num_train_epochs=2, acc_ratio=10.0, max_prune_ratio=0.25, **COMMON)
    repaired = fine_prune(model, data, config)
    pruned = repaired.defense_report["pruned_channels"]
    assert len(pruned) == 16  # 25% of the 64 channels
    assert (repaired.fc.weight[:, pruned] == 0).all()
    assert not torch.equal(repaired.fc.weight, model.fc.weight)


# ---------------------------------------------------------------------------------------------------- NAD


def test_attention_map_of_a_known_tensor():
    # channel 0 = [1, 2], channel 1 = [3, 0]: mean_c a^2 = [(1 + 9) / 2, (4 + 0) / 2] = [5, 2], norm sqrt(29)
    fm = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])
    expected = torch.tensor([[5.0, 2.0]]) / (29**0.5 + 1e-6)
    assert torch.allclose(attention_map(fm, p=2), expected)
    assert torch.allclose(attention_map(-fm, p=2), expected)  # |a|
    assert torch.allclose(attention_map(fm, p=1), torch.tensor([[2.0, 1.0]]) / (5**0.5 + 1e-6))


@pytest.mark.parametrize(
    ("model_name", "expected"),
    [
        ("timm_resnet", ["layer2", "layer3", "layer4"]),
        ("plain_wrn", ["blocks.0", "blocks.1", "blocks.2"]),
        ("hf_resnet", ["resnet.embedder", "resnet.encoder.stages.0", "resnet.encoder.stages.1"]),
    ],
)
def test_nad_default_layers_are_the_last_three_stages(model_name, expected):
    assert default_layers(ALL_TINY_MODELS[model_name]()) == expected


def test_nad_with_named_layers_distils_only_those():
    data = pixel_dataset(8)
    model = calibrate(ALL_TINY_MODELS["timm_resnet"](), data)
    config = NADConfig(num_train_epochs=1, teacher_epochs=0, layers=["layer3", "layer4"], **COMMON)
    repaired = nad(model, data, config)
    assert repaired.defense_report["layers"] == ["layer3", "layer4"]
    assert repaired.defense_report["betas"] == [1000.0, 1000.0]


# ---------------------------------------------------------------------------------------------------- ANP


def test_prune_by_threshold_zeroes_exactly_the_masks_at_or_below_it():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        model[1].bias.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    pruned = prune_by_threshold(model, {"1": torch.tensor([0.1, 0.5, 0.2, 0.9])}, threshold=0.2)
    assert pruned == {"1": [0, 2]}
    assert torch.equal(model[1].weight.detach(), torch.tensor([0.0, 2.0, 0.0, 4.0]))
    assert torch.equal(model[1].bias.detach(), torch.tensor([0.1, 0.2, 0.3, 0.4]))  # ANP prunes gamma only


def test_anp_prunes_the_neurons_whose_masks_fall_below_the_threshold():
    data = pixel_dataset(16)
    model = calibrate(ALL_TINY_MODELS["plain_wrn"](), data)
    repaired = anp(model, data, ANPConfig(max_steps=3, pruning_threshold=0.999, **COMMON))
    report = repaired.defense_report
    assert set(report["masks"]) == set(norm_layers(model))
    assert report["num_pruned"] > 0
    for name, values in report["masks"].items():
        mask = torch.tensor(values).view_as(model.get_submodule(name).weight)
        assert ((mask >= 0) & (mask <= 1)).all()
        weight, original = repaired.get_submodule(name).weight, model.get_submodule(name).weight
        low = mask <= 0.999
        assert (weight[low] == 0).all()
        assert torch.equal(weight[~low], original[~low])
        assert report["pruned"].get(name, []) == torch.nonzero(low).flatten().tolist()


def test_anp_masks_timm_batchnorm_act_layers_through_functional_call():
    """timm's BatchNormAct2d reads the swapped weight: masking a neuron equals zeroing its gamma."""
    import timm

    data = pixel_dataset(4)
    model = calibrate(ALL_TINY_MODELS["timm_bnact_se"](), data)
    layers = norm_layers(model)
    name = next(n for n, m in layers.items() if isinstance(m, timm.layers.BatchNormAct2d))
    state = NeuronPerturbation(layers)
    with torch.no_grad():
        state.masks[name][0] = 0.0
        masked = functional_logits(model, state.params(perturbed=False), data[:4]["pixel_values"])
        reference = ALL_TINY_MODELS["timm_bnact_se"]()
        reference.load_state_dict(model.state_dict())
        reference.get_submodule(name).weight[0] = 0.0
        expected = forward_logits(reference.eval(), data[:4]["pixel_values"])
        unmasked = forward_logits(model, data[:4]["pixel_values"])
    assert torch.allclose(masked, expected, atol=1e-5)
    assert not torch.allclose(masked, unmasked, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- MCR


def test_bezier_curve_endpoints_and_midpoint():
    w0, theta, w1 = {"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([3.0, 5.0])}, {"w": torch.tensor([7.0, 0.0])}
    assert torch.equal(curve_point(w0, theta, w1, 0.0)["w"], w0["w"])
    assert torch.equal(curve_point(w0, theta, w1, 1.0)["w"], w1["w"])
    # t = 0.5: 0.25 w0 + 0.5 theta + 0.25 w1
    assert torch.allclose(curve_point(w0, theta, w1, 0.5)["w"], torch.tensor([3.5, 2.0]))
    assert bezier_coefficients(0.1) == pytest.approx((0.81, 0.18, 0.01))


def test_mcr_with_a_given_end_point_returns_the_curve_point_at_t():
    """With lr 0 the bend stays at the midpoint, so phi(t) = (1 - t) w0 + t w1 for every parameter."""
    data = pixel_dataset(8)
    model = calibrate(ALL_TINY_MODELS["plain_wrn"](), data)
    end = calibrate(ALL_TINY_MODELS["plain_wrn"](), data)
    config = MCRConfig(num_train_epochs=1, learning_rate=0.0, weight_decay=0.0, t=0.3, fine_tuned_model=end, **COMMON)
    repaired = dict(mcr(model, data, config).named_parameters())
    for name, param in model.named_parameters():
        expected = 0.7 * param + 0.3 * dict(end.named_parameters())[name]
        assert torch.allclose(repaired[name], expected, atol=1e-6), name


# ---------------------------------------------------------------------------------------------------- ablations


def test_distillation_loss_against_hand_computed_values():
    logits, labels = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([2])
    ce = -torch.log_softmax(logits, -1)[0, 2]
    assert distillation_loss(logits, logits, labels, 1.0, 4.0).item() == pytest.approx(0.0, abs=1e-7)
    assert distillation_loss(logits, None, labels, 0.0, 4.0).item() == pytest.approx(ce.item())
    # T = 1, alpha = 0.5: 0.5 CE + 0.5 KL(p_teacher || p_student), KL of the flipped distribution by hand.
    p, q = torch.softmax(logits.flip(-1), -1)[0], torch.softmax(logits, -1)[0]
    kl = (p * (p.log() - q.log())).sum()
    expected = 0.5 * ce + 0.5 * kl
    assert distillation_loss(logits, logits.flip(-1), labels, 0.5, 1.0).item() == pytest.approx(
        expected.item(), rel=1e-5
    )


def test_plain_clone_refuses_a_nonzero_temperature(tmp_path):
    with pytest.raises(ValueError, match="temperature 0"):
        plain_clone(nn.Linear(2, 2), pixel_dataset(2), MedicConfig(output_dir=str(tmp_path), temperature=5.0))
    assert PlainCloneConfig(output_dir=str(tmp_path)).temperature == 0.0


# ---------------------------------------------------------------------------------------------------- clear errors


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 16), nn.ReLU(), nn.Linear(16, 10))


def test_anp_refuses_a_model_without_normalisation_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    with pytest.raises(ValueError, match="normalisation layers"):
        anp(model, pixel_dataset(4), ANPConfig(max_steps=1, **COMMON))


@pytest.mark.parametrize(
    ("defense", "config"), [(nad, NADConfig(**COMMON)), (fine_prune, FinePruningConfig(**COMMON))]
)
def test_conv_defenses_refuse_an_mlp(defense, config):
    with pytest.raises(ValueError, match="nn.Conv2d"):
        defense(mlp(), pixel_dataset(4), config)


@pytest.mark.parametrize(
    ("model_name", "message"), [("timm_vit", "not \\(all\\) 4-D"), ("hf_vit", "processes tokens")]
)
def test_nad_refuses_vision_transformers(model_name, message):
    """timm's feature_info names token blocks; transformers' ViT has only its patch embedding as a feature map."""
    with pytest.raises(ValueError, match=message):
        nad(ALL_TINY_MODELS[model_name](), pixel_dataset(4), NADConfig(num_train_epochs=1, teacher_epochs=0, **COMMON))


def test_fine_pruning_refuses_a_model_whose_logits_do_not_come_from_a_linear():
    model = nn.Sequential(nn.Conv2d(3, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="no nn.Linear"):
        fine_prune(model, pixel_dataset(4), FinePruningConfig(num_train_epochs=0, **COMMON))
