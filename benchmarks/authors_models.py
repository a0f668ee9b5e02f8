"""The MEDIC authors' released trojaned CIFAR-10 models, loaded safely, measured on the shared CIFAR-10 copy, cleaned.

The authors' repository (qiulingxu/MEDIC, `backdoor_models/`) holds WRN-16-1 checkpoints (`*.pth.tar`: a dict with
`state_dict`, `epoch`, `best_clean_acc`, `best_bad_acc`, `optimizer`). They are read with
`torch.load(..., weights_only=True)`, which refuses anything but tensors and plain containers. Nothing is unpickled,
and the files are never copied into this repository: bring a snapshot with the search tool's `fetch`
(`github:qiulingxu/MEDIC`) and pass its git directory.

Their pipeline, read from their code (`data_loader.py`, `config.py`, `train_adaptive.py`, README): CIFAR-10 images
are fed as `ToTensor()` values in [0, 1], without normalisation. The attacks whose test trigger their code fixes
exactly, and which this script reproduces:

- `badnet`: "gridTrigger", their default: a 3x3 pattern in the bottom-right corner, all channels alike, rows from
  the top (255, 0, 0), (0, 255, 0), (255, 0, 255); target class 5;
- `cleanlabel`: the same trigger and target at test time (the adversarial perturbation is a training-time device);
- `sig`: "signalTrigger": `uint8((1 - 0.2) · image + 0.2 · mask)` with their `trigger/signal_cifar10_mask.npy`
  (not in their repository: it comes from bboylyg/NAD, whose data loader theirs copies; pass `--nad_mirror`);
  target class 5;
- `adaptive2` (their "adaptive attack 2"): the learned 3x3 patch in the top-left corner, `sigmoid(trigger)` of the
  `pattern` stored in the checkpoint, target class 0 (stamped into the 8-bit image: within 1/510 of their float
  values).

Not reproduced: warp (their warping grid is neither in the checkpoint nor in their code), reflection (random
reflection images), composite (a ResNet of another code base).

    python benchmarks/authors_models.py --mirror /work/.mirror/qiulingxu+MEDIC/repo \
        --nad_mirror /work/.mirror/bboylyg+NAD/repo                      # the models' accuracy and ASR
    python benchmarks/authors_models.py --mirror ... --nad_mirror ... --attacks badnet sig \
        --settings defaults cosine_lambda --seeds 0 1                      # MEDIC settings of the default study
    python benchmarks/authors_models.py --mirror ... --nad_mirror ... --baselines ft nad kd --seeds 0 1
                                                                           # baselines, cells where der.md reads them

The models were trained on lossless CIFAR-10; the shared copy is JPEG (quality 75), so clean accuracy is lower than
the authors' `best_clean_acc`. Writes benchmarks/results/authors_models/results.{json,md}; each MEDIC run's
results.json goes where benchmarks/default_study.py reports it from
(`benchmarks/results/default_study/runs/authors-<attack>/<setting>/seed<k>/`). A run that finished is skipped and
an interrupted one resumes from its last epoch checkpoint (`runs/authors_models/`).
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
import yaml
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "benchmarks" / "results" / "authors_models"
STUDY = ROOT / "benchmarks" / "results" / "default_study" / "runs"
BASELINES = ROOT / "benchmarks" / "results" / "default_study" / "baselines"
MODELS = {
    "badnet": "backdoor_models/badnet/WRN-16-1-S-model_best.pth.tar",
    "cleanlabel": "backdoor_models/cleanlabel/WRN-16-1-S-model_best.pth.tar",
    "sig": "backdoor_models/SIG/WRN-16-1-S-model_best.pth.tar",
    "adaptive2": "backdoor_models/adaptive_attack_2/WRN-16-1-S-model_best.pth.tar",
}
TARGETS = {"badnet": 5, "cleanlabel": 5, "sig": 5, "adaptive2": 0}
SIG_MASK = "trigger/signal_cifar10_mask.npy"  # in bboylyg/NAD
# The authors' gridTrigger, rows from the top of the 3x3 bottom-right corner.
BADNET_PATTERN = np.array([[255, 0, 0], [0, 255, 0], [255, 0, 255]], dtype=np.uint8)
# ToTensor() only: the model's input is the image in [0, 1].
PREPROCESSING = dict(image_size=[32], image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
# Adaptive attack 2's model ("WRN-16-1N") was trained with a `norm=True` option that the released code lacks; the
# usual CIFAR-10 normalisation is the one that gives it its accuracy and ASR (77.2% / 99.7% on 2,000 test images,
# against 54-76% and 12-99% for [0.5] and ImageNet's): an inference, said so in docs/robust_default.md.
NORMALISED = dict(image_size=[32], image_mean=[0.4914, 0.4822, 0.4465], image_std=[0.2023, 0.1994, 0.2010])


def preprocessing(attack: str) -> dict:
    return NORMALISED if attack == "adaptive2" else PREPROCESSING


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


def git_file(mirror: Path, path: str) -> bytes:
    """`path` in the snapshot: its HEAD when `mirror` is a git directory, else the file under the plain folder
    `mirror` (a copy of the files this script reads, e.g. for a machine without the snapshot)."""
    if (mirror / path).is_file():
        return (mirror / path).read_bytes()
    return subprocess.run(["git", "-C", str(mirror), "show", f"HEAD:{path}"], check=True, capture_output=True).stdout


def load_authors_model(mirror: Path, path: str) -> tuple[AuthorsWRN, dict]:
    """The checkpoint at `path` in the snapshot's HEAD, read with weights_only=True; (model in eval mode, its info)."""
    checkpoint = torch.load(io.BytesIO(git_file(mirror, path)), weights_only=True, map_location="cpu")
    model = AuthorsWRN()
    model.load_state_dict(checkpoint["state_dict"])
    info = {k: checkpoint[k] for k in ("epoch", "best_clean_acc", "best_bad_acc") if k in checkpoint}
    if "pattern" in checkpoint:  # adaptive attack 2: the learned trigger and its mask
        info["pattern"] = {k: v for k, v in checkpoint["pattern"].items()}
    return model.eval(), info


