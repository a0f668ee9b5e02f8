"""The attack table of docs/attacks.md: one clean and one trojaned model per attack, trained the same way.

Each model is made by `recipes/poison.py` with `recipes/poison_cifar10_small.yaml` (timm resnet18 at 3/8 width,
32x32, 20 epochs; a `-e<N>` row, WaNet's and its clean reference `clean-e<N>`, N epochs) on the local CIFAR-10
copy. Label-consistent PGD runs against the clean model, so the clean model is
trained first. Finished models (a `metrics.json` in their folder) are skipped and an interrupted one resumes from its
last epoch checkpoint, so the script can be run again until the table is complete:

    python benchmarks/attack_table.py --dataset_name ../shared/data/cifar10 --jobs 2
    python benchmarks/attack_table.py --dataset_name ../shared/data/cifar10 --attacks none badnets   # train a subset
    python benchmarks/attack_table.py --table_only   # rebuild the table from the finished runs

Writes `benchmarks/results/attacks/<config name>/attack_table.{json,md}` from every finished model (whichever
`--attacks` trained this time): clean accuracy and ASR of each model next to the clean model, the targets of the
attacks issue, and each model's command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from medic_hf.scripts.benchmark import (  # one poison command, one list of attacks
    ALL_ATTACKS,
    ATTACK_VARIANTS,
    base_attack,
    clean_reference,
    model_folder,
    poison_flags,
)

ROOT = Path(__file__).resolve().parents[1]

# The rows, in table order: the clean model, the six attacks at their defaults, then the variants.
ATTACKS = ["none"] + ALL_ATTACKS + list(ATTACK_VARIANTS)
# Expected ASR of the attacks issue (fractions); clean accuracy within 3 points of the clean model for all.
ASR_TARGETS = {"badnets": 0.9, "blended": 0.9, "wanet": 0.9, "sig": 0.8, "label_consistent": 0.8, "composite": 0.7}
ACC_TOLERANCE = 0.03


def folder(attack: str, args: argparse.Namespace) -> Path:
    return model_folder(args.runs, attack)


def command(attack: str, args: argparse.Namespace) -> list[str]:
    """The recipes/poison.py command line that makes the model for ``attack``."""
    return ["recipes/poison.py", *poison_flags(attack, args.runs, args.config, args.dataset_name)]


def train(attack: str, args: argparse.Namespace) -> None:
    out = folder(attack, args)
    if (out / "metrics.json").exists():
        print(f"[{attack}] done already: {out}", flush=True)
        return
    if base_attack(attack) == "label_consistent":  # its PGD needs the finished clean model
        while not (folder("none", args) / "metrics.json").exists():
            time.sleep(30)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable] + command(attack, args)
    # One thread per job: oversubscribed OpenMP threads slow every job down many times over.
    threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    print(f"[{attack}] OMP_NUM_THREADS={threads} {shlex.join(cmd)}", flush=True)
    with open(out / "train.log", "a") as log:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    print(f"[{attack}] finished", flush=True)


def table(args: argparse.Namespace) -> dict:
    rows = {}
    for attack in ATTACKS:  # every finished row, not only those --attacks trained this time
        metrics_file = folder(attack, args) / "metrics.json"
        if metrics_file.exists():
            rows[attack] = json.loads(metrics_file.read_text())
            rows[attack]["command"] = "python " + shlex.join(command(attack, args))
    lines = [
        f"Models: `{args.config}` (one per row), data `{args.dataset_name}`; ASR on the triggered non-target test "
        "images. Target: the attacks issue's expected ASR, and clean accuracy within 3 points of the clean model "
        "trained the same way (a `-e<N>` row: the clean model trained N epochs, `clean-e<N>`; any other row: the "
        "20-epoch clean model).",
        "",
        "| attack | clean accuracy | Δ vs clean | ASR | ASR target | meets target |",
        "|---|---|---|---|---|---|",
    ]
    for attack, m in rows.items():
        acc, asr = m["clean_accuracy"], m.get("attack_success_rate")
        clean_acc = rows.get(clean_reference(attack), {}).get("clean_accuracy")
        is_clean = base_attack(attack) == "none"
        delta = "" if clean_acc is None or is_clean else f"{100 * (acc - clean_acc):+.2f}"
        target = ASR_TARGETS.get(base_attack(attack))
        ok = ""
        if target is not None and clean_acc is not None:
            m["meets_target"] = bool(asr >= target and acc >= clean_acc - ACC_TOLERANCE)
            ok = "yes" if m["meets_target"] else "**no**"
        name = "clean" if attack == "none" else attack
        if is_clean:
            name += " (no attack)"
        asr_text = "" if asr is None else f"{100 * asr:.2f}%"
        target_text = "" if target is None else f"≥ {100 * target:.0f}%"
        lines.append(f"| {name} | {100 * acc:.2f}% | {delta} | {asr_text} | {target_text} | {ok} |")
    lines += ["", "Commands (run from the repository root):", "", "```bash"]
    lines += [m["command"] for m in rows.values()] + ["```", ""]
    results = Path(args.results) / Path(args.config).stem
    results.mkdir(parents=True, exist_ok=True)
    (results / "attack_table.json").write_text(json.dumps(rows, indent=2))
    (results / "attack_table.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_name", default="../shared/data/cifar10")
    parser.add_argument("--config", default="recipes/poison_cifar10_small.yaml")
    parser.add_argument("--attacks", nargs="+", default=ATTACKS, choices=ATTACKS)
    parser.add_argument("--runs", default="runs/attacks", help="Where the models go (not committed).")
    parser.add_argument("--results", default="benchmarks/results/attacks", help="Where the table goes.")
    parser.add_argument("--jobs", type=int, default=1, help="Models trained at once (CPU cores are split).")
    parser.add_argument(
        "--table_only", action="store_true", help="Train nothing; rebuild the table from the finished runs."
    )
    args = parser.parse_args(argv)
    if not args.table_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda attack: train(attack, args), args.attacks))  # list() re-raises a failed job
    return table(args)


if __name__ == "__main__":
    main()
