"""MEDIC settings on one trojaned model: clean accuracy and ASR before/after, and over training.

Runs `recipes/clone.py` once per setting (skipping settings whose `results.json` exists; a killed run resumes from
its last checkpoint), then writes a Markdown table and a PNG plot of ASR and clean accuracy against epochs.

    python recipes/poison.py --config recipes/poison_cifar10.yaml --dataset_name ../shared/data/cifar10 \
        --output_dir runs/resnet18-badnets-20ep
    python benchmarks/removal_sweep.py --model runs/resnet18-badnets-20ep --settings defaults tau0 --jobs 2
    python benchmarks/removal_sweep.py --model runs/resnet18-badnets-20ep --report_only   # table and plot so far

Runs go to runs/removal/<model folder name>/<setting>; the table (removal.md), plot (removal.png) and each run's
results.json to benchmarks/results/<model folder name>/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> extra recipe flags on top of recipes/clone_cifar10.yaml (the paper's settings)
SETTINGS = {
    "defaults": [],
    "seed1": ["--seed", "1"],
    "seed2": ["--seed", "2"],
    "seed3": ["--seed", "3"],
    "paper": ["--clone_logits", "true"],  # the paper's text: the logits cloned too
    "paper_seed1": ["--clone_logits", "true", "--seed", "1"],
    "paper_seed2": ["--clone_logits", "true", "--seed", "2"],
    "tau0": ["--temperature", "0", "--clone_logits", "true"],  # plain cloning of every neuron
    "tau10": ["--temperature", "10"],
    "tau10_warmup": ["--temperature", "10", "--warmup_ratio", "0.05"],
    "no_augment": ["--augment", "false", "--clone_logits", "true"],
    "neuron_stats": ["--stats_granularity", "neuron"],
    "activation_only": ["--importance", "activation"],
    "wd5e-4": ["--weight_decay", "5e-4"],
    "cutoff1": ["--importance_cutoff", "1.0"],
    "clean_subset1": ["--data_seed_clean", "1"],
    "no_last_stage": ["--exclude_modules", "layer4.*"],  # the last stage (timm ResNet) learned from labels only
    "epochs30": ["--num_train_epochs", "30"],
    # the impact term made to select (its raw values are ~0, so softmax(τ·g) is uniform): unit RMS, mild τ
    "impact_rms_t1": ["--impact_scale", "rms", "--impact_temperature", "1"],
    "impact_rms_t2": ["--impact_scale", "rms", "--impact_temperature", "2"],
}


def run(name: str, args) -> subprocess.Popen | None:
    """Start one setting's run (None when its results.json exists already)."""
    out = Path(args.runs) / name
    if (out / "results.json").is_file():
        print(f"{name}: done already")
        return None
    cmd = [
        sys.executable, str(ROOT / "recipes" / "clone.py"),
        "--config", str(ROOT / "recipes" / "clone_cifar10.yaml"),
        "--model_name_or_path", args.model,
        "--dataset_name", args.dataset,
        "--output_dir", str(out),
        "--disable_tqdm", "true",
        *SETTINGS[name],
    ]  # fmt: skip
    print(" ".join(cmd), flush=True)
    env = dict(os.environ)
    if args.jobs > 1:  # share the cores instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    log = open(Path(args.runs) / f"{name}.log", "a")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def run_all(args) -> None:
    """Run the settings, `--jobs` at a time; a failed run is reported and the others go on."""
    pending, running, failed = list(args.settings), {}, []
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            process = run(name, args)
            if process is not None:
                running[name] = process
        for name, process in list(running.items()):
            if process.poll() is not None:
                del running[name]
                if process.returncode != 0:
                    failed.append(name)
                print(f"{name}: exit {process.returncode}", flush=True)
        time.sleep(2)
    if failed:
        print(f"failed: {failed} (see their .log files in {args.runs})")


def report(args) -> None:
    rows, curves, before = [], {}, {}
    for name in SETTINGS:
        path = Path(args.runs) / name / "results.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        (Path(args.results) / "removal").mkdir(parents=True, exist_ok=True)
        (Path(args.results) / "removal" / f"{name}.json").write_text(json.dumps(result, indent=2))
        before, after = result["before"], result["after"]
        flags = " ".join(SETTINGS[name]) or "(recipes/clone_cifar10.yaml as is)"
        rows.append(
            f"| {name} | `{flags}` | {100 * before['clean_accuracy']:.2f} → {100 * after['clean_accuracy']:.2f} | "
            f"{100 * before['attack_success_rate']:.2f} → {100 * after['attack_success_rate']:.2f} |"
        )
        points: dict[float, dict] = {}
        for entry in result["history"]:
            points.setdefault(entry["epoch"], {}).update(entry)
        curves[name] = sorted(points.items())
    table = "\n".join(
        ["| setting | flags | clean accuracy % (before → after) | ASR % (before → after) |", "|---|---|---|---|"]
        + rows
    )
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "removal.md").write_text(table + "\n")
    print(table)
    plot(curves, before, out / "removal.png")


def plot(curves: dict, before: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_asr, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for name, points in curves.items():
        epochs = [e for e, _ in points]
        ax_asr.plot(epochs, [100 * p.get("eval_backdoor_accuracy", float("nan")) for _, p in points], "o-", label=name)
        ax_acc.plot(epochs, [100 * p.get("eval_clean_accuracy", float("nan")) for _, p in points], "o-", label=name)
    ax_asr.set(xlabel="epoch", ylabel="attack success rate (%)", title="ASR during cloning")
    ax_acc.set(xlabel="epoch", ylabel="clean accuracy (%)", title="Clean accuracy during cloning")
    ax_asr.axhline(10, color="grey", linestyle="--", linewidth=0.8, label="target: 10%")
    if "clean_accuracy" in before:
        teacher = 100 * before["clean_accuracy"]
        ax_acc.axhline(teacher, color="black", linestyle=":", linewidth=0.8, label="trojaned model")
        ax_acc.axhline(teacher - 3, color="grey", linestyle="--", linewidth=0.8, label="target: 3 points lost")
        ax_acc.legend(loc="lower right", fontsize=8)
    ax_asr.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/resnet18-badnets-20ep", help="a folder made by recipes/poison.py")
    parser.add_argument("--dataset", default="../shared/data/cifar10")
    parser.add_argument("--runs", default=None, help="where the runs go (default: runs/removal/<model folder name>)")
    parser.add_argument("--results", default=None, help="table, plot, results (default: benchmarks/results/<model>)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--jobs", type=int, default=1, help="settings run at the same time (cores are shared)")
    parser.add_argument("--report_only", action="store_true")
    args = parser.parse_args()
    model_name = Path(args.model).name
    args.runs = args.runs or f"runs/removal/{model_name}"
    args.results = args.results or str(ROOT / "benchmarks" / "results" / model_name)
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        run_all(args)
    report(args)


if __name__ == "__main__":
    main()
