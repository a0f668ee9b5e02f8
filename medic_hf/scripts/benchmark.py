r"""MEDIC against the baseline defenses on a grid of attacks x defenses x seeds, in the paper's Table 1 layout.

For each attack, a trojaned model is trained with recipes/poison.py (or reused from `--models_dir`, where
benchmarks/attack_table.py puts the same models); each defense then repairs it with the same class-balanced clean
subset of the training split (5% by default, drawn with the seed), and clean accuracy, attack success rate (ASR),
robust accuracy and DER are measured on the test split. Every finished cell is a small JSON file under
`<output_dir>/cells/`, so a killed run continues where it stopped: run the same command again.

    # the CPU preset: a small timm resnet18, every attack and defense, one seed (run it again to continue)
    python recipes/benchmark.py --config recipes/benchmark_cpu.yaml

    # the same on 2 cores, as two processes on halves of the grid (cells are separate files; then --report_only)
    OMP_NUM_THREADS=1 python recipes/benchmark.py --config recipes/benchmark_cpu.yaml \
        --attacks badnets blended sig-pr0.05 &
    OMP_NUM_THREADS=1 python recipes/benchmark.py --config recipes/benchmark_cpu.yaml \
        --attacks wanet label_consistent-4corners-pr0.05 composite

    # one defense with other settings, in its own output folder (an ablation)
    python recipes/benchmark.py --config recipes/benchmark_cpu.yaml --defenses medic \
        --defense_kwargs '{"medic": {"temperature": 10}}' --output_dir benchmarks/results/medic_ablation/tau10

    # part of the grid, e.g. two attacks and two defenses
    python recipes/benchmark.py --config recipes/benchmark_cpu.yaml --attacks badnets sig --defenses medic ft

    # the paper's budget (resnet18, 60 epochs of MEDIC, 3 seeds) on a GPU
    python recipes/benchmark.py --config recipes/benchmark_paper.yaml

    # only rebuild the tables and the plot from the finished cells
    python recipes/benchmark.py --config recipes/benchmark_cpu.yaml --report_only true

Writes `<output_dir>/results.json`, `results.md` (ASR and clean accuracy, mean ± std over seeds, DER, the average
row) and `results.png` (ASR against clean accuracy, one colour per defense).
"""

from __future__ import annotations

import json
import re
import shlex
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from medic_hf.attacks import load_attack
from medic_hf.cli import make_parser as _make_parser
from medic_hf.cli import parse_args
from medic_hf.data import class_balanced_subset, find_columns, load_image_dataset, prepare_for_model
from medic_hf.defenses import DEFENSES
from medic_hf.metrics import (
    ATTACK_SUCCESS_RATE,
    CLEAN_ACCURACY,
    ROBUST_ACCURACY,
    attack_success_rate,
    clean_accuracy,
    defense_effectiveness_rating,
    robust_accuracy,
)
from medic_hf.modeling import forward_logits, load_model
from medic_hf.scripts import poison  # the script that trains the trojaned models

ALL_ATTACKS = ["badnets", "blended", "sig", "wanet", "label_consistent", "composite"]
# Models that are an attack with other settings (rows of the attack table, usable as benchmark attacks):
# name -> (attack, extra recipes/poison.py flags), from attack_variants.yaml, which says why each row exists.
ATTACK_VARIANTS = {
    name: (row["attack"], row["flags"])
    for name, row in yaml.safe_load((Path(__file__).parent / "attack_variants.yaml").read_text()).items()
}
# The benchmark's attacks: the clean variants are references of the attack table, not attacks.
BENCHMARK_ATTACKS = ALL_ATTACKS + [name for name, (attack, _) in ATTACK_VARIANTS.items() if attack != "none"]
ALL_DEFENSES = ["ft", "fp", "nad", "anp", "mcr", "scratch", "kd", "clone", "medic"]


