"""The MEDIC authors' released trojaned CIFAR-10 models, loaded safely and measured on the shared CIFAR-10 copy.

The authors' repository (qiulingxu/MEDIC, `backdoor_models/`) holds WRN-16-1 checkpoints (`*.pth.tar`: a dict with
`state_dict`, `epoch`, `best_clean_acc`, `best_bad_acc`, `optimizer`). They are read with
`torch.load(..., weights_only=True)`, which refuses anything but tensors and plain containers. Nothing is unpickled,
and the files are never copied into this repository: bring a snapshot with the search tool's `fetch`
(`github:qiulingxu/MEDIC`) and pass its git directory.

Their pipeline, read from their code (`data_loader.py`, `config.py`): CIFAR-10 images are fed as `ToTensor()`
values in [0, 1], without normalisation. BadNets ("gridTrigger", their default) sets a 3x3 pattern in the
bottom-right corner, all channels alike, rows from the top: (255, 0, 0), (0, 255, 0), (255, 0, 255). Its target is
class 5, their default. The other attacks (SIG, warp, clean-label, reflection, composite) need their trigger files
or settings reproduced exactly, which this script does not do yet.

    python benchmarks/authors_models.py --mirror /work/.mirror/qiulingxu+MEDIC/repo
    python benchmarks/authors_models.py --mirror ... --medic     # also MEDIC at its defaults on BadNet (2 seeds)

The models were trained on lossless CIFAR-10; the shared copy is JPEG (quality 75), so clean accuracy is lower than
the authors' `best_clean_acc`. Writes benchmarks/results/authors_models/results.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import time
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "benchmarks" / "results" / "authors_models"
MODELS = {"badnet": "backdoor_models/badnet/WRN-16-1-S-model_best.pth.tar"}
BADNET_TARGET = 5
# The authors' gridTrigger, rows from the top of the 3x3 bottom-right corner.
BADNET_PATTERN = np.array([[255, 0, 0], [0, 255, 0], [255, 0, 255]], dtype=np.uint8)
# ToTensor() only: the model's input is the image in [0, 1].
PREPROCESSING = dict(image_size=[32], image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])


class WRNBlock(nn.Module):
    """Pre-activation wide-ResNet block, with the authors' parameter names (bn1, conv1, bn2, conv2, convShortcut)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x):
        activated = self.relu1(self.bn1(x))
        # Without an identity shortcut, the projection reads the activated input (the original WRN code).
        shortcut = x if self.equal_in_out else self.convShortcut(activated)
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        return shortcut + out


class WRNGroup(nn.Module):
    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WRNBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                for i in range(blocks)
            ]
        )

    def forward(self, x):
        return self.layer(x)


