"""Tiny image classifiers for fast CPU tests.

Every factory returns a freshly initialised model with 10 classes that accepts 3x32x32 inputs. The models cover
the three families medic_hf supports (timm, transformers, plain PyTorch) and the layer types that matter for MEDIC:
BatchNorm with in-place ReLU, timm's fused ``BatchNormAct2d`` with squeeze-excite, attention blocks,
ConvNeXt's ``LayerNorm2d`` with layer-scale parameters, and modules whose output holds several rows per sample
(windowed attention in Swin, unfolded patches in MobileViT, flattened tokens in LeViT) or none (a relative-position
table). Keyword arguments override the defaults so tests can turn on
dropout or stochastic depth.
"""

from collections.abc import Callable

import timm
import torch.nn.functional as F
from torch import nn
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    LevitConfig,
    LevitForImageClassification,
    MobileViTConfig,
    MobileViTForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

NUM_CLASSES = 10
IMAGE_SIZE = 32


def timm_resnet(**kwargs) -> nn.Module:
    """timm ResNet-10-T with narrow stages: BatchNorm2d + in-place ReLU, ~0.3M parameters."""
    args = dict(num_classes=NUM_CLASSES, channels=(16, 32, 64, 128), stem_width=16)
    return timm.create_model("resnet10t", **{**args, **kwargs})


def timm_bnact_se(**kwargs) -> nn.Module:
    """timm MobileNetV3-Small-0.5: ``BatchNormAct2d`` and ``SqueezeExcite`` modules, ~0.6M parameters."""
    return timm.create_model("mobilenetv3_small_050", **{"num_classes": NUM_CLASSES, **kwargs})


def timm_vit(**kwargs) -> nn.Module:
    """timm ViT with 8x8 patches on 32x32 images, two blocks of width 32."""
    args = dict(num_classes=NUM_CLASSES, img_size=IMAGE_SIZE, patch_size=8, depth=2, embed_dim=32, num_heads=2)
    return timm.create_model("vit_tiny_patch16_224", **{**args, **kwargs})


def timm_convnext(**kwargs) -> nn.Module:
    """timm ConvNeXt-Atto with one block per stage: ``LayerNorm2d`` and layer-scale ``gamma`` parameters."""
    args = dict(num_classes=NUM_CLASSES, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
    return timm.create_model("convnext_atto", **{**args, **kwargs})


def timm_swin(**kwargs) -> nn.Module:
    """timm Swin with 4x4 windows: attention modules output (batch x windows, tokens, channels)."""
    args = dict(
        num_classes=NUM_CLASSES,
        img_size=IMAGE_SIZE,
        patch_size=2,
        window_size=4,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(1, 2),
    )
    return timm.create_model("swin_tiny_patch4_window7_224", **{**args, **kwargs})


def timm_levit(**kwargs) -> nn.Module:
    """timm LeViT-128S, one block per stage: BatchNorm1d on flattened tokens (batch x tokens), distilled head."""
    args = dict(
        num_classes=NUM_CLASSES,
        img_size=IMAGE_SIZE,
        embed_dim=(32, 48, 64),
        depth=(1, 1, 1),
        num_heads=(1, 2, 2),
        key_dim=8,
    )
    return timm.create_model("levit_128s", **{**args, **kwargs})


def timm_mobilevit(**kwargs) -> nn.Module:
    """timm MobileViT-XXS: attention over unfolded patches (batch x patch area)."""
    return timm.create_model("mobilevit_xxs", **{"num_classes": NUM_CLASSES, **kwargs})


def timm_vit_relpos(**kwargs) -> nn.Module:
    """timm ViT with a relative-position MLP, whose output is a table with no batch dimension."""
    args = dict(num_classes=NUM_CLASSES, img_size=IMAGE_SIZE, patch_size=8, depth=1, embed_dim=32, num_heads=2)
    return timm.create_model("vit_relpos_small_patch16_224", **{**args, **kwargs})


def hf_vit(**config_kwargs) -> nn.Module:
    """transformers ViT: one layer of width 32, 8x8 patches."""
    args = dict(
        image_size=IMAGE_SIZE,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=NUM_CLASSES,
    )
    return ViTForImageClassification(ViTConfig(**{**args, **config_kwargs}))


def hf_convnext(**config_kwargs) -> nn.Module:
    """transformers ConvNeXt: two stages of width 16 and 32."""
    args = dict(
        image_size=IMAGE_SIZE,
        patch_size=2,
        num_stages=2,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        num_labels=NUM_CLASSES,
    )
    return ConvNextForImageClassification(ConvNextConfig(**{**args, **config_kwargs}))


def hf_resnet(**config_kwargs) -> nn.Module:
    """transformers ResNet: basic blocks, two stages of width 16 and 32."""
    args = dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=NUM_CLASSES)
    return ResNetForImageClassification(ResNetConfig(**{**args, **config_kwargs}))


