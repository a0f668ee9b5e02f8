"""Which image-classifier architectures MEDIC can clone: a sweep over timm, transformers and plain-PyTorch models.

For every architecture in `ARCHITECTURES`, in a process of its own with a wall-clock limit, the worker

1. builds a tiny, randomly initialised 10-class model (no pretrained weights; depth, width and image size shrunk
   with the keyword arguments listed next to its name, so that it runs in seconds on one CPU thread);
2. clones it with `MedicCloner` for 2 optimizer steps (batch 4) on 16 random images, then `save_model()`;
3. reloads the saved folder the way a user would: `timm.create_model("local-dir:<dir>", pretrained=True)`,
   `AutoModelForImageClassification.from_pretrained(<dir>)`, or `medic_hf.modeling.load_native(<dir>, model=...)`
   with a freshly built instance for plain PyTorch models, and checks that the reloaded model is of the same class
   and gives the same logits as the cloned student on a fixed input (eval mode);
4. reports one JSON line: parameter count, the modules cloned, those left out and why, the modules whose outputs
   have several rows per image (windowed attention), the result ("ok", the error, or "timeout") and the seconds.

    python benchmarks/arch_sweep.py                              # everything, 2 processes at a time
    python benchmarks/arch_sweep.py --jobs 1 --timeout 120
    python benchmarks/arch_sweep.py --only swin_tiny_patch4_window7_224 SwinForImageClassification
    python benchmarks/arch_sweep.py --list                       # the architectures, without running anything
    python benchmarks/arch_sweep.py --report_only                # rewrite the reports from results.json
    python benchmarks/arch_sweep.py --worker timm resnet18       # one architecture in this process (debugging)

Writes `<output_dir>/results.json` and `<output_dir>/results.md` (default `benchmarks/results/arch_sweep`; an
`--only` run replaces its architectures' entries and keeps the others), the logs of the architectures that did not
pass under `<output_dir>/logs/`, and the "Supported architectures" page `docs/architectures.md`.

Each architecture runs in its own process, with OMP_NUM_THREADS=1 and HF_HUB_OFFLINE=1. On Linux that process is
forked from the sweep after it has imported torch, timm, transformers and medic_hf once, which saves the ~9 s of
imports per architecture; `--spawn` starts a fresh interpreter (`--worker <family> <name>`) for each instead.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT_DIR = REPO_ROOT / "benchmarks" / "results" / "arch_sweep"
DOCS_PAGE = REPO_ROOT / "docs" / "architectures.md"
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
NUM_CLASSES = 10
NUM_SAMPLES = 16
BATCH_SIZE = 4
MAX_STEPS = 2
RTOL, ATOL = 1e-4, 1e-5

# --------------------------------------------------------------------------------------------------------------------
# The architectures: (family, name, keyword arguments, input side in pixels)
#
# timm: timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
# transformers: name is the model class; it is built as cls(cls.config_class(num_labels=10, **kwargs))
# plain: a class of this file or of torchvision.models, called with **kwargs
# --------------------------------------------------------------------------------------------------------------------

TIMM_VIT = dict(img_size=32, patch_size=4, depth=2)
TIMM_SWIN = dict(img_size=64, window_size=4, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
HF_VIT = dict(
    image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
)
HF_DINOV2 = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2)
HF_STAGES = dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])
HF_PVT = dict(HF_STAGES, num_attention_heads=[1, 1, 2, 4])
HF_SWIN = dict(image_size=64, patch_size=4, window_size=4, embed_dim=16, depths=[2, 2, 2], num_heads=[1, 2, 4])
HF_LEVIT = dict(image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2], depths=[1, 1, 1])
# Cvt needs depth[i] > i: CvtStage i reads drop_path_rates[i] from a list of depth[i] rates.
HF_CVT = dict(embed_dim=[16, 32, 64], num_heads=[1, 2, 2], depth=[1, 2, 3])
HF_TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)

ARCHITECTURES: list[tuple[str, str, dict, int]] = [
    # ---- timm: convolutional networks
    ("timm", "resnet18", {}, 32),
    ("timm", "resnext26ts", {}, 32),
    ("timm", "resnest14d", {}, 32),
    ("timm", "tresnet_m", {}, 64),
    ("timm", "regnetx_002", {}, 32),
    ("timm", "regnety_002", {}, 32),
    ("timm", "repvgg_a0", {}, 32),
    ("timm", "efficientnet_b0", {}, 32),
    ("timm", "efficientnetv2_rw_t", {}, 32),
    ("timm", "mobilenetv2_050", {}, 32),
    ("timm", "mobilenetv3_small_050", {}, 32),
    ("timm", "mobilenetv4_conv_small_050", {}, 32),
    ("timm", "mobilenetv4_hybrid_medium", {}, 64),
    ("timm", "ghostnet_050", {}, 32),
    ("timm", "ghostnetv2_100", {}, 64),
    ("timm", "rexnet_100", {}, 32),
    ("timm", "convnext_atto", {}, 32),
    ("timm", "convnextv2_atto", {}, 32),
    ("timm", "densenet121", {}, 32),
    ("timm", "dla46_c", {}, 32),
    ("timm", "dpn48b", {}, 32),
    ("timm", "hrnet_w18_small", {}, 64),
    ("timm", "inception_v3", {}, 75),
    ("timm", "nf_regnet_b0", {}, 32),
    ("timm", "inception_next_atto", {}, 32),
    ("timm", "mambaout_femto", {}, 32),
    ("timm", "hgnetv2_b0", {}, 32),
    ("timm", "repvit_m0_9", {}, 32),
    ("timm", "edgenext_xx_small", {}, 64),
    ("timm", "poolformer_s12", {}, 32),
    ("timm", "caformer_s18", {}, 32),
    # ---- timm: hybrids and efficient attention
    ("timm", "efficientvit_b0", {}, 64),
    ("timm", "efficientvit_m0", {"img_size": 64}, 64),
    ("timm", "shvit_s1", {}, 64),
    ("timm", "efficientvim_m1", {}, 64),
    ("timm", "fastvit_sa12", {}, 64),
    ("timm", "swiftformer_xs", {}, 64),
    ("timm", "efficientformer_l1", {}, 224),
    ("timm", "efficientformerv2_s0", {"img_size": 64}, 64),
    ("timm", "mobilevit_xxs", {}, 64),
    ("timm", "mobilevitv2_050", {}, 64),
    ("timm", "levit_128s", {"img_size": 64}, 64),
    ("timm", "levit_conv_128s", {"img_size": 64}, 64),
    ("timm", "tiny_vit_5m_224", {}, 64),
    ("timm", "botnet26t_256", {"img_size": 64}, 64),
    ("timm", "lambda_resnet26t", {"img_size": 64}, 64),
    ("timm", "coatnet_pico_rw_224", {"img_size": 64}, 64),
    ("timm", "maxvit_rmlp_pico_rw_256", {"img_size": 64}, 64),
    # ---- timm: vision transformers
    ("timm", "vit_tiny_patch16_224", TIMM_VIT, 32),
    ("timm", "vit_small_patch14_reg4_dinov2", TIMM_VIT, 32),
    ("timm", "vit_base_patch16_siglip_224", dict(TIMM_VIT, embed_dim=64, num_heads=2), 32),
    ("timm", "vit_tiny_r_s16_p8_224", dict(img_size=64, depth=2), 64),
    ("timm", "vit_relpos_small_patch16_224", TIMM_VIT, 32),
    ("timm", "deit_tiny_patch16_224", TIMM_VIT, 32),
    ("timm", "deit_tiny_distilled_patch16_224", TIMM_VIT, 32),
    ("timm", "beit_base_patch16_224", dict(TIMM_VIT, embed_dim=64, num_heads=2), 32),
    ("timm", "eva02_tiny_patch14_224", TIMM_VIT, 32),
    (
        "timm",
        "samvit_base_patch16",
        dict(img_size=64, patch_size=8, depth=2, embed_dim=64, num_heads=2, window_size=4, global_attn_indexes=(1,)),
        64,
    ),
    ("timm", "cait_xxs24_224", dict(TIMM_VIT, depth_token_only=1), 32),
    ("timm", "convit_tiny", dict(TIMM_VIT, local_up_to_layer=1), 32),
    ("timm", "xcit_nano_12_p16_224", dict(img_size=32, patch_size=8, depth=2), 32),
    ("timm", "tnt_s_patch16_224", dict(img_size=32, patch_size=8, depth=2), 32),
    ("timm", "pit_ti_distilled_224", {"img_size": 64}, 64),
    ("timm", "crossvit_tiny_240", {}, 240),
    ("timm", "volo_d1_224", {"img_size": 32}, 32),
    ("timm", "mixer_s32_224", {"img_size": 64}, 64),
    ("timm", "gmlp_ti16_224", {"img_size": 32}, 32),
    ("timm", "resmlp_12_224", {"img_size": 32}, 32),
    ("timm", "sequencer2d_s", {"layers": (1, 1, 1, 1)}, 32),
    # ---- timm: hierarchical transformers
    ("timm", "swin_tiny_patch4_window7_224", TIMM_SWIN, 64),
    ("timm", "swinv2_tiny_window8_256", TIMM_SWIN, 64),
    ("timm", "swinv2_cr_tiny_224", TIMM_SWIN, 64),
    ("timm", "gcvit_xxtiny", {"img_size": 64}, 64),
    ("timm", "davit_tiny", {"depths": (1, 1, 1, 1)}, 64),
    ("timm", "focalnet_tiny_srf", {}, 64),
    ("timm", "pvt_v2_b0", {}, 32),
    ("timm", "twins_svt_small", {"depths": (1, 1, 1, 1)}, 32),
    ("timm", "coat_lite_tiny", {"img_size": 32}, 32),
    ("timm", "nest_tiny", {"img_size": 32}, 32),
    ("timm", "mvitv2_tiny", {"img_size": 64}, 64),
    ("timm", "hiera_tiny_224", {"img_size": 64}, 64),
    # ---- transformers
    ("transformers", "ViTForImageClassification", HF_VIT, 32),
    ("transformers", "DeiTForImageClassification", HF_VIT, 32),
    ("transformers", "DeiTForImageClassificationWithTeacher", HF_VIT, 32),
    ("transformers", "BeitForImageClassification", dict(HF_VIT, use_relative_position_bias=True), 32),
    ("transformers", "Data2VecVisionForImageClassification", dict(HF_VIT, use_relative_position_bias=True), 32),
    ("transformers", "Dinov2ForImageClassification", HF_DINOV2, 32),
    ("transformers", "Dinov2WithRegistersForImageClassification", HF_DINOV2, 32),
    ("transformers", "CLIPForImageClassification", dict(vision_config=HF_VIT, text_config=HF_TEXT), 32),
    ("transformers", "SiglipForImageClassification", dict(vision_config=HF_VIT, text_config=HF_TEXT), 32),
    ("transformers", "ConvNextForImageClassification", HF_STAGES, 32),
    ("transformers", "ConvNextV2ForImageClassification", HF_STAGES, 32),
    ("transformers", "ResNetForImageClassification", dict(HF_STAGES, embedding_size=16, layer_type="basic"), 32),
    ("transformers", "RegNetForImageClassification", dict(HF_STAGES, embedding_size=16, groups_width=8), 32),
    ("transformers", "BitForImageClassification", dict(HF_STAGES, embedding_size=16, num_groups=8), 32),
    (
        "transformers",
        "EfficientNetForImageClassification",
        dict(image_size=32, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320),
        32,
    ),
    ("transformers", "MobileNetV1ForImageClassification", dict(image_size=32, depth_multiplier=0.25), 32),
    ("transformers", "MobileNetV2ForImageClassification", dict(image_size=32, depth_multiplier=0.35), 32),
    (
        "transformers",
        "MobileViTForImageClassification",
        dict(image_size=64, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64]),
        64,
    ),
    ("transformers", "MobileViTV2ForImageClassification", dict(image_size=64, width_multiplier=0.25), 64),
    ("transformers", "PoolFormerForImageClassification", HF_STAGES, 32),
    ("transformers", "PvtForImageClassification", dict(HF_PVT, image_size=32), 32),
    ("transformers", "PvtV2ForImageClassification", HF_PVT, 32),
    ("transformers", "SegformerForImageClassification", dict(HF_PVT, decoder_hidden_size=32), 32),
    ("transformers", "FocalNetForImageClassification", dict(image_size=32, embed_dim=16, depths=[1, 1, 1, 1]), 32),
    (
        "transformers",
        "HieraForImageClassification",
        dict(image_size=[64, 64], embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 4]),
        64,
    ),
    ("transformers", "SwinForImageClassification", HF_SWIN, 64),
    ("transformers", "Swinv2ForImageClassification", HF_SWIN, 64),
    ("transformers", "LevitForImageClassification", HF_LEVIT, 64),
    ("transformers", "LevitForImageClassificationWithTeacher", HF_LEVIT, 64),
    ("transformers", "CvtForImageClassification", HF_CVT, 32),
    ("transformers", "SwiftFormerForImageClassification", dict(depths=[1, 1, 1, 1], embed_dims=[16, 32, 64, 128]), 32),
    ("transformers", "HGNetV2ForImageClassification", {}, 32),
    ("transformers", "TextNetForImageClassification", {}, 32),
    ("transformers", "TimmWrapperForImageClassification", {"architecture": "resnet18"}, 32),
    # ---- plain PyTorch
    ("plain", "SmallCNN", {}, 32),
    ("plain", "WideResNet", {"depth": 16, "widen_factor": 1}, 32),
    ("plain", "torchvision.resnet18", {}, 32),
    ("plain", "torchvision.mobilenet_v3_small", {}, 32),
    ("plain", "torchvision.shufflenet_v2_x0_5", {}, 32),
    ("plain", "torchvision.squeezenet1_1", {}, 64),
    ("plain", "torchvision.efficientnet_b0", {}, 32),
    (
        "plain",
        "torchvision.VisionTransformer",
        dict(image_size=32, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64),
        32,
    ),
    (
        "plain",
        "torchvision.SwinTransformer",
        dict(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=[4, 4]),
        32,
    ),
]


# --------------------------------------------------------------------------------------------------------------------
# Plain PyTorch classifiers
# --------------------------------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks, global average pooling and a linear classifier."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 16):
        super().__init__()
        layers, channels = [], 3
        for out_channels in (width, 2 * width, 4 * width):
            layers += [
                nn.Conv2d(channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


class _WideBasicBlock(nn.Module):
    """Pre-activation basic block of a wide ResNet (Zagoruyko & Komodakis, 2016)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(self.relu(self.bn2(self.conv1(out))))
        return out + residual


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for 32x32 inputs, as used in the backdoor literature (WRN-16-1 by default)."""

    def __init__(self, depth: int = 16, widen_factor: int = 1, num_classes: int = NUM_CLASSES):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}.")
        blocks_per_stage = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        stages, channels = [], widths[0]
        for stage, width in enumerate(widths[1:]):
            blocks = []
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(_WideBasicBlock(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn(self.stages(self.conv1(x))))
        return self.fc(self.pool(out).flatten(1))


PLAIN_CLASSES = {"SmallCNN": SmallCNN, "WideResNet": WideResNet}


# --------------------------------------------------------------------------------------------------------------------
# The worker: one architecture
# --------------------------------------------------------------------------------------------------------------------


class RoundTripError(AssertionError):
    """The reloaded model is not the cloned one: another class, or other logits."""


def find_architecture(family: str, name: str) -> tuple[str, str, dict, int]:
    for arch in ARCHITECTURES:
        if arch[0] == family and arch[1] == name:
            return arch
    raise SystemExit(f"Unknown architecture {family} {name}: see `python benchmarks/arch_sweep.py --list`.")


def build_model(family: str, name: str, kwargs: dict) -> nn.Module:
    """A freshly initialised 10-class model; the same call always builds the same architecture."""
    if family == "timm":
        import timm

        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)
    if family == "transformers":
        import transformers

        cls = getattr(transformers, name)
        return cls(cls.config_class(num_labels=NUM_CLASSES, **kwargs))
    if family == "plain":
        if name.startswith("torchvision."):
            import torchvision

            builder = getattr(torchvision.models, name.removeprefix("torchvision."))
            if isinstance(builder, type):  # a model class, e.g. VisionTransformer
                return builder(num_classes=NUM_CLASSES, **kwargs)
            return builder(weights=None, num_classes=NUM_CLASSES, **kwargs)
        return PLAIN_CLASSES[name](num_classes=NUM_CLASSES, **kwargs)
    raise ValueError(f"Unknown family {family!r}: timm, transformers or plain.")


def reload_model(family: str, name: str, kwargs: dict, folder: str) -> nn.Module:
    """Load the cloner's output folder with the model's own library, as a user would."""
    if family == "timm":
        import timm

        return timm.create_model(f"local-dir:{folder}", pretrained=True)
    if family == "transformers":
        from transformers import AutoModelForImageClassification

        return AutoModelForImageClassification.from_pretrained(folder)
    from medic_hf.modeling import load_native

    return load_native(folder, model=build_model(family, name, kwargs))


def random_dataset(image_size: int):
    """16 rows of `pixel_values` (float32, 3 x side x side, standard normal) and `labels` (0..9), as torch tensors."""
    import datasets
    import numpy as np

    rng = np.random.default_rng(0)
    pixel_values = rng.standard_normal((NUM_SAMPLES, 3, image_size, image_size), dtype=np.float32)
    labels = np.arange(NUM_SAMPLES) % NUM_CLASSES
    return datasets.Dataset.from_dict({"pixel_values": pixel_values, "labels": labels}).with_format("torch")


def _first_line(exc: BaseException, max_chars: int = 300) -> str:
    """The error's type and the first line of its message, cut at `max_chars` (the traceback keeps the rest)."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def _record_modules(record: dict, cloner) -> None:
    """What the cloner hooks: `cloned_modules`, `left_out_modules` and `rows_per_sample`, when it exposes them."""
    cloned = getattr(cloner, "cloned_modules", None)
    if cloned is None:  # older cloners: the teacher's recorder holds the cloned modules
        recorder = getattr(cloner, "teacher_recorder", None)
        cloned = list(getattr(recorder, "modules", None) or [])
    record["cloned_modules"] = len(cloned)
    left_out = getattr(cloner, "left_out_modules", None)
    record["left_out"] = None if left_out is None else {str(k): str(v) for k, v in dict(left_out).items()}
    rows = getattr(cloner, "rows_per_sample", None)
    record["per_sample_rows"] = None if rows is None else {str(k): int(v) for k, v in dict(rows).items() if v > 1}


