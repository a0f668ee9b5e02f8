"""Two methods of the transfer benchmark side by side on several of its sets (docs/transfer.md).

`benchmarks/transfer.py --report_only` tables one set; this compares two of its methods (a setting against the
default, say) over every set and attack where both ran, on the seeds both have:

    python benchmarks/transfer_compare.py --output benchmarks/results/transfer-positions \\
        --set "ResNet, set 2" benchmarks/results/transfer-set2 medic_base medic_base-pooled \\
        --set ViT benchmarks/results/transfer-vit medic_base-noattn medic_base-pooledtok

Each `--set` is a name, a results folder of `benchmarks/transfer.py` and the two methods' names there (a method's
name is its `--methods` entry and `--tag`). Writes `<output>.md` (per set and attack: the trojaned model, then each
method's clean accuracy / ASR after, the highest seed-mean ASR over the run's evaluations in brackets, and DER, in %,
means over the seeds; then each set's mean accuracy change and mean DER) and `<output>.json` (the same numbers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transfer  # noqa: E402  (benchmarks/transfer.py: its report's seed means)

ATTACKS = ("badnets-5px", "blended", "sig-half", "label_consistent")


def seed_cells(folder: Path, attack: str, method: str) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((folder / "cells" / attack / method).glob("seed*.json"))}


def compare(name: str, folder: Path, first: str, second: str) -> list[dict]:
    """Per attack where both methods ran, `transfer.summarise` of each on the seeds both have."""
    rows = []
    for attack in ATTACKS:
        a, b = seed_cells(folder, attack, first), seed_cells(folder, attack, second)
        seeds = sorted(a.keys() & b.keys())
        if not seeds:
            continue
        summary = transfer.summarise([a[s] for s in seeds] + [b[s] for s in seeds])
        rows.append(
            {
                "set": name,
                "attack": attack,
                "seeds": summary[first][attack]["seeds"],
                "methods": [first, second],
                first: summary[first][attack],
                second: summary[second][attack],
            }
        )
    return rows


def cell_text(s: dict) -> str:
    peak = "" if s["peak_of_mean_asr"] is None else f" ({s['peak_of_mean_asr']:.1f})"
    return f"{s['acc']:.2f} / {s['asr']:.1f}{peak} — {s['der']:.1f}"


def markdown(rows: list[dict], labels: tuple[str, str]) -> str:
    lines = [
        f"| set | attack | trojaned | {labels[0]} | {labels[1]} | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        first, second = r["methods"]
        trojaned = f"{r[first]['acc_before']:.2f} / {r[first]['asr_before']:.1f}"
        lines.append(
            f"| {r['set']} | {r['attack']} | {trojaned} | {cell_text(r[first])} | {cell_text(r[second])} | "
            f"{len(r['seeds'])} |"
        )
    lines += ["", f"| set | attacks | accuracy change, {labels[1]} − {labels[0]} | mean DER {labels[0]} | "
              f"mean DER {labels[1]} |", "|---|---|---|---|---|"]  # fmt: skip
    for name in dict.fromkeys(r["set"] for r in rows):
        mine = [r for r in rows if r["set"] == name]
        first, second = mine[0]["methods"]
        change = sum(r[second]["acc"] - r[first]["acc"] for r in mine) / len(mine)
        der_first = sum(r[first]["der"] for r in mine) / len(mine)
        der_second = sum(r[second]["der"] for r in mine) / len(mine)
        lines.append(f"| {name} | {len(mine)} | {change:+.2f} | {der_first:.1f} | {der_second:.1f} |")
    return "\n".join(lines) + "\n"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--set",
        nargs=4,
        action="append",
        required=True,
        metavar=("NAME", "FOLDER", "FIRST", "SECOND"),
        help="A set's name, its results folder, and the two methods compared there.",
    )
    parser.add_argument("--labels", nargs=2, default=["first", "second"], help="The two methods' column titles.")
    parser.add_argument("--output", type=Path, required=True, help="Writes OUTPUT.md and OUTPUT.json.")
    return parser


def main(argv: list[str] | None = None) -> str:
    args = make_parser().parse_args(argv)
    rows = [row for name, folder, first, second in args.set for row in compare(name, Path(folder), first, second)]
    if not rows:
        raise SystemExit("No attack has cells of both methods at a common seed in the folders given.")
    text = markdown(rows, tuple(args.labels))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.output}.md").write_text(text)
    Path(f"{args.output}.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