def stamp_badnet(image: Image.Image) -> Image.Image:
    pixels = np.array(image.convert("RGB"))
    pixels[-3:, -3:, :] = BADNET_PATTERN[:, :, None]
    return Image.fromarray(pixels)


def sig_stamper(mask: np.ndarray):
    """Their signalTrigger: the blend in float64, truncated to uint8 as their `astype('uint8')` does."""

    def stamp(image: Image.Image) -> Image.Image:
        pixels = np.array(image.convert("RGB"))
        blended = (1 - 0.2) * pixels + 0.2 * mask.reshape(32, 32, 1)
        return Image.fromarray(np.clip(blended.astype("uint8"), 0, 255))

    return stamp


def pattern_stamper(pattern: dict):
    """Adaptive attack 2: image · (1 − mask) + sigmoid(trigger) · mask, in 8 bits."""
    trigger = torch.sigmoid(pattern["trigger"][0]).permute(1, 2, 0).numpy()  # (32, 32, 3) in [0, 1]
    mask = pattern["mask"][0].permute(1, 2, 0).numpy()

    def stamp(image: Image.Image) -> Image.Image:
        pixels = np.array(image.convert("RGB")).astype(np.float64) / 255.0
        stamped = pixels * (1 - mask) + trigger * mask
        return Image.fromarray(np.round(stamped * 255.0).astype(np.uint8))

    return stamp


def backdoor_view(test: datasets.Dataset, stamp=stamp_badnet, target: int = 5) -> datasets.Dataset:
    """Test images of the other classes with the trigger, labelled with the target (their accuracy is the ASR)."""
    others = test.filter(lambda label: label != target, input_columns="label")
    stamped = others.map(lambda row: {"img": stamp(row["img"]), "label": target})
    return stamped.cast_column("img", datasets.Image())


def stamper(attack: str, info: dict, nad_mirror: Path | None):
    if attack in ("badnet", "cleanlabel"):
        return stamp_badnet
    if attack == "adaptive2":
        return pattern_stamper(info["pattern"])
    if nad_mirror is None:
        raise SystemExit("--attacks sig needs --nad_mirror: the signal mask is in bboylyg/NAD (fetch it).")
    return sig_stamper(np.load(io.BytesIO(git_file(nad_mirror, SIG_MASK))))


@torch.no_grad()
def accuracy(model: nn.Module, ds: datasets.Dataset, batch_size: int = 500, preprocess: dict = PREPROCESSING) -> float:
    correct = 0
    for start in range(0, len(ds), batch_size):
        rows = ds[start : start + batch_size]
        x = torch.stack([torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1) for img in rows["img"]])
        mean = torch.tensor(preprocess["image_mean"]).view(1, 3, 1, 1)
        std = torch.tensor(preprocess["image_std"]).view(1, 3, 1, 1)
        predictions = model((x.float() / 255.0 - mean) / std).argmax(-1)
        correct += int((predictions == torch.tensor(rows["label"])).sum())
    return correct / len(ds)


