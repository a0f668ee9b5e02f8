"""Module discovery across torch, timm and transformers, channel dimensions, name filters, and `ClonedNeurons`."""

from functools import partial

import pytest
import torch
from timm.layers import BatchNormAct2d, EvoNorm2dB0, EvoNorm2dS0, LayerNorm2d, RmsNorm
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d
from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm

from medic_hf.cloned_neurons import ClonedNeurons
from medic_hf.neurons import NeuronRecorder, channel_dim, find_clone_modules, layer_kind
from tests.conftest import calibrate, pixel_dataset
from tests.tiny_models import plain_wrn


@pytest.mark.parametrize(
    "module,kind,dim",
    [
        (nn.Conv2d(3, 4, 3), "conv", 1),
        (nn.Linear(4, 4), "linear", -1),
        (nn.BatchNorm2d(4), "norm", 1),
        (nn.GroupNorm(2, 4), "norm", 1),
        (nn.LayerNorm(4), "norm", -1),
        (BatchNormAct2d(4), "norm", 1),
        (LayerNorm2d(4), "norm", 1),
        (RmsNorm(4), "norm", -1),
        (EvoNorm2dB0(4), "norm", 1),
        (EvoNorm2dS0(4, group_size=2), "norm", 1),
        (FrozenBatchNorm2d(4), "norm", 1),
        (ConvNextLayerNorm(4, data_format="channels_first"), "norm", 1),
        (ConvNextLayerNorm(4, data_format="channels_last"), "norm", -1),
        (nn.ReLU(), None, None),
        (nn.Sequential(nn.Conv2d(3, 4, 3)), None, None),
    ],
)
def test_layer_kind_and_channel_dim(module, kind, dim):
    assert layer_kind(module) == kind
    if kind is not None:
        assert channel_dim(module) == dim


def test_name_filters_take_suffixes_or_a_regex():
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model.add_module("fc", nn.Linear(4, 2))
    assert list(find_clone_modules(model)) == ["features.0", "features.1", "fc"]
    assert list(find_clone_modules(model, exclude_modules=["fc"])) == ["features.0", "features.1"]
    assert list(find_clone_modules(model, target_modules=r"features\.\d")) == ["features.0", "features.1"]
    assert list(find_clone_modules(model, kinds=["linear"])) == ["fc"]


def test_recorder_hooks_are_removed():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
    recorder = NeuronRecorder(find_clone_modules(model))
    silent = recorder.probe(model, torch.randn(2, 3, 8, 8))
    assert silent == []
    assert recorder.captures["1"].clone_output  # the in-place ReLU overwrites the BatchNorm output
    assert not recorder.captures["0"].clone_output
    recorder.remove()
    assert all(not m._forward_hooks for m in model.modules())


def test_batch_layout_finds_rows_per_sample_batch_free_outputs_and_interleaved_rows():
    from medic_hf.neurons import batch_layout, probe_batches

    x = torch.randn(2, 3, 4, 4)
    batch_2, batch_3 = probe_batches(x)
    assert torch.equal(batch_2, x) and torch.equal(batch_3[0], x[0]) and torch.equal(batch_3[2], x[1])
    assert not torch.equal(batch_3[1], x[0]) and not torch.equal(batch_3[1], x[1])

    def windows(b):  # (B, C, 4, 4) -> (B * 4 windows, 4 tokens, C), sample after sample, as Swin's partition
        return b.unfold(2, 2, 2).unfold(3, 2, 2).permute(0, 2, 3, 4, 5, 1).reshape(-1, 4, 3)

    assert batch_layout(batch_2.sum(1), batch_3.sum(1)) == ("per_sample", 1)
    assert batch_layout(windows(batch_2), windows(batch_3)) == ("per_sample", 4)
    table = torch.randn(5, 7)
    assert batch_layout(table, table) == ("batch_free", 0)
    assert batch_layout(table[:1], table[:1]) == ("batch_free", 0)  # a (1, ...) positional term

    def interleaved(b):  # token-major rows: (T, B, C) flattened, a sample's rows are not contiguous
        return b.flatten(2).permute(2, 0, 1).reshape(-1, 3)

    assert batch_layout(interleaved(batch_2), interleaved(batch_3)) == ("unsupported", 0)
    assert batch_layout(torch.randn(4, 3), torch.randn(5, 3)) == ("unsupported", 0)


