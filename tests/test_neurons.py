"""Module discovery across torch, timm and transformers, channel dimensions, name filters."""

import pytest
import torch
from timm.layers import BatchNormAct2d, EvoNorm2dB0, EvoNorm2dS0, LayerNorm2d, RmsNorm
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d
from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm

from medic_hf.neurons import NeuronRecorder, channel_dim, find_clone_modules, layer_kind


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
