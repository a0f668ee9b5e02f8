"""Cost of a MEDIC training step against a plain fine-tuning step of the same model, in one run.

Each variant runs in its own subprocess (so its peak memory is its own), twice, alternating, and the median step
time over all timed steps is reported, with the ratio to the plain step. Peak memory is the growth of the
process's maximum resident set from after the imports to after the steps (models, optimizer state and step
activations; CPU), or `torch.cuda.max_memory_allocated` above the memory held before the timed steps (GPU).

    python benchmarks/step_cost.py                      # timm resnet18 at 32x32, batch 64, CPU
    python benchmarks/step_cost.py --device cuda --batch_size 256
Writes benchmarks/results/step_cost.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "plain fine-tuning step": None,
    "MEDIC step (importance=both)": "both",
    "MEDIC step (importance=activation)": "activation",
    "MEDIC step (importance=none)": "none",
}


def measure(variant: str, args) -> dict:
    """Runs in the child process: build the model and a step, time `args.steps` steps after warm-up."""
    import datasets
    import numpy as np
    import timm
    import torch

    from medic_hf import MedicCloner, MedicConfig
    from medic_hf.training import ClassifierTrainer

    # Resident set after the imports, before any model: what the step costs is the growth from here.
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n = args.batch_size * 2
    rng = np.random.default_rng(0)
    data = datasets.Dataset.from_dict(
        {
            "pixel_values": rng.standard_normal((n, 3, args.image_size, args.image_size)).astype(np.float32),
            "labels": rng.integers(0, 10, n),
        }
    ).with_format("torch")
    model = timm.create_model(args.model, num_classes=10).to(device)
    common = dict(
        output_dir="/tmp/medic_step_cost",
        per_device_train_batch_size=args.batch_size,
        report_to="none",
        disable_tqdm=True,
        use_cpu=args.device == "cpu",
        logging_strategy="no",
    )
    importance = VARIANTS[variant]
    if importance is None:
        from transformers import TrainingArguments

        trainer = ClassifierTrainer(model=model, args=TrainingArguments(**common), train_dataset=data)
    else:
        trainer = MedicCloner(model.eval(), MedicConfig(importance=importance, **common), train_dataset=data)
        trainer.stats = trainer.compute_statistics().to(device)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which this loop stands in for
    student = trainer.model.to(device).train()
    trainer.create_optimizer()
    optimizer = trainer.optimizer
    batch = {k: v.to(device) for k, v in data[: args.batch_size].items()}

    def step():
        trainer.training_step(student, batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        # ru_maxrss only grows: it holds the peak of the run; its growth since the imports is the memory of the
        # model(s), optimizer state and step activations together.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline_rss
    return {"times": times, "peak_bytes": peak, "base_bytes": base}


def child_main(args) -> None:
    print(json.dumps(measure(args.variant, args)))


def parent_main(args) -> None:
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--child", "--variant", variant] + forwarded(args)
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            runs[variant].append(json.loads(out))
    plain = statistics.median(t for r in runs["plain fine-tuning step"] for t in r["times"])
    plain_mem = max(r["peak_bytes"] for r in runs["plain fine-tuning step"])
    rows = []
    for variant, results in runs.items():
        median = statistics.median(t for r in results for t in r["times"])
        peak = max(r["peak_bytes"] for r in results)
        rows.append(
            {
                "variant": variant,
                "median_step_s": round(median, 4),
                "time_ratio": round(median / plain, 3),
                "peak_step_memory_mib": round(peak / 2**20, 1),
                "memory_ratio": round(peak / plain_mem, 3),
            }
        )
    report = {
        "model": args.model,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "device": args.device,
        "threads": args.threads,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()} {platform.release()}",
        "rows": rows,
    }
    out = Path(__file__).parent / "results" / f"step_cost_{args.device}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print("| step | median time (s) | × plain | peak step memory (MiB) | × plain |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['median_step_s']} | {r['time_ratio']} | {r['peak_step_memory_mib']} | "
            f"{r['memory_ratio']} |"
        )
    print(f"\nwritten to {out}")


def forwarded(args) -> list[str]:
    keys = ("model", "image_size", "batch_size", "device", "threads", "steps", "warmup")
    return [x for k in keys for x in (f"--{k}", str(getattr(args, k)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    child_main(args) if args.child else parent_main(args)


if __name__ == "__main__":
    main()
