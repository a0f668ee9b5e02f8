"""The robust-default study (issue 16): MEDIC settings × trojaned models × seeds, the backdoor watched over training.

Each run is `recipes/clone.py` on one trojaned model folder (made by recipes/poison.py or benchmarks/attack_table.py:
it holds the attack.json that gives the backdoor test set) at MEDIC's defaults plus one setting's flags, evaluating
the clean and backdoor test sets every `--eval_every` epochs. A run whose `results.json` exists is skipped and a
killed one resumes from its last epoch checkpoint, so the same command continues the study:

    OMP_NUM_THREADS=1 python benchmarks/default_study.py \
        --models benchmarks/models/poison_cifar10_small/badnets benchmarks/models/poison_cifar10_small/sig-pr0.05 \
        --settings defaults cosine_lambda --seeds 0 1
    python benchmarks/default_study.py --report_only   # the tables and plots of every finished run

`--epochs 60` (twice the default budget) is the no-rebound check; its runs go to their own folders (`e60`).
Runs (checkpoints, models) go to `runs/default_study/`; each run's results.json, the tables (study.md) and the plots
(one PNG per model) to `benchmarks/results/default_study/`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# name -> MEDIC flags on top of the library's defaults (where each idea comes from: docs/robust_default.md)
SETTINGS = yaml.safe_load((Path(__file__).with_name("default_study_settings.yaml")).read_text())
BASE_FLAGS = SETTINGS.pop("base")  # the defaults before the study, under every setting
PRESET_BENCHMARK = ROOT / "benchmarks" / "results" / "benchmark_cpu"  # recipes/benchmark_cpu.yaml's cells


def run_name(model: str, setting: str, seed: int, epochs: int, clean_fraction: float) -> str:
    budget = "" if epochs == 30 else f"-e{epochs}"
    data = "" if clean_fraction == 0.05 else f"-cf{clean_fraction:g}"
    return f"{Path(model).name}/{setting}{budget}{data}/seed{seed}"


def command(model: str, setting: str, seed: int, args, out: Path) -> list[str]:
    clean_rows = round(50_000 * args.clean_fraction)  # CIFAR-10's training split
    steps_per_epoch = math.ceil(clean_rows / 64)
    return [
        sys.executable, str(ROOT / "recipes" / "clone.py"),
        "--model_name_or_path", model,
        "--dataset_name", args.dataset,
        "--clean_fraction", str(args.clean_fraction),
        "--output_dir", str(out),
        "--seed", str(seed),
        "--num_train_epochs", str(args.epochs),
        "--eval_strategy", "steps",
        "--eval_steps", str(steps_per_epoch * args.eval_every),
        "--logging_steps", str(steps_per_epoch),
        "--save_total_limit", "1",
        "--disable_tqdm", "true",
        "--allow_accuracy_drop", "true",
        *BASE_FLAGS,
        *SETTINGS[setting],
    ]  # fmt: skip


def run_all(args) -> None:
    """Every (model, setting, seed) run not done yet, `--jobs` at a time; a failure is reported, the rest go on."""
    pending = [(model, setting, seed) for model in args.models for setting in args.settings for seed in args.seeds]
    running, failed = {}, []
    while pending or running:
        while pending and len(running) < args.jobs:
            model, setting, seed = pending.pop(0)
            name = run_name(model, setting, seed, args.epochs, args.clean_fraction)
            out = Path(args.runs) / name
            if (out / "results.json").is_file():
                save_result(out, name, args)
                continue
            out.mkdir(parents=True, exist_ok=True)
            cmd = command(model, setting, seed, args, out)
            print(f"[{time.strftime('%H:%M:%S')}] start {name}", flush=True)
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            log = open(out / "run.log", "a")
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), out)
        for name, (process, out) in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            if process.returncode == 0:
                save_result(out, name, args)
                print(f"[{time.strftime('%H:%M:%S')}] done {name}: {summary_line(out)}", flush=True)
            else:
                failed.append(name)
                print(f"[{time.strftime('%H:%M:%S')}] FAILED {name} (exit {process.returncode}, see {out}/run.log)")
        time.sleep(2)
    if failed:
        print(f"failed: {failed}")


def save_result(out: Path, name: str, args) -> None:
    target = Path(args.results) / "runs" / name / "results.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text((out / "results.json").read_text())


def summary_line(out: Path) -> str:
    result = json.loads((out / "results.json").read_text())
    after = result["after"]
    return f"ACC {100 * after['clean_accuracy']:.2f}%, ASR {100 * after['attack_success_rate']:.2f}%"


def curve(result: dict) -> list[tuple[float, float, float]]:
    """(epoch, clean accuracy, ASR) at every evaluation of a run."""
    points: dict[float, dict] = {}
    for entry in result["history"]:
        points.setdefault(entry["epoch"], {}).update(entry)
    return [
        (epoch, p["eval_clean_accuracy"], p["eval_backdoor_accuracy"])
        for epoch, p in sorted(points.items())
        if "eval_clean_accuracy" in p and "eval_backdoor_accuracy" in p
    ]


def load_results(results_dir: Path) -> dict[tuple[str, str], dict[int, dict]]:
    """(model, setting folder) -> seed -> results.json."""
    found: dict[tuple[str, str], dict[int, dict]] = {}
    for path in sorted((results_dir / "runs").glob("*/*/seed*/results.json")):
        model, setting, seed = path.parts[-4], path.parts[-3], int(path.parts[-2][4:])
        found.setdefault((model, setting), {})[seed] = json.loads(path.read_text())
    return found


def mean(values: list[float]) -> float:
    return statistics.fmean(values)


def report(args) -> str:
    results_dir = Path(args.results)
    found = load_results(results_dir)
    if not found:
        print("no finished runs yet")
        return ""
    models = sorted({model for model, _ in found})
    settings = sorted({setting for _, setting in found}, key=setting_order)
    lines = [
        "Clean accuracy lost (points) / ASR after (%) / highest ASR at any evaluation (%), mean over the seeds "
        "(their number in brackets); the trojaned model's accuracy and ASR in the header.",
        "",
        "| setting | " + " | ".join(f"{m} ({teacher_line(found, m)})" for m in models) + " | mean lost | max ASR |",
        "|---|" + "---|" * (len(models) + 2),
    ]
    summary = {}
    for setting in settings:
        cells, lost_all, asr_all = [], [], []
        for model in models:
            runs = found.get((model, setting), {})
            if not runs:
                cells.append("–")
                continue
            lost = [100 * (r["before"]["clean_accuracy"] - r["after"]["clean_accuracy"]) for r in runs.values()]
            asr = [100 * r["after"]["attack_success_rate"] for r in runs.values()]
            peak = [100 * max(p[2] for p in curve(r)) if curve(r) else float("nan") for r in runs.values()]
            cells.append(f"{mean(lost):.2f} / {mean(asr):.2f} / {max(peak):.2f} ({len(runs)})")
            lost_all.append(mean(lost))
            asr_all.append(mean(asr))
            summary[f"{model}/{setting}"] = {"lost": lost, "asr": asr, "peak_asr": peak, "seeds": sorted(runs)}
        complete = len(lost_all) == len(models)
        tail = f"{mean(lost_all):.2f} | {max(asr_all):.2f}" if complete else "– | –"
        lines.append(f"| {setting} | " + " | ".join(cells) + f" | {tail} |")
    table = "\n".join(lines) + "\n\n" + gap_table(found, models)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "study.md").write_text(table + "\n")
    (results_dir / "grid.md").write_text(grid_table(found, models, args.grid_settings) + "\n")
    if (results_dir / "baselines" / "cells").is_dir():
        # The baselines ran at the default budget and data: only the settings at that budget compare with them.
        at_default_budget = [s for s in args.grid_settings if s in SETTINGS]
        (results_dir / "der.md").write_text(der_table(found, results_dir / "baselines", at_default_budget) + "\n")
    (results_dir / "study.json").write_text(json.dumps(summary, indent=2))
    print(table)
    for model in models:
        runs = {s: found[(model, s)] for s in settings if (model, s) in found}
        plot(model, runs, results_dir / f"{model}.png")
        plot_frontier(model, runs, results_dir / f"{model}-frontier.png")
    return table


def table_head(caption: str, first: str, columns: list[str]) -> list[str]:
    """A caption, then a Markdown table's header for a first column and `columns`."""
    return [caption, "", f"| {first} | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]


def grid_table(found: dict, models: list[str], settings: list[str]) -> str:
    """One row per model, one column per setting: lost / ASR / highest ASR (seeds), bold above 5% ASR."""
    lines = table_head(
        "Clean accuracy lost (points; negative: the student ends above the trojaned model) / ASR after (%) / highest "
        "ASR at any evaluation (%) (seeds), mean over the seeds; **bold**: mean ASR above 5%.",
        "model (clean acc., ASR)",
        settings,
    )
    for model in models:
        cells = []
        for setting in settings:
            runs = found.get((model, setting))
            if not runs:
                cells.append("–")
                continue
            lost = mean([100 * (r["before"]["clean_accuracy"] - r["after"]["clean_accuracy"]) for r in runs.values()])
            asr = mean([100 * r["after"]["attack_success_rate"] for r in runs.values()])
            peak = max(100 * max(p[2] for p in curve(r)) for r in runs.values() if curve(r))
            text = f"{lost:.2f} / {asr:.2f} / {peak:.2f} ({len(runs)})"
            cells.append(f"**{text}**" if asr > 5 else text)
        lines.append(f"| `{model}` ({teacher_line(found, model)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def der_table(found: dict, baselines_dir: Path, settings: list[str]) -> str:
    """DER (%) of MEDIC settings and of the baselines (`medic_hf.scripts.benchmark` cells in `baselines_dir`) on the
    models and seeds both have: the same trojaned models, clean data and seeds."""
    from medic_hf.metrics import defense_effectiveness_rating as der

    def rating(result: dict) -> float:
        b, a = result["before"], result["after"]
        return 100 * der(b["attack_success_rate"], a["attack_success_rate"], b["clean_accuracy"], a["clean_accuracy"])

    cells = {}  # (model, seed) -> method -> DER
    for path in sorted(baselines_dir.glob("cells/*/*/seed*.json")):
        cell = json.loads(path.read_text())
        cells.setdefault((cell["attack"], cell["seed"]), {})[cell["defense"]] = rating(cell)
    # The CPU benchmark ran the same defenses on the preset's models, same clean data and seeds: it fills the gaps.
    defenses = {d for c in cells.values() for d in c}
    for path in sorted(PRESET_BENCHMARK.glob("cells/*/*/seed*.json")):
        cell = json.loads(path.read_text())
        if cell["defense"] in defenses and (cell["attack"], cell["seed"]) in cells:
            cells[(cell["attack"], cell["seed"])].setdefault(cell["defense"], rating(cell))
    for (model, setting), runs in found.items():
        if setting in settings:
            for seed, result in runs.items():
                if (model, seed) in cells:
                    cells[(model, seed)][f"MEDIC {setting}"] = rating(result)
    methods = sorted({m for c in cells.values() for m in c}, key=lambda m: (not m.startswith("MEDIC"), m))
    complete = {key: c for key, c in cells.items() if all(m in c for m in methods)}
    lines = table_head(
        "DER (%, BackdoorBench: (max(0, ΔASR) − max(0, ΔACC) + 1) / 2) on the (model, seed) pairs every method ran "
        f"on ({len(complete)} of {len(cells)}); same models, clean data and seeds.",
        "model / seed",
        methods,
    )
    for (model, seed), c in sorted(complete.items()):
        lines.append(f"| {model} / {seed} | " + " | ".join(f"{c[m]:.2f}" for m in methods) + " |")
    if complete:
        lines.append(
            "| **mean** | " + " | ".join(f"**{mean([c[m] for c in complete.values()]):.2f}**" for m in methods) + " |"
        )
    return "\n".join(lines)


GAP_BUCKETS = [(-100, 0, "< 0 (above the teacher)"), (0, 1, "0–1"), (1, 2, "1–2"), (2, 3, "2–3"), (3, 5, "3–5"),
               (5, 10, "5–10"), (10, 100, "≥ 10")]  # fmt: skip


def gap_table(found: dict, models: list[str]) -> str:
    """Mean ASR of every evaluation from epoch 10 on, of every run of a model (SGD excluded: it diverged), grouped
    by how far the student's clean accuracy was below the trojaned model's: does the backdoor come back with the
    clone's fidelity?"""
    lines = table_head(
        "Mean ASR (%) by the gap between the student's clean accuracy and the trojaned model's (points), over every "
        "evaluation from epoch 10 on of every run of the model (number of evaluations in brackets).",
        "gap",
        models,
    )
    for low, high, name in GAP_BUCKETS:
        cells = []
        for model in models:
            asrs = [
                100 * asr
                for (m, setting), runs in found.items()
                if m == model and not setting.startswith("sgd")
                for result in runs.values()
                for epoch, accuracy, asr in curve(result)
                if epoch >= 10 and low <= 100 * (result["before"]["clean_accuracy"] - accuracy) < high
            ]
            cells.append(f"{mean(asrs):.1f} ({len(asrs)})" if asrs else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def setting_order(folder: str) -> tuple[int, str]:
    base = folder.split("-e")[0].split("-cf")[0]
    return (list(SETTINGS).index(base) if base in SETTINGS else len(SETTINGS), folder)


def teacher_line(found: dict, model: str) -> str:
    before = next(iter(next(runs for (m, _), runs in found.items() if m == model).values()))["before"]
    return f"{100 * before['clean_accuracy']:.2f}%, {100 * before['attack_success_rate']:.1f}% ASR"


def plot(model: str, runs_by_setting: dict[str, dict[int, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_asr, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    teacher = None
    for i, (setting, runs) in enumerate(runs_by_setting.items()):
        colour = colours[i % len(colours)]
        for j, (_seed, result) in enumerate(sorted(runs.items())):
            points = curve(result)
            teacher = 100 * result["before"]["clean_accuracy"]
            label = setting if j == 0 else None
            style = "o-" if j == 0 else "s--"
            ax_asr.plot([p[0] for p in points], [100 * p[2] for p in points], style, color=colour, label=label, ms=3)
            ax_acc.plot([p[0] for p in points], [100 * p[1] for p in points], style, color=colour, label=label, ms=3)
    ax_asr.axhline(10, color="grey", linestyle="--", linewidth=0.8)
    ax_asr.axhline(5, color="grey", linestyle=":", linewidth=0.8)
    ax_asr.set(xlabel="epoch", ylabel="attack success rate (%)", title=f"{model}: ASR during cloning")
    if teacher is not None:
        ax_acc.axhline(teacher, color="black", linestyle=":", linewidth=0.8, label="trojaned model")
        ax_acc.axhline(teacher - 2, color="grey", linestyle="--", linewidth=0.8, label="2 points lost")
    ax_acc.set(xlabel="epoch", ylabel="clean accuracy (%)", title="clean accuracy during cloning")
    ax_acc.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_frontier(model: str, runs_by_setting: dict[str, dict[int, dict]], path: Path) -> None:
    """ASR against the clean accuracy still missing to the trojaned model, at every evaluation of every run: does the
    backdoor come back with the clone's fidelity, whatever the setting?"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "osD^v<>pP*Xh"
    for i, (setting, runs) in enumerate(runs_by_setting.items()):
        gaps, asrs = [], []
        for result in runs.values():
            teacher = result["before"]["clean_accuracy"]
            for epoch, accuracy, asr in curve(result):
                if epoch >= 10:  # the first evaluations measure an untrained student, not a clone
                    gaps.append(100 * (teacher - accuracy))
                    asrs.append(100 * asr)
        ax.scatter(gaps, asrs, s=18, marker=markers[i % len(markers)], label=setting)
    ax.axhline(10, color="grey", linestyle="--", linewidth=0.8)
    ax.axvline(2, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlim(30, -1)  # a diverged run's points (more than 30 points below) are off the plot
    ax.set(
        xlabel="clean accuracy below the trojaned model (points)",
        ylabel="attack success rate (%)",
        title=f"{model}: every evaluation from epoch 10 on",
    )
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[], help="trojaned model folders (with attack.json)")
    parser.add_argument("--settings", nargs="+", default=["defaults"], choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=30, help="the budget; 60 is the no-rebound check")
    parser.add_argument("--clean_fraction", type=float, default=0.05)
    parser.add_argument("--eval_every", type=int, default=5, help="epochs between evaluations of both test sets")
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "cifar10"))
    parser.add_argument("--runs", default=str(ROOT / "runs" / "default_study"))
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "default_study"))
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time (one thread each)")
    parser.add_argument("--report_only", action="store_true")
    parser.add_argument(
        "--grid_settings", nargs="+", default=["defaults", "ema", "tau_to_10_ema"], help="the columns of grid.md"
    )
    args = parser.parse_args()
    if not args.report_only:
        run_all(args)
    report(args)


if __name__ == "__main__":
    main()
