r"""Remove a backdoor from an image classifier with MEDIC (importance-driven cloning).

A class-balanced, seeded draw of `--clean_fraction` of the training split is the clean set. When the model folder
holds an `attack.json` (written by recipes/poison.py), the triggered test view is evaluated too and the attack
success rate (ASR) is reported before and after cloning. Results go to `<output_dir>/results.json`, a Markdown table
`results.md`, and the sanitized model (native format + model card) to `output_dir`.

    # a trojaned model made by recipes/poison.py, 5% of CIFAR-10 from a local copy, the paper's settings
    accelerate launch recipes/clone.py --model_name_or_path runs/resnet18-badnets-20ep \
        --dataset_name ../shared/data/cifar10 --config recipes/clone_cifar10.yaml --output_dir runs/medic-badnets

    # several GPUs, then push the sanitized model and its card to the Hub
    accelerate launch --config_file recipes/accelerate_multi_gpu.yaml recipes/clone.py \
        --model_name_or_path your-org/suspicious-vit --dataset_name uoft-cs/cifar10 \
        --push_to_hub --hub_model_id your-org/suspicious-vit-medic
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from medic_hf import MedicCloner, MedicConfig
from medic_hf.attacks import ATTACK_FILE, load_attack
from medic_hf.cli import make_parser as _make_parser
from medic_hf.cli import parse_args
from medic_hf.data import DeviceImageSet, load_image_dataset, subset_from_args
from medic_hf.hub import public_name
from medic_hf.metrics import ATTACK_SUCCESS_RATE, CLEAN_ACCURACY
from medic_hf.modeling import load_model


@dataclass
class CloneArguments:
    model_name_or_path: str = field(
        default=None,
        metadata={"help": "The trojaned model: a local folder (timm or transformers), a timm name, or a Hub id."},
    )
    student_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "For a transfer-learned teacher: the trusted pretrained weights it was fine-tuned from (a timm "
            "name with a pretrained tag, an hf-hub: id, a transformers Hub id or a local folder). The student starts "
            "from them (a fresh classifier if the classes differ) instead of random values. Default: random."
        },
    )
    dataset_name: str = field(
        default=None, metadata={"help": "A Hub data set id or a local folder of parquet files or images."}
    )
    clean_fraction: float = field(default=0.05, metadata={"help": "Fraction of the train split used as clean data."})
    clean_samples: int | None = field(default=None, metadata={"help": "Number of clean rows (wins over fraction)."})
    data_seed_clean: int = field(default=0, metadata={"help": "Seed of the class-balanced clean draw."})
    train_split: str = field(default="train", metadata={"help": "Split the clean set is drawn from."})
    test_split: str | None = field(default="test", metadata={"help": "Split to evaluate on (None: no evaluation)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N test rows only."})
    attack_file: str | None = field(
        default=None,
        metadata={"help": "attack.json describing the trigger, to measure ASR; default: the model folder's one."},
    )
    unlabeled_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Unlabeled images added to the clone loss (a Hub data set id or a local folder; labels are "
            "ignored), e.g. public images of the base's pretraining domain (docs/transfer.md). Default: none."
        },
    )
    unlabeled_split: str = field(default="train", metadata={"help": "Split of --unlabeled_dataset_name to use."})
    unlabeled_samples: int | None = field(
        default=None, metadata={"help": "Use the first N images of that split (default: all of them)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})
    allow_accuracy_drop: bool = field(
        default=False,
        metadata={
            "help": "Exit 0 even when the sanitized model lost more than --max_accuracy_drop points of clean "
            "accuracy (the model, results and card are written either way, with the warning)."
        },
    )


def backdoor_view(script_args: CloneArguments, test):
    """The triggered, non-target test images when an attack description is available, else None."""
    attack_file = script_args.attack_file
    if attack_file is None and Path(script_args.model_name_or_path, ATTACK_FILE).is_file():
        attack_file = str(Path(script_args.model_name_or_path, ATTACK_FILE))
    if attack_file is None:
        return None, None
    attack = load_attack(Path(attack_file).parent if Path(attack_file).is_file() else attack_file)
    return attack, attack.backdoor_test_view(test)


def unlabeled_images(script_args: CloneArguments):
    """The --unlabeled_dataset_name split (its first --unlabeled_samples images), or None."""
    if not script_args.unlabeled_dataset_name:
        return None
    data = load_image_dataset(script_args.unlabeled_dataset_name)
    if script_args.unlabeled_split not in data:
        raise SystemExit(
            f"--unlabeled_split {script_args.unlabeled_split}: {script_args.unlabeled_dataset_name} has the splits "
            f"{sorted(data)}; name one of them."
        )
    images = data[script_args.unlabeled_split]
    if script_args.unlabeled_samples:
        images = images.select(range(min(script_args.unlabeled_samples, len(images))))
    return images


def percent(metrics: dict, key: str) -> str:
    return f"{100 * metrics[key]:.2f}%" if key in metrics else "-"


def results_table(before: dict, after: dict) -> str:
    """A Markdown table of clean accuracy and ASR before and after cloning."""
    rows = ["| metric | before (trojaned) | after (MEDIC) |", "|---|---|---|"]
    names = {CLEAN_ACCURACY: "clean accuracy", ATTACK_SUCCESS_RATE: "attack success rate"}
    for key, label in names.items():
        if key in before or key in after:
            rows.append(f"| {label} | {percent(before, key)} | {percent(after, key)} |")
    return "\n".join(rows)


def make_parser():
    """The command line: CloneArguments and MedicConfig fields, and `--config file.yaml`."""
    return _make_parser((CloneArguments, MedicConfig), description=__doc__)


def main(args: list[str] | None = None) -> dict:
    started = time.perf_counter()
    script_args, config = parse_args(make_parser(), args)
    if not script_args.model_name_or_path or not script_args.dataset_name:
        raise SystemExit("--model_name_or_path and --dataset_name are required (or set them in --config).")
    data = load_image_dataset(script_args.dataset_name)
    clean = subset_from_args(
        data,
        split=script_args.train_split,
        fraction=script_args.clean_fraction,
        num_samples=script_args.clean_samples,
        seed=script_args.data_seed_clean,
    )
    eval_sets = {}
    if script_args.test_split:
        test = data[script_args.test_split]
        if script_args.max_eval_samples:
            test = test.select(range(min(script_args.max_eval_samples, len(test))))
        eval_sets["clean"] = test
        attack, backdoor = backdoor_view(script_args, test)
        if backdoor is not None:
            eval_sets["backdoor"] = backdoor

    unlabeled = unlabeled_images(script_args)
    teacher = load_model(script_args.model_name_or_path, trust_remote_code=script_args.trust_remote_code)
    cloner = MedicCloner(
        teacher,
        config,
        train_dataset=clean,
        eval_dataset=eval_sets or None,
        dataset_name=script_args.dataset_name,
        base_model_name=script_args.model_name_or_path,
        student=script_args.student_name_or_path,
        unlabeled_dataset=unlabeled,
        trust_remote_code=script_args.trust_remote_code,
    )
    checkpoint = config.resume_from_checkpoint
    if checkpoint is None and Path(config.output_dir).is_dir():
        if config.overwrite_output_dir:
            remove_checkpoints(config.output_dir, is_main_process=cloner.is_world_process_zero())
            cloner.accelerator.wait_for_everyone()
        else:
            # A killed run continues where it stopped; the cloner refuses a checkpoint of another run.
            checkpoint = get_last_checkpoint(config.output_dir)
    cloner.train(resume_from_checkpoint=checkpoint)
    cloner.save_model()

    results = {
        # results.json is uploaded with the model: names as on the card, no local paths
        "model": cloner.teacher_name,
        "student_base": cloner.student_base[0] if cloner.student_base else None,
        "dataset": public_name(script_args.dataset_name),
        "clean_samples": len(clean),
        "unlabeled_dataset": public_name(script_args.unlabeled_dataset_name) if unlabeled is not None else None,
        "unlabeled_samples": len(unlabeled) if unlabeled is not None else 0,
        "resumed_from": cloner.resumed_from,
        "steps": cloner.state.global_step,
        "epochs": round(float(cloner.state.epoch or 0.0), 2),
        "eval_sizes": cloner.eval_sizes(),
        "warnings": cloner.warnings,
        "before": cloner.metrics_before,
        "after": cloner.metrics_after,
        "history": [
            {k: v for k, v in log.items() if k.startswith("eval_") and k.endswith("accuracy") or k == "epoch"}
            for log in cloner.state.log_history
            if any(k.endswith("accuracy") for k in log)
        ],
        "hyperparameters": cloner.hyperparameters(),
    }
    # The whole run (data, model, statistics, evaluations, saving) against its training steps alone.
    wall = time.perf_counter() - started
    results["timing"] = {
        "wall_s": round(wall, 2),
        "train_steps_s": round(cloner.step_timer.seconds, 2),
        "steps_timed": cloner.step_timer.steps,
        "wall_over_steps": round(wall / cloner.step_timer.seconds, 3) if cloner.step_timer.seconds else None,
        "device_data": isinstance(cloner.train_dataset, DeviceImageSet),
    }
    if cloner.is_world_process_zero():
        out = Path(config.output_dir)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        table = results_table(cloner.metrics_before, cloner.metrics_after)
        (out / "results.md").write_text(table + "\n")
        print(table)
    if config.push_to_hub:
        cloner.push_to_hub()
    if cloner.warnings and not script_args.allow_accuracy_drop:
        raise SystemExit(
            f"{cloner.warnings[0]} The model, results.json and the card are in {config.output_dir}. Pass "
            "--allow_accuracy_drop true to accept it (exit 0), or raise --max_accuracy_drop."
        )
    return results


def remove_checkpoints(output_dir: str, *, is_main_process: bool) -> None:
    """--overwrite_output_dir: an earlier run's checkpoints must not be resumed nor rotated into this run."""
    if not is_main_process:
        return
    for folder in sorted(Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")):
        if folder.is_dir():
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