def hf_swin(**config_kwargs) -> nn.Module:
    """transformers Swin with 4x4 windows."""
    args = dict(
        image_size=IMAGE_SIZE,
        patch_size=2,
        embed_dim=16,
        depths=[1, 1],
        num_heads=[1, 2],
        window_size=4,
        num_labels=NUM_CLASSES,
    )
    return SwinForImageClassification(SwinConfig(**{**args, **config_kwargs}))


def hf_levit(**config_kwargs) -> nn.Module:
    """transformers LeViT, one layer per stage: BatchNorm1d on flattened tokens."""
    args = dict(
        image_size=IMAGE_SIZE,
        hidden_sizes=[32, 48, 64],
        num_attention_heads=[1, 2, 2],
        depths=[1, 1, 1],
        key_dim=[8, 8, 8],
        num_labels=NUM_CLASSES,
    )
    return LevitForImageClassification(LevitConfig(**{**args, **config_kwargs}))


def hf_mobilevit(**config_kwargs) -> nn.Module:
    """transformers MobileViT, narrow: attention over unfolded patches."""
    args = dict(
        image_size=IMAGE_SIZE,
        hidden_sizes=[16, 24, 32],
        neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
        num_labels=NUM_CLASSES,
    )
    return MobileViTForImageClassification(MobileViTConfig(**{**args, **config_kwargs}))


class WideBasicBlock(nn.Module):
    """Pre-activation wide-ResNet block: BN-ReLU-conv-BN-ReLU-conv plus a (projected) shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        needs_projection = stride != 1 or in_planes != out_planes
        self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False) if needs_projection else None

    def forward(self, x):
        out = self.relu1(self.bn1(x))
        # The projection reads the activated input, as in the original WRN code.
        residual = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        return out + residual


class WideResNet(nn.Module):
    """Plain-PyTorch WRN-(6n+4)-k for 32x32 inputs, as used in the backdoor literature (default WRN-10-1).

    ``drop_rate`` is applied functionally before the classifier, like timm's ResNet, so tests can check that
    functional dropout rates stored as module attributes are handled.
    """

    def __init__(self, depth: int = 10, widen_factor: int = 1, num_classes: int = NUM_CLASSES, drop_rate: float = 0.0):
        super().__init__()
        assert (depth - 4) % 6 == 0, "WRN depth must be 6n+4"
        blocks_per_group = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.drop_rate = drop_rate
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        groups = []
        for group, stride in enumerate((1, 2, 2)):
            in_planes = widths[group]
            for _ in range(blocks_per_group):
                groups.append(WideBasicBlock(in_planes, widths[group + 1], stride))
                in_planes, stride = widths[group + 1], 1
        self.blocks = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(widths[-1])
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        x = self.relu(self.bn(self.blocks(self.conv1(x))))
        x = self.pool(x).flatten(1)
        x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self.fc(x)


def plain_wrn(**kwargs) -> nn.Module:
    """Plain-PyTorch WRN-10-1 (~80k parameters)."""
    return WideResNet(**kwargs)


ALL_TINY_MODELS: dict[str, Callable[..., nn.Module]] = {
    "timm_resnet": timm_resnet,
    "timm_bnact_se": timm_bnact_se,
    "timm_vit": timm_vit,
    "timm_convnext": timm_convnext,
    "timm_swin": timm_swin,
    "timm_levit": timm_levit,
    "timm_mobilevit": timm_mobilevit,
    "timm_vit_relpos": timm_vit_relpos,
    "hf_vit": hf_vit,
    "hf_convnext": hf_convnext,
    "hf_resnet": hf_resnet,
    "hf_swin": hf_swin,
    "hf_levit": hf_levit,
    "hf_mobilevit": hf_mobilevit,
    "plain_wrn": plain_wrn,
}