def test_a_1x1_conv_classifier_is_found_as_the_logits_module():
    """timm DLA / DPN: the classifier is a 1x1 convolution after global pooling, its output flattened."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 10, 1), nn.Flatten()).eval()
    recorder = NeuronRecorder(find_clone_modules(model))
    recorder.probe(model, torch.randn(2, 3, 8, 8))
    assert recorder.result_modules == ["2"]
    recorder.remove()


def hooks_on(*models: nn.Module) -> int:
    return sum(len(m._forward_hooks) for model in models for m in model.modules())


def test_cloned_neurons_select_pair_and_leave_out_the_logits():
    data = pixel_dataset(4)
    teacher, student = calibrate(plain_wrn(), data), plain_wrn()
    neurons = ClonedNeurons(teacher, student)
    selected = [n for n, m in teacher.named_modules() if isinstance(m, nn.Conv2d | nn.BatchNorm2d | nn.Linear)]
    assert list(neurons.teacher_recorder.modules) == list(neurons.student_recorder.modules) == selected
    assert hooks_on(teacher) == hooks_on(student) == len(selected)

    left_out = neurons.probe(data[:2]["pixel_values"])
    assert left_out == neurons.left_out == {"fc": "outputs the logits (clone_logits=False)"}
    assert neurons.cloned == [n for n in selected if n != "fc"] == list(neurons.student_recorder.modules)
    assert hooks_on(teacher) == hooks_on(student) == len(selected) - 1
    assert neurons.rows_per_sample == dict.fromkeys(neurons.cloned, 1)
    assert neurons.channel_dims == dict.fromkeys(neurons.cloned, 1)
    assert neurons.neuron_counts["bn"] == 64 * 8 * 8
    assert student.training  # the student's check forward ran in eval mode, its mode is restored
    with pytest.raises(RuntimeError, match="once"):
        neurons.probe(data[:2]["pixel_values"])
    neurons.remove()
    assert hooks_on(teacher, student) == 0

    norms = ClonedNeurons(teacher, student, hook_layers=["norm"], exclude_modules=["bn"])
    assert norms.cloned == [n for n in selected if ".bn" in n]
    norms.remove()


class Narrow(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 8, 8)
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_cloned_neurons_refuse_a_student_of_another_architecture():
    x = pixel_dataset(2)[:2]["pixel_values"]
    with pytest.raises(ValueError, match=r"modules do not match \(e.g. \['blocks.1.shortcut', 'blocks.3.bn1'"):
        ClonedNeurons(plain_wrn(), plain_wrn(depth=16))
    neurons = ClonedNeurons(Narrow().eval(), Narrow(width=8))  # same names, other shapes: found by the probe
    with pytest.raises(ValueError, match=r"Teacher and student outputs do not match at \['conv'\]"):
        neurons.probe(x)
    neurons.remove()
    with pytest.raises(ValueError, match="No norm module to clone in Narrow"):
        ClonedNeurons(Narrow(), hook_layers=["norm"])


def test_recording_removes_the_hooks_when_the_block_ends_or_raises():
    data = pixel_dataset(2)
    teacher, student = calibrate(plain_wrn(), data), plain_wrn()
    neurons = ClonedNeurons(teacher, student)
    with neurons.recording() as recording:
        assert recording is neurons
        recording.probe(data[:2]["pixel_values"])
        teacher(data[:2]["pixel_values"])
        assert list(neurons.teacher_recorder.pop()) == neurons.cloned
    assert hooks_on(teacher, student) == 0
    neurons.remove()  # a second removal does nothing

    neurons = ClonedNeurons(teacher, student)
    with pytest.raises(RuntimeError, match="stop"), neurons.recording():
        raise RuntimeError("stop")
    assert hooks_on(teacher, student) == 0


def statistics_by_hand(f: torch.Tensor, cdim: int, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """μ and σ over the batch (and, per channel, every other dimension), σ floored at 1% of the layer's mean σ."""
    f = f.double()
    dims = [0] if granularity == "neuron" else [d for d in range(f.ndim) if d != cdim % f.ndim]
    mean, std = f.mean(dims, keepdim=True), f.std(dims, keepdim=True, correction=0)
    return mean.float(), torch.maximum(std, 1e-2 * std.mean()).float()