def study_config(attack: str, setting: str, seed: int, output_dir: Path, epochs: int, eval_every: int, steps: int):
    """MedicConfig at the study's base flags plus the setting's flags, as the command line would build it."""
    from medic_hf import MedicConfig
    from medic_hf.cli import ArgumentParser

    settings = yaml.safe_load((Path(__file__).with_name("default_study_settings.yaml")).read_text())
    flags = [
        "--output_dir", str(output_dir), "--seed", str(seed), "--num_train_epochs", str(epochs),
        "--eval_strategy", "steps", "--eval_steps", str(steps * eval_every),
        "--logging_steps", str(steps), "--save_total_limit", "1", "--disable_tqdm", "true",
        *settings["base"],  # the defaults before the study, under every setting
        *settings[setting],
    ]  # fmt: skip
    (config,) = ArgumentParser(MedicConfig).parse_args_into_dataclasses(flags)
    for name, value in preprocessing(attack).items():
        setattr(config, name, value)
    config.max_accuracy_drop = None
    return config


def run_medic(model, data, backdoor, attack: str, setting: str, seed: int, args) -> dict | None:
    """One MEDIC run of the study on an authors' model; its results.json (None when it was done already)."""
    from transformers.trainer_utils import get_last_checkpoint

    from medic_hf import MedicCloner
    from medic_hf.data import class_balanced_subset

    budget = "" if args.epochs == 30 else f"-e{args.epochs}"
    result_file = STUDY / f"authors-{attack}" / f"{setting}{budget}" / f"seed{seed}" / "results.json"
    if result_file.is_file():
        return None
    clean = class_balanced_subset(data["train"], fraction=0.05, seed=seed)
    output_dir = ROOT / "runs" / "authors_models" / attack / f"{setting}{budget}" / f"seed{seed}"
    config = study_config(attack, setting, seed, output_dir, args.epochs, args.eval_every, -(-len(clean) // 64))
    start = time.perf_counter()
    cloner = MedicCloner(
        model, config, train_dataset=clean, eval_dataset={"clean": data["test"], "backdoor": backdoor}
    )
    checkpoint = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    cloner.train(resume_from_checkpoint=checkpoint)
    cloner.remove_hooks()
    result = {
        "model": f"authors-{attack}",
        "setting": setting,
        "seed": seed,
        "before": cloner.metrics_before,
        "after": cloner.metrics_after,
        "history": [
            {k: v for k, v in log.items() if k in ("epoch", "eval_clean_accuracy", "eval_backdoor_accuracy")}
            for log in cloner.state.log_history
            if "eval_clean_accuracy" in log or "eval_backdoor_accuracy" in log
        ],
        "hyperparameters": {k: str(v) for k, v in cloner.hyperparameters().items()},
        "seconds": round(time.perf_counter() - start, 1),
        "resumed_from": cloner.resumed_from,
    }
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


def cpu_benchmark_budgets() -> dict:
    """The baselines' budgets of the CPU benchmark (recipes/benchmark_cpu.yaml), as on the other models of the grid."""
    return json.loads(yaml.safe_load((ROOT / "recipes" / "benchmark_cpu.yaml").read_text())["defense_kwargs"])


def run_baseline(model, data, backdoor, attack: str, defense: str, seed: int, before: dict) -> dict | None:
    """One baseline defense (`medic_hf.defenses`) on an authors' model, whose clean accuracy and ASR are `before`,
    written as a cell of `medic_hf.scripts.benchmark` where default_study.py's DER table reads it; None when it was
    done already."""
    from medic_hf.data import class_balanced_subset
    from medic_hf.defenses import DEFENSES
    from medic_hf.metrics import defense_effectiveness_rating
    from medic_hf.scripts.benchmark import defense_config

    cell_file = BASELINES / "cells" / f"authors-{attack}" / defense / f"seed{seed}.json"
    if cell_file.is_file():
        return None
    preprocess = preprocessing(attack)
    clean = class_balanced_subset(data["train"], fraction=0.05, seed=seed)
    kwargs = {defense: {**cpu_benchmark_budgets().get(defense, {}), **preprocess}}
    output_dir = ROOT / "runs" / "authors_models" / attack / defense / f"seed{seed}"
    config = defense_config(defense, seed, output_dir, kwargs)
    torch.manual_seed(seed)
    start = time.perf_counter()
    repaired = DEFENSES[defense][0](model, clean, config).eval()
    seconds = time.perf_counter() - start
    after = {
        "clean_accuracy": accuracy(repaired, data["test"], preprocess=preprocess),
        "attack_success_rate": accuracy(repaired, backdoor, preprocess=preprocess),
    }
    der = defense_effectiveness_rating(
        before["attack_success_rate"], after["attack_success_rate"], before["clean_accuracy"], after["clean_accuracy"]
    )
    cell = {
        "attack": f"authors-{attack}",
        "defense": defense,
        "seed": seed,
        "clean_samples": len(clean),
        "before": {k: before[k] for k in ("clean_accuracy", "attack_success_rate")},
        "after": after,
        "der": der,
        "seconds": round(seconds, 1),
        "config": {k: str(v) for k, v in kwargs[defense].items()},
    }
    cell_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cell_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(cell, indent=2) + "\n")
    tmp.replace(cell_file)
    return cell


def markdown(report: dict) -> str:
    lines = [
        "| model | target | authors' clean acc. (lossless) | authors' ASR | clean acc. (JPEG copy) | ASR | epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in report["models"].items():
        lines.append(
            f"| {name} | {row['target']} | {row['best_clean_acc']:.2f}% | {row['best_bad_acc']:.2f}% | "
            f"{100 * row['clean_accuracy']:.2f}% | {100 * row['attack_success_rate']:.2f}% | {row['epoch']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument(
        "--mirror", required=True, help="Git directory of a qiulingxu/MEDIC snapshot, or a folder with its files."
    )
    parser.add_argument(
        "--nad_mirror", default=None, help="Git directory of a bboylyg/NAD snapshot, or a folder (for sig)."
    )
    parser.add_argument("--dataset_name", default=str(ROOT.parent / "shared" / "data" / "cifar10"))
    parser.add_argument("--attacks", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--settings", nargs="*", default=[], help="MEDIC settings of default_study_settings.yaml")
    parser.add_argument(
        "--baselines", nargs="*", default=[], help="baseline defenses of medic_hf.defenses, e.g. ft nad kd"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=30, help="the budget; 60 is the no-rebound check")
    parser.add_argument("--eval_every", type=int, default=5, help="epochs between evaluations")
    args = parser.parse_args(argv)

    from medic_hf.data import load_image_dataset

    data = load_image_dataset(args.dataset_name)
    previous = json.loads((OUTPUT / "results.json").read_text()) if (OUTPUT / "results.json").is_file() else {}
    report = {"dataset": Path(args.dataset_name).name, "models": previous.get("models", {})}
    for attack in args.attacks:
        model, info = load_authors_model(Path(args.mirror), MODELS[attack])
        backdoor = backdoor_view(
            data["test"], stamper(attack, info, args.nad_mirror and Path(args.nad_mirror)), TARGETS[attack]
        )
        if "target" not in report["models"].get(attack, {}):  # measured once, kept after
            report["models"][attack] = {
                **{k: v for k, v in info.items() if k != "pattern"},
                "target": TARGETS[attack],
                "clean_accuracy": accuracy(model, data["test"], preprocess=preprocessing(attack)),
                "attack_success_rate": accuracy(model, backdoor, preprocess=preprocessing(attack)),
            }
            print(attack, report["models"][attack], flush=True)
            OUTPUT.mkdir(parents=True, exist_ok=True)
            (OUTPUT / "results.json").write_text(json.dumps(report, indent=2) + "\n")
            (OUTPUT / "results.md").write_text(markdown(report))
        for setting in args.settings:
            for seed in args.seeds:
                model, _ = load_authors_model(Path(args.mirror), MODELS[attack])
                result = run_medic(model, data, backdoor, attack, setting, seed, args)
                if result:
                    after = result["after"]
                    print(
                        f"{attack}/{setting}/seed{seed}: ACC {100 * after['clean_accuracy']:.2f}%, "
                        f"ASR {100 * after['attack_success_rate']:.2f}% ({result['seconds']} s)",
                        flush=True,
                    )
        for defense in args.baselines:
            for seed in args.seeds:
                model, _ = load_authors_model(Path(args.mirror), MODELS[attack])
                cell = run_baseline(model, data, backdoor, attack, defense, seed, report["models"][attack])
                if cell:
                    after = cell["after"]
                    print(
                        f"{attack}/{defense}/seed{seed}: ACC {100 * after['clean_accuracy']:.2f}%, "
                        f"ASR {100 * after['attack_success_rate']:.2f}%, DER {100 * cell['der']:.2f} "
                        f"({cell['seconds']} s)",
                        flush=True,
                    )
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
