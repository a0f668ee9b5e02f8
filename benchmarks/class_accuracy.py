"""Clean test accuracy of the target class against the other classes, for models made by recipes/poison.py, and the
share of clean non-target test images called the target class (false triggers).

Shows where an attack's accuracy loss lies (docs/attacks.md, "What the table says"): on the target class for the
clean-label attacks, in false triggers for WaNet:

    python benchmarks/class_accuracy.py runs/attacks/clean runs/attacks/sig runs/attacks/label_consistent \
        runs/attacks/label_consistent-4corners runs/attacks/wanet runs/attacks/clean-e80 runs/attacks/wanet-e80

Writes `benchmarks/results/attacks/class_accuracy.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from medic_hf.data import load_image_dataset
from medic_hf.modeling import load_model
from medic_hf.scripts.benchmark import predict


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="Model folders.")
    parser.add_argument("--dataset_name", default="../shared/data/cifar10")
    parser.add_argument("--target_class", type=int, default=0)
    parser.add_argument("--output", default="benchmarks/results/attacks/class_accuracy.json")
    args = parser.parse_args(argv)
    test = load_image_dataset(args.dataset_name)["test"]
    labels = np.asarray(test["label"])
    results = {}
    for folder in args.models:
        preds = predict(load_model(folder), test, 500)
        per_class = [float((preds[labels == c] == c).mean()) for c in np.unique(labels)]
        others = [acc for c, acc in enumerate(per_class) if c != args.target_class]
        false_triggers = float((preds[labels != args.target_class] == args.target_class).mean())
        results[folder] = {
            "target_class": per_class[args.target_class],
            "other_classes_mean": float(np.mean(others)),
            "non_target_called_target": false_triggers,
        }
        print(
            f"{folder}: target class {100 * per_class[args.target_class]:.1f}%, others {100 * np.mean(others):.2f}%, "
            f"non-target images called the target {100 * false_triggers:.2f}%"
        )
    Path(args.output).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