def outputs_of(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each named module's output on x, copied as it leaves the module (before any in-place activation)."""
    outputs, modules = {}, dict(model.named_modules())

    def keep(name, module, inputs, output) -> None:  # returns None: the model goes on with its own output
        outputs[name] = output.detach().clone()

    handles = [modules[n].register_forward_hook(partial(keep, n)) for n in names]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return outputs


@pytest.mark.parametrize("granularity", ["channel", "neuron"])
def test_statistics_are_those_computed_by_hand(granularity):
    """plain WRN: BatchNorm outputs overwritten by in-place ReLUs; batches of 4 and 2 samples."""
    data = pixel_dataset(6)
    x = data[:6]["pixel_values"]
    teacher = calibrate(plain_wrn(), data)
    neurons = ClonedNeurons(teacher)
    with pytest.raises(RuntimeError, match="probe"):
        neurons.statistics([x])
    with neurons.recording():
        neurons.probe(x[:2])
        stats = neurons.statistics(x.split(4), granularity)
    expected = outputs_of(teacher, neurons.cloned, x)
    assert list(stats.mean) == neurons.cloned and "fc" not in stats.mean
    for name, f in expected.items():
        mean, std = statistics_by_hand(f, 1, granularity)
        assert torch.allclose(stats.mean[name], mean, rtol=1e-5, atol=1e-6), name
        assert torch.allclose(stats.std[name], std, rtol=1e-5, atol=1e-6), name


class Patches(nn.Module):
    """A linear layer over each sample's 4 patch tokens, stored as (B·4, C) rows, sample after sample."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 16, 16)
        self.mix = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        tokens = self.conv(x).flatten(2).transpose(1, 2)  # (B, 4, C) on 32x32 images
        return self.fc(self.mix(tokens.reshape(-1, 4)).reshape(tokens.shape).mean(1))


@pytest.mark.parametrize("granularity", ["channel", "neuron"])
def test_statistics_of_several_rows_per_sample_are_over_each_samples_rows(granularity):
    x = pixel_dataset(6)[:6]["pixel_values"]
    model = Patches().eval()
    neurons = ClonedNeurons(model)
    with neurons.recording():
        neurons.probe(x[:2])
        stats = neurons.statistics(x.split(4), granularity)
    assert neurons.rows_per_sample == {"conv": 1, "mix": 4} and neurons.channel_dims == {"conv": 1, "mix": -1}
    assert neurons.neuron_counts == {"conv": 4 * 2 * 2, "mix": 4 * 4}
    expected = outputs_of(model, ["conv", "mix"], x)
    expected["mix"] = expected["mix"].reshape(6, 4, 4)  # a sample's neurons: its 4 rows
    for name, cdim in neurons.channel_dims.items():
        mean, std = statistics_by_hand(expected[name], cdim, granularity)
        assert stats.mean[name].shape == mean.shape, name
        assert torch.allclose(stats.mean[name], mean, rtol=1e-5, atol=1e-6), name
        assert torch.allclose(stats.std[name], std, rtol=1e-5, atol=1e-6), name