def run_architecture(family: str, name: str) -> dict:
    """Build, clone for 2 steps, save, reload and compare one architecture; never raises."""
    import transformers

    from medic_hf import MedicCloner, MedicConfig
    from medic_hf.modeling import forward_logits

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    _, _, kwargs, image_size = find_architecture(family, name)
    record = {"family": family, "name": name, "kwargs": kwargs, "image_size": image_size}
    record.update(params=None, cloned_modules=None, left_out=None, per_sample_rows=None, max_abs_diff=None)
    start = time.perf_counter()
    stage = "build"
    try:
        # Not seed 0: the cloner initialises the student with MedicConfig.seed (0), and an untrained teacher drawn
        # from the same seed would equal its student, which make_student rightly refuses.
        torch.manual_seed(1234)
        model = build_model(family, name, kwargs)
        record["params"] = sum(p.numel() for p in model.parameters())
        dataset = random_dataset(image_size)
        with tempfile.TemporaryDirectory(prefix="arch_sweep_") as output_dir:
            stage = "setup"
            args = MedicConfig(
                output_dir=output_dir,
                max_steps=MAX_STEPS,
                per_device_train_batch_size=BATCH_SIZE,
                save_strategy="no",
                report_to="none",
                disable_tqdm=True,
                logging_steps=1,
                seed=0,
                use_cpu=True,
            )
            cloner = MedicCloner(model, args, train_dataset=dataset)
            _record_modules(record, cloner)
            stage = "train"
            cloner.train()
            _record_modules(record, cloner)
            stage = "save"
            cloner.save_model()
            student = cloner.accelerator.unwrap_model(cloner.model).eval()
            stage = "reload"
            reloaded = reload_model(family, name, kwargs, output_dir).eval()
            stage = "compare"
            if type(reloaded) is not type(student):
                raise RoundTripError(f"reloaded as {type(reloaded).__name__}, not {type(student).__name__}")
            x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                expected, actual = forward_logits(student, x), forward_logits(reloaded, x)
            if expected.shape != actual.shape:
                raise RoundTripError(f"logits of shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
            record["max_abs_diff"] = float((expected - actual).abs().max())
            if not torch.allclose(expected, actual, rtol=RTOL, atol=ATOL):
                raise RoundTripError(f"reloaded logits differ (max |diff| {record['max_abs_diff']:.3g})")
        record["result"] = "ok"
    except Exception as exc:
        traceback.print_exc()
        record["result"] = _first_line(exc)
        record["stage"] = stage
        record["traceback"] = traceback.format_exc()[-3000:]
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def worker_main(family: str, name: str) -> None:
    """Run one architecture and print its record as the last line of stdout, one line of JSON."""
    record = run_architecture(family, name)
    sys.stderr.flush()
    print(json.dumps(record), flush=True)


# --------------------------------------------------------------------------------------------------------------------
# The sweep: one process per architecture
# --------------------------------------------------------------------------------------------------------------------


class Job:
    """One architecture running in a child process whose stdout and stderr go to `log_path`."""

    def __init__(self, arch: tuple, log_path: Path, spawn: bool):
        self.family, self.name = arch[0], arch[1]
        self.log_path = log_path
        # The worker's temporary files go here, so that they are removed even when a timeout kills it.
        self.tmp_dir = tempfile.mkdtemp(prefix="arch_sweep_")
        self.start = time.perf_counter()
        if spawn:
            with log_path.open("wb") as log:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", self.family, self.name]
                env = dict(os.environ, **WORKER_ENV, TMPDIR=self.tmp_dir)
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            self.pid = proc.pid
            self._proc = proc
        else:
            self._proc = None
            sys.stdout.flush()
            sys.stderr.flush()
            self.pid = os.fork()
            if self.pid == 0:
                self._run_forked()

    def _run_forked(self) -> None:
        code = 1
        try:
            os.setpgid(0, 0)  # its own process group, so a timeout kills whatever it started too
            fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            os.environ["TMPDIR"] = tempfile.tempdir = self.tmp_dir
            worker_main(self.family, self.name)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def poll(self) -> int | None:
        """The exit code once the process has ended, else None."""
        if self._proc is not None:
            return self._proc.poll()
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        return None if pid == 0 else os.waitstatus_to_exitcode(status)

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            os.kill(self.pid, signal.SIGKILL)
        if self._proc is not None:
            self._proc.wait()
        else:
            os.waitpid(self.pid, 0)

    def cleanup(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _parse_record(job: Job, returncode: int) -> dict:
    """The worker's JSON line (the last line of its log that is a JSON object), or a record of the crash."""
    lines = job.log_path.read_text(errors="replace").splitlines() if job.log_path.exists() else []
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("name") == job.name:
                return record
    _, _, kwargs, image_size = find_architecture(job.family, job.name)
    last = next((line.strip() for line in reversed(lines) if line.strip()), "no output")
    return _failed_record(job, kwargs, image_size, f"crashed (exit code {returncode}): {last[:200]}")


def _failed_record(job: Job, kwargs: dict, image_size: int, result: str) -> dict:
    return {
        "family": job.family,
        "name": job.name,
        "kwargs": kwargs,
        "image_size": image_size,
        "params": None,
        "cloned_modules": None,
        "left_out": None,
        "per_sample_rows": None,
        "max_abs_diff": None,
        "result": result,
        "seconds": round(job.elapsed(), 2),
    }


def _preload(archs: list[tuple]) -> None:
    """Import everything the workers need once, so that forked workers start at once."""
    import datasets  # noqa: F401
    import timm  # noqa: F401
    import torchvision  # noqa: F401
    import transformers
    from transformers import AutoModelForImageClassification  # noqa: F401

    import medic_hf.modeling  # noqa: F401

    for family, name, _, _ in archs:
        if family == "transformers":
            getattr(transformers, name)  # imports the model's module


def _progress_line(index: int, total: int, record: dict) -> str:
    head = f"[{index:>3}/{total}] {record['family']:<12} {record['name']:<42} {record['seconds']:>6.1f} s  "
    if record["result"] != "ok":
        stage = f"{record['stage']}: " if record.get("stage") else ""
        return head + f"FAIL  {stage}{record['result']}"
    return head + f"ok    {_modules_summary(record)}"


def _modules_summary(record: dict) -> str:
    rows = record.get("per_sample_rows")
    left_out = record.get("left_out")
    return (
        f"cloned {record['cloned_modules']}, per-sample rows {'n/a' if rows is None else len(rows)}, "
        f"left out {'n/a' if left_out is None else len(left_out)}"
    )


def run_sweep(archs: list[tuple], args) -> list[dict]:
    log_dir = args.output_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    if not args.only:  # a full sweep: no log of an earlier run may outlive it
        for old_log in log_dir.glob("*.log"):
            old_log.unlink()
    spawn = args.spawn or not hasattr(os, "fork") or not sys.platform.startswith("linux")
    if not spawn:
        _preload(archs)
    pending = list(archs)
    running: list[Job] = []
    records: dict[tuple[str, str], dict] = {}
    done = 0
    while pending or running:
        while pending and len(running) < args.jobs:
            arch = pending.pop(0)
            running.append(Job(arch, log_dir / f"{arch[0]}-{arch[1]}.log", spawn))
        time.sleep(0.05)
        for job in list(running):
            returncode = job.poll()
            if returncode is None and job.elapsed() > args.timeout:
                job.kill()
                _, _, kwargs, image_size = find_architecture(job.family, job.name)
                record = _failed_record(job, kwargs, image_size, "timeout")
            elif returncode is None:
                continue
            else:
                record = _parse_record(job, returncode)
            running.remove(job)
            job.cleanup()
            done += 1
            records[(job.family, job.name)] = record
            if record["result"] == "ok":
                job.log_path.unlink(missing_ok=True)
            print(_progress_line(done, len(archs), record), flush=True)
    return [records[(a[0], a[1])] for a in archs]


# --------------------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------------------


def _left_out_cell(record: dict) -> str:
    left_out = record.get("left_out")
    if left_out is None:
        return "n/a"
    counts = collections.Counter(left_out.values())
    return "; ".join(f"{reason}: {count}" for reason, count in sorted(counts.items())) or "none"


def _result_cell(record: dict, max_chars: int | None = None) -> str:
    if record["result"] == "ok":
        return "ok"
    text = f"{record['stage']}: {record['result']}" if record.get("stage") else record["result"]
    if max_chars and len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    return "**" + text.replace("|", "\\|").replace("\n", " ") + "**"


def _params_cell(params: int | None) -> str:
    return "n/a" if params is None else f"{params / 1e6:.2f}M"


def _count_cell(value) -> str:
    if value is None:
        return "n/a"
    return str(len(value)) if isinstance(value, dict) else str(value)


def table(records: list[dict], *, details: bool = False) -> list[str]:
    """The Markdown table; `details` adds the input side and the shrinking kwargs, and keeps errors whole."""
    header = "| family | architecture | params | cloned modules | per-sample-row modules | left out (reason: count) |"
    header += " input | kwargs | result | seconds |" if details else " result | seconds |"
    lines = [header, "|" + "---|" * header.count(" |")]
    for r in records:
        cells = [
            r["family"],
            f"`{r['name']}`",
            _params_cell(r.get("params")),
            _count_cell(r.get("cloned_modules")),
            _count_cell(r.get("per_sample_rows")),
            _left_out_cell(r),
        ]
        if details:
            kwargs = json.dumps(r.get("kwargs") or {}, separators=(", ", "=")).replace('"', "")
            cells += [f"{r['image_size']}", kwargs.replace("|", "\\|")]
        cells += [_result_cell(r, None if details else 160), f"{r['seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary(records: list[dict]) -> dict:
    ok = [r for r in records if r["result"] == "ok"]
    by_family = {}
    for family in ("timm", "transformers", "plain"):
        rows = [r for r in records if r["family"] == family]
        if rows:
            by_family[family] = [sum(r["result"] == "ok" for r in rows), len(rows)]
    reasons = collections.Counter(v for r in records for v in (r.get("left_out") or {}).values())
    return {
        "ok": len(ok),
        "total": len(records),
        "by_family": by_family,
        "left_out_reasons": dict(sorted(reasons.items())),
        "architectures_with_per_sample_rows": sum(bool(r.get("per_sample_rows")) for r in records),
        "failures": {f"{r['family']}/{r['name']}": _result_cell(r).strip("*") for r in records if r not in ok},
    }


def summary_lines(report: dict) -> list[str]:
    s = report["summary"]
    families = ", ".join(f"{family} {ok}/{total}" for family, (ok, total) in s["by_family"].items())
    lines = [f"**{s['ok']}/{s['total']} architectures cloned and round-tripped** ({families}).", ""]
    reasons = "; ".join(f"{reason}: {count}" for reason, count in s["left_out_reasons"].items()) or "none"
    lines += [
        f"Modules left out over all architectures, by reason: {reasons}. Architectures with per-sample-row modules: "
        f"{s['architectures_with_per_sample_rows']}.",
        "",
    ]
    return lines


def machine_description() -> str:
    gpu = "no GPU" if not torch.cuda.is_available() else "a GPU, unused (use_cpu=True)"
    return f"{os.cpu_count()} CPU cores, {gpu}; one thread per architecture"


def write_reports(report: dict, output_dir: Path, docs_page: Path | None) -> None:
    """results.json and results.md in `output_dir`, and the docs page."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    commands = [report["command"]] + report.get("partial_reruns", [])
    run = "\n".join(
        [
            f"- Command: `{commands[0]}`"
            + "".join(f", then `{c}`" for c in commands[1:])
            + f" ({report['date']}; {report['wall_seconds']:.0f} s wall time, timeout {report['timeout']:.0f} s)",
            f"- Machine: {report['machine']}",
            f"- Versions: {report['versions']}",
        ]
    )
    results_md = ["# Architecture sweep", "", run, "", *summary_lines(report), *table(report["records"], details=True)]
    failures = [r for r in report["records"] if r["result"] != "ok"]
    if failures:
        results_md += ["", "## Failures", ""]
        for r in failures:
            results_md.append(f"- {r['family']} `{r['name']}`: {_result_cell(r).strip('*')}")
    (output_dir / "results.md").write_text("\n".join(results_md) + "\n", encoding="utf-8")
    if docs_page is not None:
        docs_page.parent.mkdir(parents=True, exist_ok=True)
        results = Path(os.path.relpath(output_dir, docs_page.resolve().parent)).as_posix()
        docs_page.write_text(docs_text(report, run, results), encoding="utf-8")


def docs_text(report: dict, run: str, results: str) -> str:
    """The "Supported architectures" page; `results` is the sweep's output folder relative to the page."""
    intro = f"""# Supported architectures

`MedicCloner` clones the outputs of the convolution, normalization and linear modules of timm, transformers and
plain-PyTorch image classifiers. This page lists the architectures checked by `benchmarks/arch_sweep.py`. For each,
in a process of its own with a time limit, a tiny randomly initialised 10-class model (no pretrained weights; depth,
width and input size shrunk with the keyword arguments listed in [results.md]({results}/results.md)) was

1. cloned with `MedicCloner` for {MAX_STEPS} MEDIC optimizer steps (batch {BATCH_SIZE}, {NUM_SAMPLES} random images,
   otherwise the default `MedicConfig`: λ = 10, τ = 5, both importance criteria, conv, norm and linear modules,
   logits left out), then saved with `save_model()`;
2. reloaded natively from the saved folder, as a user would: `timm.create_model("local-dir:<dir>", pretrained=True)`,
   `AutoModelForImageClassification.from_pretrained("<dir>")`, or, for plain PyTorch models,
   `medic_hf.modeling.load_native("<dir>", model=...)` with a freshly built instance;
3. required to be of the cloned student's class and to give the same logits as the student on a fixed input (eval
   mode, `torch.allclose(rtol={_sci(RTOL)}, atol={_sci(ATOL)})`).

This shows that cloning, saving and reloading run on the architecture; it says nothing about how well MEDIC removes
a backdoor from it (for that, see [removal.md](removal.md) and [benchmarks.md](benchmarks.md)).

{run}

"""
    columns = """Columns: *params*, the model's parameter count; *cloned modules*, the modules whose outputs enter the
clone loss; *per-sample-row modules*, the cloned modules whose output has k > 1 rows per image (e.g. windowed
attention, which folds the windows into the batch dimension); *left out*, the modules of the selected kinds that
the cloner does not clone, counted per reason as the cloner gives it; *result*, "ok", "timeout", or the stage that
failed (build, setup, train, save, reload, compare) with the first line of the error; *seconds*, the wall time of
the whole check (building, cloning, saving, reloading), imports excluded.

"""
    notes = """
## What the left-out reasons mean, and known limits

- *outputs the logits*: the classifier, left out by default (`clone_logits=False`, [method.md](method.md)); LeViT's
  distilled models average two heads, so two are left out. A classifier whose output is the logits only after an
  activation and pooling (torchvision's SqueezeNet: 1x1 conv, ReLU, average pool) is not recognised and stays
  cloned.
- *output does not depend on the input (no batch dimension)*: relative-position MLPs and tables (timm
  `vit_relpos`, MaxViT, SwinV2; transformers Swinv2) and XCiT's `(1, C, H, W)` positional term. They are no
  sample's neurons (see "Rows per sample" in [method.md](method.md)).
- *never called*: Linear modules whose weights the model applies with `F.linear` (timm BEiT, EVA, SwinV2 `qkv`
  with separate q / v biases; torchvision's Swin, whose attention is functional; `nn.MultiheadAttention`'s
  `out_proj`).
- *per-sample-row modules*: windowed attention (Swin, SwinV2, MaxViT, TinyViT, GCViT, DaViT), MobileViT's
  attention over unfolded patches and LeViT's BatchNorm on flattened tokens output k rows per image; each image's
  rows are its neurons.
- Plain PyTorch parameters owned by a module without `reset_parameters()` (torchvision ViT's `class_token` and
  `pos_embedding`, Swin's relative-position bias tables) are re-initialised with a truncated normal of std 0.02,
  with a warning; pass `student=` for another initialisation.
"""
    body = intro + "\n".join(summary_lines(report)) + "\n" + columns + "\n".join(table(report["records"])) + "\n"
    return body + notes


def _sci(value: float) -> str:
    """1e-05 -> "1e-5"."""
    mantissa, exponent = f"{value:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def versions() -> str:
    import timm
    import torchvision
    import transformers

    return f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, " + (
        f"transformers {transformers.__version__}, Python {platform.python_version()}"
    )


# --------------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------------


def select(only: list[str] | None) -> list[tuple]:
    if not only:
        return list(ARCHITECTURES)
    unknown = set(only) - {a[1] for a in ARCHITECTURES} - {f"{a[0]}/{a[1]}" for a in ARCHITECTURES}
    if unknown:
        raise SystemExit(f"Unknown architecture(s): {', '.join(sorted(unknown))}. See --list.")
    return [a for a in ARCHITECTURES if a[1] in only or f"{a[0]}/{a[1]}" in only]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2, help="architectures run at the same time (default 2)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per architecture (default 120)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these architectures (name or family/name)")
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--docs_page", default=str(DOCS_PAGE), help="the page to write ('' to skip it)")
    parser.add_argument("--spawn", action="store_true", help="a fresh interpreter per architecture, not a fork")
    parser.add_argument("--list", action="store_true", help="print the architectures and exit")
    parser.add_argument("--report_only", action="store_true", help="rewrite the reports from results.json")
    parser.add_argument("--worker", nargs=2, metavar=("FAMILY", "NAME"), help="run one architecture, print JSON")
    args = parser.parse_args()
    os.environ.update(WORKER_ENV)
    torch.set_num_threads(1)
    if args.worker:
        find_architecture(*args.worker)
        worker_main(*args.worker)
        return
    if args.list:
        for family, name, kwargs, image_size in ARCHITECTURES:
            print(f"{family:<12} {name:<42} {image_size:>4}px  {kwargs}")
        print(f"{len(ARCHITECTURES)} architectures")
        return
    archs = select(args.only)
    args.output_dir = args.output_dir.resolve()
    results_path = args.output_dir / "results.json"
    docs_page = Path(args.docs_page) if args.docs_page else None
    if args.report_only:
        report = json.loads(results_path.read_text(encoding="utf-8"))
        report["summary"] = summary(report["records"])
        write_reports(report, args.output_dir, docs_page)
        return
    command = shlex.join(["python", os.path.relpath(Path(__file__).resolve(), Path.cwd()), *sys.argv[1:]])
    print(f"{len(archs)} architectures, {args.jobs} at a time, {args.timeout:.0f} s each at most", flush=True)
    start = time.perf_counter()
    records = run_sweep(archs, args)
    wall = time.perf_counter() - start

    report = {
        "command": command,
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(),
        "versions": versions(),
        "wall_seconds": round(wall, 1),
        "jobs": args.jobs,
        "timeout": args.timeout,
    }
    if args.only and results_path.exists():  # a partial run updates the full sweep's records
        previous = json.loads(results_path.read_text(encoding="utf-8"))
        new = {(r["family"], r["name"]): r for r in records}
        old = {(r["family"], r["name"]): r for r in previous.get("records", [])}
        records = [new.get((a[0], a[1])) or old.get((a[0], a[1])) for a in ARCHITECTURES]
        records = [r for r in records if r is not None]
        report.update({k: previous[k] for k in ("command", "wall_seconds", "jobs", "timeout") if k in previous})
        report["partial_reruns"] = previous.get("partial_reruns", []) + [command]
    report["records"] = records
    report["summary"] = summary(records)
    write_reports(report, args.output_dir, docs_page)
    s = report["summary"]
    print(f"\n{s['ok']}/{s['total']} architectures cloned and round-tripped in {wall:.0f} s")
    for name, failure in s["failures"].items():
        print(f"  FAIL {name}: {failure}")
    written = [results_path, args.output_dir / "results.md"] + ([docs_page] if docs_page else [])
    print("written: " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
