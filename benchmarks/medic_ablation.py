"""MEDIC's settings measured across attacks: one table from the benchmark cells of each setting.

Each setting is a run of `recipes/benchmark.py` with the medic defense only, other settings and its own output
folder under `benchmarks/results/medic_ablation/`, for example:

    OMP_NUM_THREADS=1 python recipes/benchmark.py --config recipes/benchmark_cpu.yaml --defenses medic \
        --attacks badnets blended sig-pr0.05 label_consistent-4corners-pr0.05 wanet \
        --defense_kwargs '{"medic": {"num_train_epochs": 60, "save_strategy": "no"}}' \
        --output_dir benchmarks/results/medic_ablation/epochs60 --work_dir runs/medic_ablation/epochs60
    python benchmarks/medic_ablation.py   # writes benchmarks/results/medic_ablation/summary.{md,json}

A setting meets the issue's targets when, on every attack it was run on, the ASR after removal is at most 10% and at
most 3 points of clean accuracy are lost.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ASR_TARGET = 0.10
ACC_TOLERANCE = 0.03


def load_cells(folder: Path) -> dict[str, dict]:
    """attack -> the medic cell of seed 0 in one setting's output folder."""
    cells = {}
    for path in sorted(folder.glob("cells/*/medic/seed0.json")):
        cell = json.loads(path.read_text())
        cells[cell["attack"]] = cell
    return cells


def summarise(root: Path) -> dict:
    settings = {folder.name: load_cells(folder) for folder in sorted(root.iterdir()) if folder.is_dir()}
    settings = {name: cells for name, cells in settings.items() if cells}
    summary = {}
    for name, cells in settings.items():
        drops = {a: c["before"]["clean_accuracy"] - c["after"]["clean_accuracy"] for a, c in cells.items()}
        asrs = {a: c["after"]["attack_success_rate"] for a, c in cells.items()}
        summary[name] = {
            "attacks": sorted(cells),
            "accuracy_drop": drops,
            "asr_after": asrs,
            "mean_accuracy_drop": sum(drops.values()) / len(drops),
            "max_asr_after": max(asrs.values()),
            "meets_targets": all(asrs[a] <= ASR_TARGET and drops[a] <= ACC_TOLERANCE for a in cells),
            "config": {k: next(iter(cells.values()))["config"][k] for k in ("num_train_epochs", "temperature")},
        }
    return summary


def markdown(summary: dict) -> str:
    attacks = sorted({a for s in summary.values() for a in s["attacks"]})
    names = list(summary)
    lines = [
        "Clean accuracy lost (points) / ASR after removal (%), per attack and MEDIC setting; "
        "targets: ≤ 3 points lost and ASR ≤ 10% on every attack.",
        "",
        "| attack | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for attack in attacks:
        row = []
        for name in names:
            s = summary[name]
            if attack in s["attacks"]:
                row.append(f"{100 * s['accuracy_drop'][attack]:.2f} / {100 * s['asr_after'][attack]:.2f}")
            else:
                row.append("–")
        lines.append(f"| {attack} | " + " | ".join(row) + " |")
    lines.append(
        "| **mean drop / max ASR** | "
        + " | ".join(
            f"{100 * summary[n]['mean_accuracy_drop']:.2f} / {100 * summary[n]['max_asr_after']:.2f}" for n in names
        )
        + " |"
    )
    lines.append(
        "| epochs, τ | "
        + " | ".join(
            f"{summary[n]['config']['num_train_epochs']:g}, {summary[n]['config']['temperature']:g}" for n in names
        )
        + " |"
    )
    lines.append(
        "| meets the targets | " + " | ".join("yes" if summary[n]["meets_targets"] else "**no**" for n in names) + " |"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="benchmarks/results/medic_ablation", help="One folder per setting.")
    args = parser.parse_args(argv)
    root = Path(args.root)
    summary = summarise(root)
    table = markdown(summary)
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    (root / "summary.md").write_text(table)
    print(table)
    return summary


if __name__ == "__main__":
    main()