class AuthorsWRN(nn.Module):
    """WRN-(6n+4)-k for 32x32 CIFAR images, whose state-dict keys are the authors' (WRN-16-1 by default)."""

    def __init__(self, depth: int = 16, widen_factor: int = 1, num_classes: int = 10):
        super().__init__()
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.block1 = WRNGroup(blocks, widths[0], widths[1], 1)
        self.block2 = WRNGroup(blocks, widths[1], widths[2], 2)
        self.block3 = WRNGroup(blocks, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x):
        out = self.relu(self.bn1(self.block3(self.block2(self.block1(self.conv1(x))))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def load_authors_model(mirror: Path, path: str) -> tuple[AuthorsWRN, dict]:
    """The checkpoint at `path` in the snapshot's HEAD, read with weights_only=True; (model in eval mode, its info)."""
    blob = subprocess.run(["git", "-C", str(mirror), "show", f"HEAD:{path}"], check=True, capture_output=True).stdout
    checkpoint = torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
    model = AuthorsWRN()
    model.load_state_dict(checkpoint["state_dict"])
    info = {k: checkpoint[k] for k in ("epoch", "best_clean_acc", "best_bad_acc") if k in checkpoint}
    return model.eval(), info


def stamp_badnet(image: Image.Image) -> Image.Image:
    pixels = np.array(image.convert("RGB"))
    pixels[-3:, -3:, :] = BADNET_PATTERN[:, :, None]
    return Image.fromarray(pixels)


def backdoor_view(test: datasets.Dataset) -> datasets.Dataset:
    """Test images of the other classes with the trigger, labelled with the target (their accuracy is the ASR)."""
    others = test.filter(lambda label: label != BADNET_TARGET, input_columns="label")
    stamped = others.map(lambda row: {"img": stamp_badnet(row["img"]), "label": BADNET_TARGET})
    return stamped.cast_column("img", datasets.Image())


@torch.no_grad()
def accuracy(model: nn.Module, ds: datasets.Dataset, batch_size: int = 500) -> float:
    correct = 0
    for start in range(0, len(ds), batch_size):
        rows = ds[start : start + batch_size]
        x = torch.stack([torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1) for img in rows["img"]])
        predictions = model(x.float() / 255.0).argmax(-1)
        correct += int((predictions == torch.tensor(rows["label"])).sum())
    return correct / len(ds)


def run_medic(model: nn.Module, data: datasets.DatasetDict, backdoor: datasets.Dataset, seed: int) -> dict:
    from medic_hf import MedicCloner, MedicConfig
    from medic_hf.data import class_balanced_subset

    clean = class_balanced_subset(data["train"], fraction=0.05, seed=seed)
    config = MedicConfig(
        output_dir=str(ROOT / "runs" / "authors_models" / f"medic-badnet-seed{seed}"),
        seed=seed,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=100,
        max_accuracy_drop=None,
        **PREPROCESSING,
    )
    start = time.perf_counter()
    cloner = MedicCloner(
        model, config, train_dataset=clean, eval_dataset={"clean": data["test"], "backdoor": backdoor}
    )
    cloner.train()
    return {
        "seed": seed,
        "before": cloner.metrics_before,
        "after": cloner.metrics_after,
        "seconds": round(time.perf_counter() - start, 1),
    }


def markdown(report: dict) -> str:
    lines = [
        "| model | authors' clean acc. (lossless) | clean acc. (shared JPEG copy) | ASR | epoch |",
        "|---|---|---|---|---|",
    ]
    for name, row in report["models"].items():
        lines.append(
            f"| {name} | {row['best_clean_acc']:.2f}% | {100 * row['clean_accuracy']:.2f}% | "
            f"{100 * row['attack_success_rate']:.2f}% | {row['epoch']} |"
        )
    for run in report.get("medic", []):
        b, a = run["before"], run["after"]
        lines.append(
            f"\nMEDIC defaults, seed {run['seed']}: clean accuracy {100 * b['clean_accuracy']:.2f}% → "
            f"{100 * a['clean_accuracy']:.2f}%, ASR {100 * b['attack_success_rate']:.2f}% → "
            f"{100 * a['attack_success_rate']:.2f}% ({run['seconds']} s)"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--mirror", required=True, help="Git directory of a qiulingxu/MEDIC snapshot.")
    parser.add_argument("--dataset_name", default=str(ROOT.parent / "shared" / "data" / "cifar10"))
    parser.add_argument("--medic", action="store_true", help="Also run MEDIC at its defaults on the BadNet model.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    args = parser.parse_args(argv)

    from medic_hf.data import load_image_dataset

    data = load_image_dataset(args.dataset_name)
    backdoor = backdoor_view(data["test"])
    report = {"dataset": Path(args.dataset_name).name, "models": {}, "medic": []}
    for name, path in MODELS.items():
        model, info = load_authors_model(Path(args.mirror), path)
        report["models"][name] = {
            **info,
            "clean_accuracy": accuracy(model, data["test"]),
            "attack_success_rate": accuracy(model, backdoor),
        }
        print(name, report["models"][name], flush=True)
    if args.medic:
        for seed in args.seeds:
            model, _ = load_authors_model(Path(args.mirror), MODELS["badnet"])
            report["medic"].append(run_medic(model, data, backdoor, seed))
            print(report["medic"][-1], flush=True)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    (OUTPUT / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (OUTPUT / "results.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
