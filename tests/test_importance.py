"""Importance weights, statistics and the clone loss against hand-computed values (paper Eqs. 1-4)."""

import math

import pytest
import torch
from torch import nn

from medic_hf.importance import (
    NeuronStats,
    activation_weights,
    effective_support,
    impact_weights,
    importance_weights,
    layer_clone_loss,
)


def softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_activation_weights_hand_computed():
    f = torch.tensor([[2.0, 1.0, -1.0]])
    mean = torch.tensor([[0.0, 1.0, 0.0]])
    std = torch.tensor([[1.0, 2.0, 0.5]])
    # |f - mu| / sigma = [2, 0, 2]; tau = 1.5
    expected = softmax([3.0, 0.0, 3.0])
    assert activation_weights(f, mean, std, 1.5)[0].tolist() == pytest.approx(expected, rel=1e-6)


def test_impact_weights_hand_computed():
    grad = torch.tensor([[0.5, -1.0, 0.1]])
    std = torch.tensor([[1.0, 2.0, 10.0]])
    # |sigma * grad| = [0.5, 2, 1]; tau = 2
    expected = softmax([1.0, 4.0, 2.0])
    assert impact_weights(grad, std, 2.0)[0].tolist() == pytest.approx(expected, rel=1e-6)


def test_impact_rms_scale_hand_computed():
    grad = torch.tensor([[1.0, 3.0]])
    std = torch.ones(1, 2)
    rms = math.sqrt((1 + 9) / 2)
    expected = softmax([1 / rms, 3 / rms])
    assert impact_weights(grad, std, 1.0, scale="rms")[0].tolist() == pytest.approx(expected, rel=1e-6)


def test_combined_weights_are_geometric_mean():
    f = torch.tensor([[2.0, 0.0]])
    grad = torch.tensor([[0.0, 1.0]])
    mean, std = torch.zeros(1, 2), torch.ones(1, 2)
    w, parts = importance_weights(f, grad, mean, std, mode="both", temperature=1.0)
    a, b = softmax([2.0, 0.0]), softmax([0.0, 1.0])
    assert w[0].tolist() == pytest.approx([math.sqrt(a[0] * b[0]), math.sqrt(a[1] * b[1])], rel=1e-6)
    assert parts["activation"][0].tolist() == pytest.approx(a, rel=1e-6)
    assert parts["impact"][0].tolist() == pytest.approx(b, rel=1e-6)
    # sqrt(a*b) <= (a+b)/2, so the weights of a layer sum to at most 1.
    assert w.sum().item() <= 1.0


@pytest.mark.parametrize("mode", ["both", "activation", "impact", "none"])
def test_zero_temperature_gives_uniform_weights(mode):
    f, grad = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    w, _ = importance_weights(f, grad, mean, std, mode=mode, temperature=0.0)
    assert torch.allclose(w, torch.full_like(w, 1 / 75))


def test_weights_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    f, grad = torch.randn(8, 4, 3, 3), torch.randn(8, 4, 3, 3)
    mean, std = torch.randn(1, 4, 1, 1), torch.rand(1, 4, 1, 1) + 0.5
    full, _ = importance_weights(f, grad, mean, std, temperature=5.0)
    for size in (1, 3):
        part, _ = importance_weights(f[:size], grad[:size], mean, std, temperature=5.0)
        assert torch.allclose(part, full[:size], atol=1e-7)


def test_layer_clone_loss_hand_computed():
    teacher = torch.tensor([[1.0, 2.0]])
    student = torch.tensor([[0.0, 0.0]])
    std = torch.tensor([[1.0, 2.0]])
    w = torch.tensor([[0.25, 0.5]])
    # 0.25 * (1/1)^2 + 0.5 * (2/2)^2 = 0.75
    assert layer_clone_loss(teacher, student, std, w).tolist() == pytest.approx([0.75])


def test_effective_support():
    assert effective_support(torch.full((1, 10), 0.1)).item() == pytest.approx(1.0)
    one_hot = torch.tensor([[1.0] + [0.0] * 9])
    assert effective_support(one_hot).item() == pytest.approx(0.1)


