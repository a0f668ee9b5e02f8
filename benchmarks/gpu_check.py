"""Everything worth measuring on a GPU, in one command of at most ~8 minutes on one H100-class card.

1. The step-cost table on CUDA: a MEDIC step (importance=both) against a plain fine-tuning step of full-width timm
   resnet18 at 32x32, in fp32 and under bf16 autocast, at batch 64 and 256 (median of timed steps after warm-up).
2. The embedded demo end to end (`recipes/clone.py --config recipes/demo.yaml`): wall time, ACC/ASR before/after.
3. One full CIFAR-10 sanitize of a full-width resnet18 at MEDIC's default budget with 5% clean data: a BadNets
   teacher is trained first with recipes/poison.py (`--teacher_epochs`, timed apart), then cloned with the defaults.
4. With two GPUs or more: the same clone start as two DDP processes and as one; their first logged loss must agree.

It fails loudly (exit code 2), never skips, when CUDA is missing. Needs CIFAR-10 (`--dataset_name`, a local parquet
folder or a Hub id) for part 3: on a lent machine, carry a copy (54 MB) as an ignored folder of the checkout.

    python benchmarks/gpu_check.py --dataset_name runs/cifar10
    python benchmarks/gpu_check.py --parts 1 2          # without CIFAR-10

Writes `<output_dir>/gpu_check.json` and `gpu_check.md` (default benchmarks/results/) and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = (1, 2, 3, 4)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--parts", nargs="+", type=int, choices=PARTS, default=list(PARTS))
    parser.add_argument("--dataset_name", default="../shared/data/cifar10", help="CIFAR-10 for part 3.")
    parser.add_argument("--teacher_epochs", type=int, default=15, help="Epochs of the part-3 trojaned teacher.")
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--steps", type=int, default=30, help="Timed steps per step-cost cell.")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--output_dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--work_dir", default=str(ROOT / "runs" / "gpu_check"), help="Models and runs go here.")
    return parser


def require_cuda() -> str:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(
            "benchmarks/gpu_check.py needs a CUDA GPU and torch.cuda.is_available() is False here: nothing was "
            "measured. Run it on a GPU machine (docs/performance.md); on CPU use benchmarks/step_cost.py and "
            "benchmarks/data_path.py."
        )
    return torch.cuda.get_device_name(0)


# --------------------------------------------------------------------------------------------------------------------
# 1. Step cost
# --------------------------------------------------------------------------------------------------------------------


def step_seconds(medic: bool, batch_size: int, bf16: bool, steps: int, warmup: int) -> float:
    """Median time of one training step (MEDIC or plain) of timm resnet18 at 32x32 on CUDA."""
    import datasets
    import numpy as np
    import timm
    import torch
    from transformers import TrainingArguments

    from medic_hf import MedicCloner, MedicConfig
    from medic_hf.training import ClassifierTrainer

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = datasets.Dataset.from_dict(
        {
            "pixel_values": rng.standard_normal((batch_size, 3, 32, 32)).astype(np.float32),
            "labels": rng.integers(0, 10, batch_size),
        }
    ).with_format("torch")
    common = dict(
        output_dir="/tmp/medic_gpu_check",
        per_device_train_batch_size=batch_size,
        report_to="none",
        disable_tqdm=True,
        logging_strategy="no",
        bf16=bf16,
    )
    model = timm.create_model("resnet18", num_classes=10)
    if medic:
        trainer = MedicCloner(model.eval(), MedicConfig(max_accuracy_drop=None, **common), train_dataset=data)
        trainer.stats = trainer.compute_statistics().to(trainer.args.device)
    else:
        trainer = ClassifierTrainer(model=model, args=TrainingArguments(**common), train_dataset=data)
    trainer.current_gradient_accumulation_steps = 1
    student = trainer.model.to(trainer.args.device).train()
    trainer.create_optimizer()
    batch = {k: v.to(trainer.args.device) for k, v in data[:batch_size].items()}
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.training_step(student, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_cost(args) -> list[dict]:
    rows = []
    for bf16 in (False, True):
        for batch_size in args.batch_sizes:
            plain = step_seconds(False, batch_size, bf16, args.steps, args.warmup)
            medic = step_seconds(True, batch_size, bf16, args.steps, args.warmup)
            rows.append(
                {
                    "precision": "bf16 autocast" if bf16 else "fp32",
                    "batch_size": batch_size,
                    "plain_step_ms": round(1000 * plain, 2),
                    "medic_step_ms": round(1000 * medic, 2),
                    "ratio": round(medic / plain, 3),
                }
            )
    return rows


# --------------------------------------------------------------------------------------------------------------------
# 2-4. Runs of the recipes
# --------------------------------------------------------------------------------------------------------------------


def run(command: list[str], timeout: float) -> float:
    """Run a recipe from the repository root; return its wall time. A failure stops the check."""
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, timeout=timeout)
    return round(time.perf_counter() - start, 2)


def clone_results(folder: Path, process_wall: float) -> dict:
    results = json.loads((folder / "results.json").read_text())
    return {
        "process_wall_s": process_wall,
        "timing": results.get("timing"),
        "before": results["before"],
        "after": results["after"],
        "steps": results.get("steps"),
    }


def demo(args) -> dict:
    out = Path(args.work_dir) / "demo"
    command = [sys.executable, "recipes/clone.py", "--config", "recipes/demo.yaml", "--output_dir", str(out)]
    command += ["--overwrite_output_dir", "true", "--disable_tqdm", "true"]
    return clone_results(out, run(command, timeout=240))


def full_sanitize(args) -> dict:
    teacher, out = Path(args.work_dir) / "resnet18-badnets", Path(args.work_dir) / "medic-resnet18"
    poison = [sys.executable, "recipes/poison.py", "--config", "recipes/poison_cifar10.yaml"]
    poison += ["--dataset_name", args.dataset_name, "--output_dir", str(teacher), "--num_train_epochs"]
    poison += [str(args.teacher_epochs), "--dataloader_num_workers", "8", "--disable_tqdm", "true"]
    teacher_wall = run(poison, timeout=300)
    clone = [sys.executable, "recipes/clone.py", "--model_name_or_path", str(teacher)]
    clone += ["--dataset_name", args.dataset_name, "--output_dir", str(out), "--overwrite_output_dir", "true"]
    clone += ["--disable_tqdm", "true", "--allow_accuracy_drop", "true"]
    return {
        "teacher_epochs": args.teacher_epochs,
        "teacher_wall_s": teacher_wall,
        **clone_results(out, run(clone, 300)),
    }


def ddp_first_loss(args) -> dict:
    """The demo's first step as two DDP processes and as one: the same first logged loss."""
    losses = {}
    for processes in (1, 2):
        out = Path(args.work_dir) / f"ddp{processes}"
        command = ["accelerate", "launch", "--num_processes", str(processes), "--mixed_precision", "no"]
        command += ["recipes/clone.py", "--config", "recipes/demo.yaml", "--output_dir", str(out)]
        command += ["--overwrite_output_dir", "true", "--max_steps", "1", "--logging_steps", "1"]
        command += ["--per_device_train_batch_size", str(64 // processes), "--max_eval_samples", "64"]
        command += ["--allow_accuracy_drop", "true", "--disable_tqdm", "true", "--augment", "false"]
        run(command, timeout=180)
        state = json.loads(next(out.glob("checkpoint-*/trainer_state.json")).read_text())
        losses[processes] = next(log["loss"] for log in state["log_history"] if "loss" in log)
    return {"one_process_loss": losses[1], "two_process_loss": losses[2], "agree": abs(losses[1] - losses[2]) < 1e-3}


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    lines = [f"GPU: **{report['gpu']}**, torch {report['torch']}, {report['date']}.", ""]
    if "step_cost" in report:
        lines += ["| precision | batch | plain step (ms) | MEDIC step (ms) | × plain |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['precision']} | {r['batch_size']} | {r['plain_step_ms']} | {r['medic_step_ms']} | {r['ratio']} |"
            for r in report["step_cost"]
        ]
        lines.append("")
    for key, label in (("demo", "demo (1,400 clean images, 60 epochs)"), ("full", "CIFAR-10 5%, resnet18, defaults")):
        if key in report:
            r = report[key]
            before, after = r["before"], r["after"]
            lines.append(
                f"- {label}: {r['process_wall_s']} s end to end (whole/steps {r['timing']['wall_over_steps']}); "
                f"ACC {100 * before['clean_accuracy']:.2f}% → {100 * after['clean_accuracy']:.2f}%, "
                f"ASR {100 * before.get('attack_success_rate', float('nan')):.2f}% → "
                f"{100 * after.get('attack_success_rate', float('nan')):.2f}%"
            )
    if isinstance(report.get("ddp"), dict):
        lines.append(
            f"- DDP: first loss {report['ddp']['one_process_loss']} (1 process) vs "
            f"{report['ddp']['two_process_loss']} (2 processes); agree: {report['ddp']['agree']}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    gpu = require_cuda()
    import torch

    report = {"gpu": gpu, "gpus": torch.cuda.device_count(), "torch": torch.__version__, "date": time.strftime("%F")}
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every part: a part that fails or times out leaves the others' figures
        (output_dir / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
        (output_dir / "gpu_check.md").write_text(markdown(report))

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if 1 in args.parts:
        report["step_cost"] = step_cost(args)
        save()
    if 2 in args.parts:
        report["demo"] = demo(args)
        save()
    if 3 in args.parts:
        report["full"] = full_sanitize(args)
        save()
    if 4 in args.parts:
        report["ddp"] = ddp_first_loss(args) if torch.cuda.device_count() >= 2 else "one GPU: not run"
        save()
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
