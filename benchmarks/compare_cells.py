"""Two benchmark runs side by side, cell by cell: the same attacks, defenses and seeds in two output folders.

Made to show what moving the baselines onto the one training stack changed (docs/benchmarks.md): the cells of
`benchmarks/results/default_study/baselines` (the baselines' own loop) against `benchmarks/results/benchmark_cpu`
(the one stack), on the same trojaned models, clean data and seed:

    python benchmarks/compare_cells.py benchmarks/results/default_study/baselines benchmarks/results/benchmark_cpu \\
        --labels "own loop" "one stack"

Prints a Markdown table: per cell, clean accuracy / ASR (%) and DER of each run, for the cells both runs have.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cells(folder: Path) -> dict[tuple[str, str, str], dict]:
    found = {}
    for path in sorted(folder.glob("cells/*/*/seed*.json")):
        cell = json.loads(path.read_text())
        found[(cell["attack"], cell["defense"], path.stem)] = cell
    return found


def row(cell: dict) -> str:
    after = cell["after"]
    return f"{100 * after['clean_accuracy']:.2f} / {100 * after['attack_success_rate']:.2f} — {100 * cell['der']:.2f}"


def table(first: dict, second: dict, labels: tuple[str, str]) -> str:
    lines = [
        f"| attack | defense | seed | {labels[0]}: ACC / ASR — DER | {labels[1]}: ACC / ASR — DER |",
        "|---|---|---|---|---|",
    ]
    for key in sorted(first.keys() & second.keys(), key=lambda k: (k[1], k[0], k[2])):
        attack, defense, seed = key
        seed = seed.removeprefix("seed")
        lines.append(f"| {attack} | {defense} | {seed} | {row(first[key])} | {row(second[key])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--labels", nargs=2, default=["first", "second"])
    args = parser.parse_args(argv)
    text = table(cells(args.first), cells(args.second), tuple(args.labels))
    print(text)
    return text


if __name__ == "__main__":
    main()