@dataclass
class BenchmarkArguments:
    dataset_name: str = field(
        default="../shared/data/cifar10", metadata={"help": "A Hub data set id or a local parquet / image folder."}
    )
    attacks: list[str] = field(
        default_factory=lambda: list(ALL_ATTACKS),
        metadata={"help": f"Attacks to run, of {BENCHMARK_ATTACKS} (the attacks, then their variants)."},
    )
    defenses: list[str] = field(
        default_factory=lambda: list(ALL_DEFENSES), metadata={"help": f"Defenses to run, of {ALL_DEFENSES}."}
    )
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Seeds (clean subset and defense)."})
    poison_config: str = field(
        default="recipes/poison_cifar10_small.yaml",
        metadata={"help": "recipes/poison.py config that makes the trojaned models (architecture, epochs)."},
    )
    poison_args: str = field(
        default="", metadata={"help": "Extra recipes/poison.py flags, e.g. '--max_train_samples 500'."}
    )
    models_dir: str = field(
        default="runs/attacks",
        metadata={
            "help": "Cache of trojaned models, one folder per attack (+ 'clean', the label-consistent surrogate)."
        },
    )
    output_dir: str = field(default="benchmarks/results/benchmark_cpu", metadata={"help": "Cells, tables, plot."})
    work_dir: str = field(
        default="runs/benchmark", metadata={"help": "Scratch space of the Trainer-based defenses (checkpoints)."}
    )
    clean_fraction: float = field(default=0.05, metadata={"help": "Clean data: this fraction of the train split."})
    defense_kwargs: str = field(
        default="{}",
        metadata={"help": 'JSON: config fields per defense, e.g. \'{"medic": {"num_train_epochs": 30}}\'.'},
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N test rows only."})
    eval_batch_size: int = field(default=256, metadata={"help": "Evaluation batch size."})
    report_only: bool = field(
        default=False, metadata={"help": "Only rebuild the tables and plot from finished cells."}
    )


# ---------------------------------------------------------------------------------------------------------------------
# Trojaned models (cached on disk)
# ---------------------------------------------------------------------------------------------------------------------


def model_folder(models_dir: str | Path, attack: str) -> Path:
    """The model trojaned by ``attack`` (``"none"``: the clean model, also the label-consistent surrogate)."""
    return Path(models_dir) / ("clean" if attack == "none" else attack)


def base_attack(attack: str) -> str:
    """The attack a model name stands for: itself, or the attack of a variant row ("sig-pr0.05" -> "sig")."""
    return ATTACK_VARIANTS.get(attack, (attack,))[0]


def clean_reference(attack: str) -> str:
    """The clean model trained the same way as ``attack``'s: "clean-e80" for "wanet-e80", else "none" (20 epochs)."""
    schedule = re.search(r"-e\d+$", attack)
    return "clean" + schedule.group() if schedule else "none"


def poison_flags(
    attack: str, models_dir: str | Path, poison_config: str, dataset_name: str, poison_args: str = ""
) -> list[str]:
    """The recipes/poison.py flags that make the model of ``attack`` (an attack, a variant or "none").

    ``poison_args`` (extra flags for every model) come before a variant's own flags, so the variant's win.
    """
    name, extra = ATTACK_VARIANTS.get(attack, (attack, []))
    flags = ["--config", poison_config, "--dataset_name", dataset_name, "--attack", name]
    flags += [*shlex.split(poison_args), *extra, "--output_dir", str(model_folder(models_dir, attack))]
    if name == "label_consistent":
        flags += ["--surrogate", str(model_folder(models_dir, "none"))]
    return flags


def trojaned_model(args: BenchmarkArguments, attack: str) -> Path:
    """The folder of the model trojaned by ``attack``, trained by recipes/poison.py unless it is there already."""
    folder = model_folder(args.models_dir, attack)
    if (folder / "metrics.json").exists():
        return folder
    if base_attack(attack) == "label_consistent":
        trojaned_model(args, "none")  # the surrogate its PGD runs against
    flags = poison_flags(attack, args.models_dir, args.poison_config, args.dataset_name, args.poison_args)
    print(f"[benchmark] training the {attack} model: recipes/poison.py {shlex.join(flags)}", flush=True)
    poison.main(flags)
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(model: torch.nn.Module, ds, batch_size: int) -> np.ndarray:
    loader = torch.utils.data.DataLoader(prepare_for_model(ds, model, train=False), batch_size=batch_size)
    device = next(model.parameters()).device
    model.eval()
    preds = [forward_logits(model, batch["pixel_values"].to(device)).argmax(-1).cpu() for batch in loader]
    return torch.cat(preds).numpy()


def evaluate(model: torch.nn.Module, test, backdoor, target_class: int, batch_size: int) -> dict:
    _, label_column = find_columns(test)
    backdoor_preds = predict(model, backdoor, batch_size)
    true_labels = backdoor["true_label"]
    return {
        CLEAN_ACCURACY: clean_accuracy(predict(model, test, batch_size), test[label_column]),
        ATTACK_SUCCESS_RATE: attack_success_rate(backdoor_preds, true_labels, target_class),
        ROBUST_ACCURACY: robust_accuracy(backdoor_preds, true_labels, target_class),
    }


# ---------------------------------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------------------------------


def defense_config(name: str, seed: int, output_dir: Path, kwargs: dict):
    """The defense's config dataclass with the user's fields, the cell's seed and (for Trainer-based ones) a folder."""
    config_cls = DEFENSES[name][1]
    names = {f.name for f in fields(config_cls)}
    values = dict(kwargs.get(name, {}))
    unknown = sorted(set(values) - names)
    if unknown:
        raise SystemExit(f"--defense_kwargs: {name} has no fields {unknown}; its fields are {sorted(names)}.")
    if "seed" in names:
        values.setdefault("seed", seed)
    if "output_dir" in names:
        values.setdefault("output_dir", str(output_dir))
    return config_cls(**values)


def run_cell(args, attack, defense, seed, model_dir, data, before, kwargs) -> dict:
    cell_file = Path(args.output_dir) / "cells" / attack / defense / f"seed{seed}.json"
    if cell_file.exists():
        return json.loads(cell_file.read_text())
    trojaned = load_model(model_dir)
    clean = class_balanced_subset(data["train"], fraction=args.clean_fraction, seed=seed)
    config = defense_config(defense, seed, Path(args.work_dir) / attack / defense / f"seed{seed}", kwargs)
    torch.manual_seed(seed)
    start = time.perf_counter()
    repaired = DEFENSES[defense][0](trojaned, clean, config)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    after = evaluate(repaired, data["test"], data["backdoor"], data["target_class"], args.eval_batch_size)
    eval_seconds = time.perf_counter() - start
    cell = {
        "attack": attack,
        "defense": defense,
        "seed": seed,
        "clean_samples": len(clean),
        "before": before,
        "after": after,
        "der": defense_effectiveness_rating(
            before[ATTACK_SUCCESS_RATE],
            after[ATTACK_SUCCESS_RATE],
            before[CLEAN_ACCURACY],
            after[CLEAN_ACCURACY],
        ),
        "seconds": round(seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "config": json.loads(
            json.dumps(config.to_dict() if hasattr(config, "to_dict") else asdict(config), default=str)
        ),
        "report": getattr(repaired, "defense_report", None),
    }
    cell_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cell_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(cell, indent=2, default=str))
    tmp.replace(cell_file)  # written whole or not at all, so a kill never leaves a half cell
    return cell


def attack_data(args: BenchmarkArguments, attack: str, model_dir: Path, dataset) -> dict:
    test = dataset["test"]
    if args.max_eval_samples:
        test = test.select(range(min(args.max_eval_samples, len(test))))
    threat = load_attack(model_dir)
    return {
        "train": dataset["train"],
        "test": test,
        "backdoor": threat.backdoor_test_view(test),
        "target_class": threat.target_class,
    }


def before_metrics(args, attack, model_dir, data) -> dict:
    cached = Path(args.output_dir) / "cells" / attack / "before.json"
    if cached.exists():
        return json.loads(cached.read_text())
    metrics = evaluate(
        load_model(model_dir), data["test"], data["backdoor"], data["target_class"], args.eval_batch_size
    )
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(metrics, indent=2))
    return metrics