@pytest.mark.parametrize("granularity", ["channel", "neuron"])
def test_streaming_statistics_match_a_single_pass(granularity):
    torch.manual_seed(0)
    data = torch.randn(10, 3, 4, 4) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + 1.0
    stats = NeuronStats({"conv": 1}, granularity, sigma_floor=1e-6)
    for chunk in data.split(3):
        stats.update({"conv": chunk})
    stats.finalize()
    dims = (0, 2, 3) if granularity == "channel" else (0,)
    assert torch.allclose(stats.mean["conv"], data.mean(dim=dims, keepdim=True), atol=1e-5)
    assert torch.allclose(stats.std["conv"], data.std(dim=dims, keepdim=True, unbiased=False), atol=1e-5)


def test_statistics_of_token_maps_are_per_last_dim():
    data = torch.randn(6, 5, 7)  # B x T x C
    stats = NeuronStats({"fc": -1}, "channel")
    stats.update({"fc": data})
    stats.finalize()
    assert stats.mean["fc"].shape == (1, 1, 7)


def test_sigma_is_floored_relative_to_the_layer():
    data = torch.stack([torch.tensor([float(i), 5.0]) for i in range(10)])  # second neuron constant
    stats = NeuronStats({"fc": -1}, "channel", sigma_floor=0.1)
    stats.update({"fc": data})
    stats.finalize()
    std0 = data[:, 0].std(unbiased=False).item()
    assert stats.std["fc"][0, 1].item() == pytest.approx(0.1 * std0 / 2, rel=1e-4)


def test_statistics_round_trip_through_state_dict():
    stats = NeuronStats({"a": 1}, "channel")
    stats.update({"a": torch.randn(4, 2, 3, 3)})
    stats.finalize()
    other = NeuronStats({"a": 1}, "channel")
    other.load_state_dict(stats.state_dict())
    assert torch.equal(other.mean["a"], stats.mean["a"]) and torch.equal(other.std["a"], stats.std["a"])
    with pytest.raises(ValueError, match="another model"):
        NeuronStats({"b": 1}).load_state_dict(stats.state_dict())


def test_end_to_end_weights_on_a_tiny_network_match_hand_computation():
    """Teacher = one Linear layer; ∂ℓ/∂f = softmax(f) − onehot(y) for the per-sample summed cross-entropy."""
    from medic_hf.neurons import NeuronRecorder

    layer = nn.Linear(2, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        layer.bias.zero_()
    layer.requires_grad_(False)
    recorder = NeuronRecorder({"fc": layer}, require_grad=True)
    x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([1])
    logits = layer(x)
    f = recorder.pop()["fc"]
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(logits, y, reduction="sum"), [f])
    recorder.remove()
    mean, std = torch.tensor([[0.0, 1.0, 1.0]]), torch.tensor([[1.0, 1.0, 2.0]])
    w, _ = importance_weights(f.detach(), grad, mean, std, temperature=2.0)
    # f = [1, 2, 3]; activation z = [1, 1, 1]; p = softmax(f) = [e, e^2, e^3]/Z; g = p - [0, 1, 0]
    p = softmax([1.0, 2.0, 3.0])
    g = [p[0], p[1] - 1, p[2]]
    imp = softmax([2 * abs(g[0]) * 1.0, 2 * abs(g[1]) * 1.0, 2 * abs(g[2]) * 2.0])
    act = softmax([2.0, 2.0, 2.0])
    expected = [math.sqrt(a * b) for a, b in zip(act, imp)]
    assert w[0].tolist() == pytest.approx(expected, rel=1e-5)
    assert not layer._forward_hooks


def test_cutoff_zeroes_weights_below_the_average():
    f = torch.tensor([[3.0, 0.0, 0.0, 0.0]])
    mean, std = torch.zeros(1, 4), torch.ones(1, 4)
    soft, _ = importance_weights(f, None, mean, std, mode="activation", temperature=1.0)
    cut, _ = importance_weights(f, None, mean, std, mode="activation", temperature=1.0, cutoff=1.0)
    # softmax([3, 0, 0, 0]) = [0.87, 0.043, 0.043, 0.043]: only the first is above 1/4
    assert cut[0].tolist() == pytest.approx([soft[0, 0].item(), 0.0, 0.0, 0.0])
    uniform, _ = importance_weights(f, None, mean, std, mode="none", cutoff=1.0)
    assert torch.allclose(uniform, torch.full_like(uniform, 0.25))
