"""The data path against the training step, and a whole run against its steps, per-image (PIL) and device-resident.

Part 1, the data path alone, on the demo's 1,400 clean CIFAR-10 images: images per second delivered as training
batches of 64 (decode + augment + normalise) by the per-image path (`device_data='never'`: PIL in the data loader)
and by the device-resident set (decoded once, then one index + batched augmentation), against the images per
second a MEDIC step of timm resnet18 (full width, 32x32, batch 64) consumes on the same machine.

Part 2, the embedded demo end to end (`recipes/clone.py --config recipes/demo.yaml`), once per path, each in its
own process: the whole run's wall time against the sum of its training steps' time (`MedicCloner.step_timer`),
and the ACC/ASR before and after.

    python benchmarks/data_path.py                  # both parts, ~10 min on 2 CPU cores
    python benchmarks/data_path.py --parts 1        # the data path only, ~1 min
    python benchmarks/data_path.py --parts 2 --seeds 1   # the demo runs again at seed 1 (rows added)

Writes benchmarks/results/data_path.json and prints Markdown tables (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "benchmarks" / "results" / "data_path.json"


def data_path_rates(batch_size: int, epochs: int) -> dict:
    """Images per second of both data paths and of a MEDIC step, in this process."""
    import timm
    from torch.utils.data import DataLoader

    from medic_hf import MedicCloner, MedicConfig
    from medic_hf.data import (
        DeviceBatchTransform,
        DeviceImageSet,
        build_transform,
        collate,
        find_columns,
        load_image_dataset,
        prepare_dataset,
        resolve_preprocessing,
    )
    from medic_hf.modeling import load_model

    data = load_image_dataset(str(ROOT / "demo" / "cifar10-slice"))["train"]
    teacher = load_model(str(ROOT / "demo" / "resnet18-badnets"))
    preprocessing = resolve_preprocessing(teacher)
    image_column, label_column = find_columns(data)
    results = {"images": len(data), "batch_size": batch_size}

    per_image = prepare_dataset(
        data,
        transform=build_transform(preprocessing, train=True),
        image_column=image_column,
        label_column=label_column,
    )
    loader = DataLoader(per_image, batch_size=batch_size, shuffle=True, collate_fn=collate)
    start, seen = time.perf_counter(), 0
    for _ in range(epochs):
        for batch in loader:
            seen += len(batch["labels"])
    results["per_image_images_per_s"] = seen / (time.perf_counter() - start)

    start = time.perf_counter()
    device_set = DeviceImageSet.from_dataset(data, image_column, label_column, preprocessing)
    results["device_decode_s"] = time.perf_counter() - start
    transform = DeviceBatchTransform(preprocessing)
    loader = DataLoader(device_set, batch_size=batch_size, shuffle=True, collate_fn=collate)
    start, seen = time.perf_counter(), 0
    for _ in range(epochs * 5):
        for batch in loader:
            pixels = transform(batch["pixel_values"], train=True)
            seen += len(pixels)
    results["device_images_per_s"] = seen / (time.perf_counter() - start)

    # A MEDIC step of full-width timm resnet18 at 32x32 (the step-cost benchmark's model), fed by the device set.
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).eval()
    args = MedicConfig(
        output_dir=str(ROOT / "runs" / "data_path_step"),
        max_steps=12,
        per_device_train_batch_size=batch_size,
        save_strategy="no",
        disable_tqdm=True,
        report_to="none",
        image_size=[32],
        max_accuracy_drop=None,
        logging_steps=1000,
    )
    cloner = MedicCloner(model, args, train_dataset=data)
    cloner.train()
    results["medic_step_s"] = cloner.step_timer.seconds / cloner.step_timer.steps
    results["medic_step_images_per_s"] = batch_size / results["medic_step_s"]
    for path in ("per_image", "device"):
        results[f"{path}_over_step"] = results[f"{path}_images_per_s"] / results["medic_step_images_per_s"]
    return results


def demo_run(device_data: str, seed: int) -> dict:
    """The README's demo command, in its own process; its results.json (with the timing) and process wall time."""
    out = ROOT / "runs" / f"data_path_demo_{device_data}_seed{seed}"
    command = [sys.executable, str(ROOT / "recipes" / "clone.py"), "--config", "recipes/demo.yaml"]
    command += ["--output_dir", str(out), "--device_data", device_data, "--overwrite_output_dir", "true"]
    command += ["--disable_tqdm", "true", "--seed", str(seed), "--allow_accuracy_drop", "true"]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    results = json.loads((out / "results.json").read_text())
    results["timing"]["process_wall_s"] = round(time.perf_counter() - start, 2)
    return {"timing": results["timing"], "before": results["before"], "after": results["after"]}


def markdown(report: dict) -> str:
    lines = []
    rates = report.get("data_path")
    if rates:
        lines += [
            "| path | images / s | × a MEDIC step's images / s |",
            "|---|---|---|",
            f"| per-image (PIL in the data loader) | {rates['per_image_images_per_s']:,.0f} | "
            f"{rates['per_image_over_step']:.1f} |",
            f"| device-resident (index + batched augmentation) | {rates['device_images_per_s']:,.0f} | "
            f"{rates['device_over_step']:.1f} |",
            f"| MEDIC step, timm resnet18 32x32, batch {rates['batch_size']} | "
            f"{rates['medic_step_images_per_s']:,.0f} | 1.0 |",
            "",
            f"Decoding the {rates['images']:,} images once: {rates['device_decode_s']:.2f} s.",
            "",
        ]
    demos = report.get("demo")
    if demos:
        lines += [
            "| demo run | seed | whole run (s) | training steps (s) | whole / steps | process (s) | "
            "ACC before → after | ASR before → after |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for path, run in demos.items():
            t, b, a = run["timing"], run["before"], run["after"]
            lines.append(
                f"| device_data={path.replace(', ', ' | ') if ', ' in path else path + ' | seed 0'} | "
                f"{t['wall_s']:.1f} | {t['train_steps_s']:.1f} | "
                f"**{t['wall_over_steps']:.3f}** | "
                f"{t['process_wall_s']:.1f} | {100 * b['clean_accuracy']:.2f}% → {100 * a['clean_accuracy']:.2f}% | "
                f"{100 * b['attack_success_rate']:.2f}% → {100 * a['attack_success_rate']:.2f}% |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--parts", nargs="+", type=int, default=[1, 2], choices=[1, 2])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2, help="Epochs over the slice for the per-image rate.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="Seeds of the demo runs (part 2).")
    args = parser.parse_args(argv)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, no GPU"
        if not torch.cuda.is_available()
        else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    if OUTPUT.is_file():
        report = {**json.loads(OUTPUT.read_text()), **report}
    if 1 in args.parts:
        report["data_path"] = data_path_rates(args.batch_size, args.epochs)
    if 2 in args.parts:
        demos = report.setdefault("demo", {})
        for seed in args.seeds:
            for path in ("never", "auto"):
                demos[path if seed == 0 else f"{path}, seed {seed}"] = demo_run(path, seed)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