def run_grid(args: BenchmarkArguments) -> None:
    kwargs = json.loads(args.defense_kwargs or "{}")
    unknown = sorted(set(args.defenses) - set(DEFENSES)) + sorted(set(kwargs) - set(DEFENSES))
    if unknown:
        raise SystemExit(f"Unknown defenses {unknown}; choose from {sorted(DEFENSES)}.")
    unknown = sorted(set(args.attacks) - set(BENCHMARK_ATTACKS))
    if unknown:
        raise SystemExit(f"Unknown attacks {unknown}; choose from {BENCHMARK_ATTACKS}.")
    for defense in args.defenses:  # bad --defense_kwargs fail now, not after the first trojaned model is trained
        defense_config(defense, 0, Path(args.work_dir), kwargs)
    dataset = load_image_dataset(args.dataset_name)
    cells = [(a, d, s) for a in args.attacks for d in args.defenses for s in args.seeds]
    progress = tqdm(total=len(cells), desc="benchmark cells")
    for attack in args.attacks:
        model_dir = trojaned_model(args, attack)
        data = attack_data(args, attack, model_dir, dataset)
        before = before_metrics(args, attack, model_dir, data)
        for defense in args.defenses:
            for seed in args.seeds:
                progress.set_postfix_str(f"{attack} / {defense} / seed {seed}")
                run_cell(args, attack, defense, seed, model_dir, data, before, kwargs)
                progress.update()
    progress.close()


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def collect(args: BenchmarkArguments) -> list[dict]:
    cells = []
    for attack in args.attacks:
        for defense in args.defenses:
            for seed in args.seeds:
                path = Path(args.output_dir) / "cells" / attack / defense / f"seed{seed}.json"
                if path.exists():
                    cells.append(json.loads(path.read_text()))
    return cells


