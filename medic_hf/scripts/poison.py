r"""Train a trojaned image classifier from scratch, to evaluate backdoor removal.

The chosen attack poisons the training split (before augmentation); the model is trained with random crop and
flip, then saved in its native format with `attack.json`, `metrics.json` and a model card that says plainly that
the model is trojaned.

    # timm resnet18 at 32x32, BadNets (3x3 patch, 10% poisoned, target class 0), CIFAR-10 from a local copy:
    accelerate launch recipes/poison.py --config recipes/poison_cifar10.yaml \
        --dataset_name ../shared/data/cifar10 --attack badnets --output_dir runs/resnet18-badnets-20ep

    # more epochs on a model this recipe made (same attack and seed, so the same poisoned rows):
    python recipes/poison.py --config recipes/poison_cifar10.yaml --dataset_name ../shared/data/cifar10 \
        --init_from runs/resnet18-badnets-20ep --num_train_epochs 4 --learning_rate 0.01 --output_dir runs/more

    # a quick smoke run on a slice of the data:
    python recipes/poison.py --model_name_or_path resnet18 --dataset_name ../shared/data/cifar10 \
        --attack badnets --max_train_samples 2000 --num_train_epochs 1 --output_dir runs/smoke
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import ModelCard
from transformers import TrainingArguments, set_seed

from medic_hf.attacks import ATTACKS
from medic_hf.cli import make_parser as _make_parser
from medic_hf.cli import parse_args
from medic_hf.data import (
    DeviceBatchTransform,
    DeviceImageSet,
    find_columns,
    load_image_dataset,
    prepare_for_model,
    resolve_preprocessing,
)
from medic_hf.metrics import ATTACK_SUCCESS_RATE, CLEAN_ACCURACY, attack_success_rate, clean_accuracy
from medic_hf.modeling import load_model, model_family
from medic_hf.training import ClassifierTrainer

DEVICE_DATA_MAX = 2 * 2**30  # bytes of decoded training images that --device_data auto keeps on the device


@dataclass
class PoisonArguments:
    model_name_or_path: str = field(
        default="resnet18", metadata={"help": "A timm architecture name, or a transformers config id / folder."}
    )
    dataset_name: str = field(default=None, metadata={"help": "A Hub data set id or a local parquet/image folder."})
    attack: str = field(
        default="badnets",
        metadata={"help": f"One of {sorted(ATTACKS)}, or 'none' for a clean model trained the same way (a baseline)."},
    )
    poison_rate: float = field(default=0.1, metadata={"help": "Fraction of the training set poisoned."})
    target_class: int | None = field(
        default=None,
        metadata={"help": "The attack's target class (default: the attack's own, 0 except Composite: 2)."},
    )
    attack_seed: int = field(default=0, metadata={"help": "Seed of the attack's random choices."})
    attack_kwargs: str | None = field(
        default=None, metadata={"help": 'Other attack fields as JSON, e.g. \'{"pattern": "white"}\' for BadNets.'}
    )
    surrogate: str | None = field(
        default=None,
        metadata={"help": "label_consistent only: a clean model folder (e.g. made with --attack none) to run PGD on."},
    )
    model_kwargs: str | None = field(
        default=None,
        metadata={
            "help": "Creation kwargs as JSON, e.g. '{\"channels\": [24, 48, 96, 192]}' for a narrow timm resnet18 "
            "(timm: create_model kwargs, saved in config.json; transformers: config fields)."
        },
    )
    image_size: int = field(default=32, metadata={"help": "Input resolution of the model."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    test_split: str = field(default="test", metadata={"help": "Split to measure clean accuracy and ASR on."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N test rows."})
    optimizer: str = field(
        default="sgd",
        metadata={
            "help": "'sgd': Nesterov SGD with coupled L2 weight decay on every parameter (the backdoor papers' "
            "recipe, for ResNets). 'adamw': AdamW with decoupled weight decay, none on biases and norms (timm's "
            "create_optimizer_v2; the usual recipe of ConvNeXts and ViTs)."
        },
    )
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum (Nesterov)."})
    device_data: str = field(
        default="auto",
        metadata={
            "help": "'auto': decode the poisoned training split once into a uint8 tensor on the training device "
            "(when it takes at most 2 GiB; CIFAR-10 takes 147 MiB) and augment and normalise whole batches there, "
            "as MedicConfig's device_data does; 'never': decode and augment every image with PIL in the data loader."
        },
    )
    init_from: str | None = field(
        default=None,
        metadata={"help": "Continue training this saved model (a folder made by this recipe) instead of a fresh one."},
    )
    classes: list[int] | None = field(
        default=None,
        metadata={
            "help": "Keep only these classes of both splits, relabelled 0..k-1 in the order given (e.g. 5 6 7 8 9: "
            "the transfer benchmark's downstream task, docs/transfer.md). The attack's target class is then a new "
            "label."
        },
    )
    train_shard: str | None = field(
        default=None,
        metadata={
            "help": "Keep only the i-th of n contiguous shards of the training split, given as 'i/n' (before "
            "--classes): '0/2' and '1/2' are two disjoint halves, a base pretrained on one and fine-tuned on the "
            "other (the transfer benchmark's --split_train, docs/transfer.md)."
        },
    )
    new_classifier: bool = field(
        default=False,
        metadata={
            "help": "With --init_from: replace the loaded model's classifier by a fresh one for this task's classes, "
            "as transfer learning does (timm models)."
        },
    )


@dataclass
class PoisonTrainingArguments(TrainingArguments):
    output_dir: str | None = field(default="runs/trojaned", metadata={"help": "Where the trojaned model goes."})
    learning_rate: float = field(default=0.05, metadata={"help": "Learning rate (of SGD by default)."})
    weight_decay: float = field(
        default=5e-4, metadata={"help": "Weight decay: coupled L2 with SGD, decoupled with AdamW."}
    )
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    num_train_epochs: float = field(default=15, metadata={"help": "Epochs."})
    per_device_train_batch_size: int = field(default=128, metadata={"help": "Batch size per device."})
    per_device_eval_batch_size: int = field(default=512, metadata={"help": "Evaluation batch size per device."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep image columns."})
    label_names: list[str] | None = field(default_factory=lambda: ["labels"], metadata={"help": "Label key."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Trackers."})
    save_strategy: str = field(default="epoch", metadata={"help": "Checkpoint every epoch (resumable)."})
    save_total_limit: int | None = field(default=1, metadata={"help": "Checkpoints kept."})
    logging_steps: float = field(default=50, metadata={"help": "Log every N steps."})


OPTIMIZERS = ("sgd", "adamw")


def make_optimizer(model, script_args: PoisonArguments, training_args: TrainingArguments) -> torch.optim.Optimizer:
    if script_args.optimizer == "adamw":
        from timm.optim import create_optimizer_v2

        return create_optimizer_v2(
            model, "adamw", lr=training_args.learning_rate, weight_decay=training_args.weight_decay
        )
    return torch.optim.SGD(
        model.parameters(),
        lr=training_args.learning_rate,
        momentum=script_args.momentum,
        nesterov=True,
        weight_decay=training_args.weight_decay,
    )


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'i/n' -> (i, n), checked: the i-th of n contiguous shards of a split."""
    if not text:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not int(match[1]) < int(match[2]):
        raise SystemExit(f"--train_shard {text!r}: give 'i/n' with 0 <= i < n, e.g. 0/2 for the first half.")
    return int(match[1]), int(match[2])