def mean_std(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "–"
    values = np.asarray(values) * scale
    return f"{values.mean():.2f}" if len(values) == 1 else f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def summarise(cells: list[dict], attacks: list[str], defenses: list[str]) -> dict:
    """Per (attack, defense): the lists of ASR, ACC and DER over seeds; per attack: the trojaned model's numbers."""
    summary = {"before": {}, "cells": {}}
    for cell in cells:
        summary["before"][cell["attack"]] = cell["before"]
        entry = summary["cells"].setdefault(f"{cell['attack']}/{cell['defense']}", {"asr": [], "acc": [], "der": []})
        entry["asr"].append(cell["after"][ATTACK_SUCCESS_RATE])
        entry["acc"].append(cell["after"][CLEAN_ACCURACY])
        entry["der"].append(cell["der"])
    return summary


def markdown(summary: dict, attacks: list[str], defenses: list[str]) -> str:
    before, table = summary["before"], summary["cells"]
    attacks = [a for a in attacks if a in before]
    head = "| attack | no defense ASR | no defense ACC | " + " | ".join(f"{d} ASR | {d} ACC" for d in defenses) + " |"
    lines = ["## ASR and clean accuracy (%), mean ± std over seeds", "", head]
    lines.append("|---" * (3 + 2 * len(defenses)) + "|")
    for attack in attacks:
        row = [attack, mean_std([before[attack][ATTACK_SUCCESS_RATE]]), mean_std([before[attack][CLEAN_ACCURACY]])]
        for d in defenses:
            entry = table.get(f"{attack}/{d}", {"asr": [], "acc": []})
            row += [mean_std(entry["asr"]), mean_std(entry["acc"])]
        lines.append("| " + " | ".join(row) + " |")
    # Average row: mean ASR after, and the mean drop of clean accuracy (before - after), over the attacks.
    row = ["**average** (ASR; ACC drop)", f"{100 * np.mean([before[a][ATTACK_SUCCESS_RATE] for a in attacks]):.2f}"]
    row.append("0.00")
    for d in defenses:
        done = [a for a in attacks if f"{a}/{d}" in table]
        asr = [np.mean(table[f"{a}/{d}"]["asr"]) for a in done]
        drop = [before[a][CLEAN_ACCURACY] - np.mean(table[f"{a}/{d}"]["acc"]) for a in done]
        row += [f"{100 * np.mean(asr):.2f}" if asr else "–", f"{100 * np.mean(drop):.2f}" if drop else "–"]
    lines += ["| " + " | ".join(row) + " |", "", "## DER (%), mean over seeds", ""]
    lines.append("| attack | " + " | ".join(defenses) + " |")
    lines.append("|---" * (1 + len(defenses)) + "|")
    for attack in attacks:
        ders = [mean_std(table.get(f"{attack}/{d}", {"der": []})["der"]) for d in defenses]
        lines.append(f"| {attack} | " + " | ".join(ders) + " |")
    means = []
    for d in defenses:
        ders = [np.mean(table[f"{a}/{d}"]["der"]) for a in attacks if f"{a}/{d}" in table]
        means.append(f"**{100 * np.mean(ders):.2f}**" if ders else "–")
    lines.append("| **mean** | " + " | ".join(means) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, defenses: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    markers = "osD^vP*X"
    colors = [f"C{k}" for k in range(10) if k != 7]  # C7 is grey, the colour of the attack legend's markers
    attacks = sorted({key.split("/")[0] for key in summary["cells"]})
    for i, d in enumerate(defenses):
        labelled = False
        for j, a in enumerate(attacks):
            entry = summary["cells"].get(f"{a}/{d}")
            if entry:
                ax.scatter(
                    100 * np.mean(entry["acc"]),
                    100 * np.mean(entry["asr"]),
                    color=colors[i % len(colors)],
                    marker=markers[j % len(markers)],
                    label=None if labelled else d,
                )
                labelled = True
    for j, a in enumerate(attacks):
        ax.scatter([], [], facecolors="none", edgecolors="grey", marker=markers[j % len(markers)], label=a)
    ax.set_xlabel("clean accuracy after the defense (%)")
    ax.set_ylabel("attack success rate after the defense (%)")
    ax.axhline(10, color="grey", linewidth=0.5, linestyle="--")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Defenses: ASR against clean accuracy (lower right is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args: BenchmarkArguments) -> dict:
    cells = collect(args)
    summary = summarise(cells, args.attacks, args.defenses)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(summary, args.attacks, args.defenses)
    (out / "results.md").write_text(table)
    results = {"arguments": asdict(args), "summary": summary, "cells": cells}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    if summary["cells"]:
        plot(summary, args.defenses, out / "results.png")
    print(table)
    return results


def make_parser():
    """The command line: BenchmarkArguments fields, and `--config file.yaml`."""
    return _make_parser((BenchmarkArguments,), description=__doc__)


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args(make_parser(), argv)
    if not args.report_only:
        run_grid(args)
    return report(args)


if __name__ == "__main__":
    main()