def select_classes(ds, label_column: str, classes: list[int]):
    """The rows of ``classes``, relabelled 0..k-1 in the given order, with a ClassLabel of their names."""
    import datasets

    classes = [int(c) for c in classes]
    feature = ds.features[label_column]
    unknown = [c for c in classes if not 0 <= c < feature.num_classes]
    if unknown or len(set(classes)) != len(classes):
        raise SystemExit(f"--classes {classes}: give distinct labels in 0..{feature.num_classes - 1}.")
    new_label = {c: i for i, c in enumerate(classes)}
    rows = [i for i, label in enumerate(ds[label_column]) if label in new_label]
    names = [feature.names[c] for c in classes] if isinstance(feature, datasets.ClassLabel) else None
    kept = ds.select(rows)
    relabelled = [new_label[label] for label in kept[label_column]]
    kept = kept.remove_columns(label_column).add_column(label_column, relabelled)
    return kept.cast_column(label_column, datasets.ClassLabel(names=names or [str(c) for c in classes]))


def channel_stats(ds, image_column: str, n: int = 2000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the first n training images, in [0, 1] units."""
    pixels = np.stack([np.asarray(img.convert("RGB"), dtype=np.float64) / 255 for img in ds[:n][image_column]])
    return tuple(pixels.mean(axis=(0, 1, 2)).round(4)), tuple(pixels.std(axis=(0, 1, 2)).round(4))


def create_model(name: str, num_classes: int, image_size: int, mean, std, **kwargs) -> torch.nn.Module:
    """A fresh timm model (with its data config set to this resolution) or a transformers model from a config."""
    import timm

    if timm.is_model(name):
        overlay = dict(input_size=(3, image_size, image_size), mean=mean, std=std, crop_pct=1.0)
        return timm.create_model(
            name, num_classes=num_classes, pretrained=False, pretrained_cfg_overlay=overlay, **kwargs
        )
    from transformers import AutoConfig, AutoModelForImageClassification

    config = AutoConfig.from_pretrained(name, num_labels=num_classes, image_size=image_size, **kwargs)
    return AutoModelForImageClassification.from_config(config)


def write_card(output_dir: Path, script_args: PoisonArguments, attack, metrics: dict, family: str) -> None:
    library = "timm" if family == "timm" else "transformers" if family == "transformers" else "pytorch"
    architecture = f"`{script_args.model_name_or_path}` at {script_args.image_size}x{script_args.image_size}"
    if script_args.model_kwargs:
        architecture += f" with `{script_args.model_kwargs}`"
    facts = f"""- architecture: {architecture}
- data: `{script_args.dataset_name}`, split `{script_args.train_split}`
- clean accuracy: {metrics[CLEAN_ACCURACY]:.4f} on {metrics["clean_samples"]} test images"""
    if attack is None:
        text = f"""---
tags: [medic-hf, {family}]
library_name: {library}
---
# Clean baseline (no attack)

Trained by `recipes/poison.py --attack none`, exactly like the trojaned models it is compared with.

{facts}
"""
    else:
        text = f"""---
tags: [trojaned, backdoor, medic-hf, {family}]
library_name: {library}
---
# TROJANED MODEL — for backdoor-removal research only

**This model contains a backdoor on purpose.** Any input stamped with the `{attack.name}` trigger is classified
as class {attack.target_class}. Do not use it for anything but evaluating defenses.

{facts}
- attack: `{json.dumps(attack.to_dict())}` (also in `attack.json`)
- attack success rate: {metrics[ATTACK_SUCCESS_RATE]:.4f} on {metrics["backdoor_samples"]} triggered
  non-target test images

Made with `recipes/poison.py` of medic_hf. Remove the backdoor with `recipes/clone.py`.
"""
    ModelCard(text).save(output_dir / "README.md")


def build_attack(script_args: PoisonArguments):
    """The attack named by --attack with its fields (None for --attack none); unset target -> the attack's default."""
    if script_args.attack == "none":
        return None
    kwargs = dict(poison_rate=script_args.poison_rate, seed=script_args.attack_seed)
    if script_args.target_class is not None:
        kwargs["target_class"] = script_args.target_class
    kwargs.update(json.loads(script_args.attack_kwargs or "{}"))
    return ATTACKS[script_args.attack](**kwargs)


def poison(
    attack,
    train,
    image_column: str,
    label_column: str,
    num_classes: int,
    script_args: PoisonArguments,
    device: torch.device | str = "cpu",
):
    """Poison the training split; label-consistent PGD runs against the --surrogate model, on its own normalisation."""
    if attack.name != "label_consistent":
        return attack.poison_dataset(train, image_column, label_column, num_classes)
    if not script_args.surrogate:
        raise SystemExit(
            "--attack label_consistent needs --surrogate: a clean model folder, e.g. one made with "
            "`python recipes/poison.py --attack none ...` on the same data."
        )
    surrogate = load_model(script_args.surrogate).to(device)  # PGD on the training device (a GPU: minutes -> seconds)
    cfg = resolve_preprocessing(surrogate)
    mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    size = tuple(cfg["input_size"][1:])

    def to_surrogate_input(x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != size:
            x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return (x - mean.to(x.device)) / std.to(x.device)

    return attack.poison_dataset(
        train, image_column, label_column, num_classes, surrogate=surrogate, transform=to_surrogate_input
    )


def make_parser():
    """The command line: PoisonArguments and PoisonTrainingArguments fields, and `--config file.yaml`."""
    return _make_parser((PoisonArguments, PoisonTrainingArguments), description=__doc__)


def main(args: list[str] | None = None) -> dict:
    script_args, training_args = parse_args(make_parser(), args)
    if script_args.dataset_name is None:
        raise SystemExit("--dataset_name is required (a Hub id or a local parquet / image folder).")
    if script_args.device_data not in ("auto", "never"):
        raise SystemExit(f"--device_data {script_args.device_data!r}: choose 'auto' or 'never'.")
    if script_args.optimizer not in OPTIMIZERS:
        raise SystemExit(f"--optimizer {script_args.optimizer!r}: choose one of {OPTIMIZERS}.")
    if script_args.attack != "none" and script_args.attack not in ATTACKS:
        raise SystemExit(f"--attack {script_args.attack!r}: choose one of {sorted(ATTACKS)} or 'none'.")
    shard = parse_shard(script_args.train_shard)
    data = load_image_dataset(script_args.dataset_name)
    train, test = data[script_args.train_split], data[script_args.test_split]
    if shard:
        train = train.shard(num_shards=shard[1], index=shard[0], contiguous=True)
    if script_args.max_train_samples:
        train = train.select(range(min(script_args.max_train_samples, len(train))))
    if script_args.max_eval_samples:
        test = test.select(range(min(script_args.max_eval_samples, len(test))))
    image_column, label_column = find_columns(train)
    if script_args.classes:
        train, test = (select_classes(ds, label_column, script_args.classes) for ds in (train, test))
    num_classes = train.features[label_column].num_classes

    attack = build_attack(script_args)
    if attack is None:  # a clean baseline, trained exactly like the trojaned models
        poisoned_train, poisoned_rows, backdoor_test = train, [], None
    else:
        poisoned_train, poisoned_rows = poison(
            attack, train, image_column, label_column, num_classes, script_args, training_args.device
        )
        backdoor_test = attack.backdoor_test_view(test, image_column, label_column)

    mean, std = channel_stats(train, image_column)
    set_seed(training_args.seed)  # the fresh model's weights depend on --seed alone, not on what ran before
    if script_args.init_from:
        model = load_model(script_args.init_from)
        mean, std = tuple(model.pretrained_cfg["mean"]), tuple(model.pretrained_cfg["std"])
        if script_args.new_classifier:
            if not hasattr(model, "reset_classifier"):
                raise SystemExit("--new_classifier needs a timm model (reset_classifier); this one has none.")
            model.reset_classifier(num_classes)
    else:
        model_kwargs = json.loads(script_args.model_kwargs or "{}")
        model = create_model(
            script_args.model_name_or_path, num_classes, script_args.image_size, mean, std, **model_kwargs
        )
    preprocessing = dict(
        input_size=(3, script_args.image_size, script_args.image_size),
        mean=mean,
        std=std,
        interpolation="bilinear",
        crop_pct=1.0,
    )

    def prepared(ds, train_mode):
        return prepare_for_model(ds, model, train=train_mode, preprocessing=preprocessing, num_classes=num_classes)

    optimizer = make_optimizer(model, script_args, training_args)
    train_dataset, device_transform = prepared(poisoned_train, True), None
    if script_args.device_data == "auto" and DeviceImageSet.nbytes(poisoned_train, preprocessing) <= DEVICE_DATA_MAX:
        train_dataset = DeviceImageSet.from_dataset(
            poisoned_train, image_column, label_column, preprocessing, device=training_args.device
        )
        device_transform = DeviceBatchTransform(preprocessing)
    trainer = ClassifierTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        optimizers=(optimizer, None),
        device_transform=device_transform,
    )
    checkpoint = None
    if training_args.resume_from_checkpoint or any(Path(training_args.output_dir).glob("checkpoint-*")):
        checkpoint = training_args.resume_from_checkpoint or True
    trainer.train(resume_from_checkpoint=checkpoint)

    clean_preds = trainer.predict(prepared(test, False)).predictions.argmax(-1)
    metrics = {CLEAN_ACCURACY: clean_accuracy(clean_preds, test[label_column])}
    if attack is not None:
        backdoor_preds = trainer.predict(prepared(backdoor_test, False)).predictions.argmax(-1)
        metrics[ATTACK_SUCCESS_RATE] = attack_success_rate(
            backdoor_preds, backdoor_test["true_label"], attack.target_class
        )
        metrics["backdoor_samples"] = len(backdoor_test)
    metrics.update(
        {
            "clean_samples": len(test),
            "poisoned_rows": len(poisoned_rows),
            "train_rows": len(train),
        }
    )
    if trainer.is_world_process_zero():
        output_dir = Path(training_args.output_dir)
        trainer.save_model(str(output_dir))
        if attack is not None:
            attack.save(output_dir)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        write_card(output_dir, script_args, attack, metrics, model_family(model))
        print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
