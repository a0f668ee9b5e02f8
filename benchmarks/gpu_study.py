"""The robust-default study (issue 16) on one lent GPU machine, in one fixed time budget.

A GPU machine is lent for minutes, not hours, and MEDIC's CPU-preset runs are small (a 1.6 M-parameter ResNet, 2,500
clean images): one process leaves most of the card idle. This script therefore runs the study as many processes
side by side (one CPU thread each, sharing the card through CUDA MPS when the machine has it), in order of
priority, and stops them at a deadline:

- tier 0: the grid's trojaned models that are missing (`--teachers`, made by `recipes/poison.py` with
  `recipes/poison_cifar10_small.yaml` and the attack table's variant flags, the poisoned training split kept on the
  GPU), into `--models_dir`;
- tiers 1+: `benchmarks/default_study.py` runs (MEDIC setting × model × seed, the backdoor evaluated every 5 epochs),
  on each model as soon as it exists, and the same on the MEDIC authors' models (`benchmarks/authors_models.py`);
- the last tier: the baselines of the benchmark (`medic_hf.scripts.benchmark`) on the preset's models.

A run whose results already exist is skipped; a run still going at the deadline is stopped and reported as such.
`status.json` lists every job (done, failed, stopped, never started) with its seconds. `--pack DIR` then writes
what finished as tar files of at most 15 MiB (results first, then models), to bring back from the machine:

    python benchmarks/gpu_study.py --dataset runs/gpu_carry/cifar10 --deadline_s 520 --jobs 15 --pack $OUT

`--dry_run` prints the plan (jobs and tiers) and starts nothing. Before the device call, here:

    python benchmarks/gpu_study.py --prepare_carry     # runs/gpu_carry: data, packages, the authors' files (27 MiB)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from medic_hf.scripts import benchmark

ROOT = Path(__file__).resolve().parents[1]

STUDY_RESULTS = ROOT / "benchmarks" / "results" / "default_study"
PRESET_MODELS = ROOT / "benchmarks" / "models" / "poison_cifar10_small"
AUTHORS = ["badnet", "cleanlabel", "sig", "adaptive2"]


def load_module(name: str):
    """A sibling benchmark script as a module (they are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Job:
    name: str
    cmd: list[str]
    tier: int
    done_file: Path
    needs: list[Path] = field(default_factory=list)  # model folders that must hold metrics.json first
    log: Path | None = None
    copy_to: Path | None = None  # where the finished result is copied
    state: str = "pending"
    seconds: float = 0.0
    returncode: int | None = None


def teacher_jobs(args) -> list[Job]:
    jobs = []
    for attack in args.teachers:
        out = benchmark.model_folder(args.models_dir, attack)
        flags = benchmark.poison_flags(attack, args.models_dir, args.poison_config, args.dataset, args.poison_args)
        cmd = [sys.executable, "-m", "medic_hf.scripts.poison", *flags, "--save_strategy", "no"]
        cmd += ["--disable_tqdm", "true", "--logging_steps", "200"]
        needs = [benchmark.model_folder(args.models_dir, "none")] if "label_consistent" in attack else []
        jobs.append(Job(f"teacher/{attack}", cmd, 0, out / "metrics.json", needs, out.parent / f"{out.name}.log"))
    return jobs


def model_folders(args) -> dict[str, Path]:
    """Every trojaned model of the grid: the committed preset models and those this run trains."""
    trojaned = [p for p in sorted(PRESET_MODELS.iterdir()) if (p / "attack.json").is_file()]  # not the clean one
    folders = {p.name: p for p in trojaned if (p / "model.safetensors").is_file()}
    for attack in args.teachers:
        if attack != "none":
            folders[attack] = benchmark.model_folder(args.models_dir, attack)
    return {name: folder for name, folder in folders.items() if not args.models or name in args.models}


def study_jobs(args) -> list[Job]:
    study = load_module("default_study")
    jobs = []
    models = model_folders(args)
    for tier, entry in enumerate(args.plan, start=1):
        if entry.get("baselines"):
            jobs += baseline_jobs(args, tier)
            continue
        setting, epochs, clean_fraction = entry["setting"], entry["epochs"], entry["clean_fraction"]
        for seed in entry["seeds"]:
            for folder in models.values():
                run_args = SimpleNamespace(
                    dataset=args.dataset, clean_fraction=clean_fraction, epochs=epochs, eval_every=5
                )
                run = study.run_name(str(folder), setting, seed, epochs, clean_fraction)
                out = args.runs / run
                cmd = study.command(str(folder), setting, seed, run_args, out)
                needs = [] if folder.parent == PRESET_MODELS else [folder]
                job = Job(f"study/{run}", cmd, tier, out / "results.json", needs, out / "run.log")
                job.copy_to = args.study_results / "runs" / run / "results.json"  # where the study reports from
                jobs.append(job)
            if entry.get("authors", True) and clean_fraction == 0.05:
                for attack in args.authors_attacks:
                    budget = "" if epochs == 30 else f"-e{epochs}"
                    done = STUDY_RESULTS / "runs" / f"authors-{attack}" / f"{setting}{budget}" / f"seed{seed}"
                    cmd = [sys.executable, str(ROOT / "benchmarks" / "authors_models.py"), "--mirror", args.authors]
                    cmd += ["--nad_mirror", args.nad, "--dataset_name", args.dataset, "--attacks", attack]
                    cmd += ["--settings", setting, "--seeds", str(seed), "--epochs", str(epochs)]
                    log = args.runs / "logs" / f"authors-{attack}-{setting}{budget}-seed{seed}.log"
                    jobs.append(Job(f"study/authors-{attack}/{setting}{budget}/seed{seed}", cmd, tier,
                                    done / "results.json", [], log))  # fmt: skip
    return jobs


def baseline_jobs(args, tier: int) -> list[Job]:
    """One benchmark process per (model, seed): its baselines one after the other, cells in --baseline_dir."""
    jobs = []
    for seed in args.baseline_seeds:
        for name, folder in model_folders(args).items():
            done = args.baseline_dir / "cells" / name / args.baselines[-1] / f"seed{seed}.json"
            cmd = [sys.executable, "-m", "medic_hf.scripts.benchmark", "--config", "recipes/benchmark_cpu.yaml"]
            cmd += ["--dataset_name", args.dataset, "--attacks", name, "--defenses", *args.baselines]
            cmd += ["--seeds", str(seed), "--models_dir", str(folder.parent), "--output_dir", str(args.baseline_dir)]
            cmd += ["--work_dir", str(args.runs / "benchmark_work" / f"{name}-seed{seed}")]
            cmd += shlex.split(args.baseline_args)
            needs = [] if folder.parent == PRESET_MODELS else [folder]
            log = args.runs / "logs" / f"baselines-{name}-seed{seed}.log"
            jobs.append(Job(f"baselines/{name}/seed{seed}", cmd, tier, done, needs, log))
    return jobs


def ready(job: Job) -> bool:
    return all((folder / "metrics.json").is_file() for folder in job.needs)


def failed_models(jobs: list[Job]) -> set[Path]:
    """The model folders whose training failed or was stopped: the jobs that need them can never start."""
    return {j.done_file.parent for j in jobs if j.name.startswith("teacher/") and j.state in ("failed", "stopped")}


def schedule(jobs: list[Job], args) -> None:
    start = time.monotonic()
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    for job in jobs:
        if job.done_file.is_file() or (job.copy_to and job.copy_to.is_file()):
            job.state = "done before"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="0")
    while time.monotonic() - start < args.deadline_s:
        for job in jobs:
            if job.name in running:
                process, started = running[job.name]
                if process.poll() is None:
                    continue
                del running[job.name]
                job.seconds, job.returncode = round(time.monotonic() - started, 1), process.returncode
                job.state = "done" if process.returncode == 0 and job.done_file.is_file() else "failed"
                if job.state == "done" and job.copy_to:
                    job.copy_to.parent.mkdir(parents=True, exist_ok=True)
                    job.copy_to.write_text(job.done_file.read_text())
                print(f"[{time.monotonic() - start:6.0f}s] {job.state} {job.name} ({job.seconds} s)", flush=True)
        failed = failed_models(jobs)
        for job in jobs:
            if job.state == "pending" and any(folder in failed for folder in job.needs):
                job.state = "blocked"
        waiting = sorted((j for j in jobs if j.state == "pending" and ready(j)), key=lambda j: j.tier)
        for job in waiting[: max(0, args.jobs - len(running))]:
            job.log.parent.mkdir(parents=True, exist_ok=True)
            with open(job.log, "a") as log:
                process = subprocess.Popen(job.cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)  # fmt: skip
            running[job.name] = (process, time.monotonic())
            job.state = "running"
            print(f"[{time.monotonic() - start:6.0f}s] start {job.name}", flush=True)
        if not running and not any(j.state == "pending" for j in jobs):
            break
        time.sleep(1)
    for name, (process, started) in running.items():  # the deadline: stop what is still going
        os.killpg(process.pid, signal.SIGKILL)
        job = next(j for j in jobs if j.name == name)
        job.state, job.seconds = "stopped", round(time.monotonic() - started, 1)
    print(f"[{time.monotonic() - start:6.0f}s] scheduler finished", flush=True)


def write_status(jobs: list[Job], args) -> Path:
    status = {
        "jobs": [
            {"name": j.name, "tier": j.tier, "state": j.state, "seconds": j.seconds, "returncode": j.returncode}
            for j in jobs
        ],
        "counts": {state: sum(j.state == state for j in jobs) for state in sorted({j.state for j in jobs})},
    }
    path = args.runs / "status.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(status, indent=2))
    print(json.dumps(status["counts"]))
    return path


def pack(jobs: list[Job], args) -> None:
    """Tar files of at most 15 MiB, 62 MiB together, paths relative to the repository: results, then models."""
    files = list(args.study_results.glob("runs/**/results.json"))
    files += [p for p in (args.baseline_dir / "cells").glob("**/*.json")] if args.baseline_dir.is_dir() else []
    files.append(args.runs / "status.json")
    failed_logs = [j.log for j in jobs if j.state in ("failed", "stopped") and j.log and j.log.is_file()]
    groups = [("results", files + failed_logs)]
    for attack in sorted(args.teachers, key=lambda a: a == "none"):  # trained models, the clean one last
        folder = Path(args.models_dir) / ("clean" if attack == "none" else attack)
        if (folder / "metrics.json").is_file():
            groups.append((attack, [p for p in folder.iterdir() if p.is_file()]))
    out = Path(args.pack)
    out.mkdir(parents=True, exist_ok=True)
    part, size, total, index = [], 0, 0, 0

    def flush():
        nonlocal part, size, index
        if part:
            with tarfile.open(out / f"part{index}.tar", "w") as tar:
                for path in part:
                    path = path.resolve()  # inside the repository: relative to it (absolute elsewhere, e.g. a test)
                    tar.add(path, arcname=str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path))
            index, part, size = index + 1, [], 0

    for name, group in groups:
        group_size = sum(p.stat().st_size for p in group)
        if name != "results" and (total + group_size > 62 * 2**20 or index >= 7):
            print(f"not packed (no room): {name}")
            continue
        if size + group_size > 15 * 2**20:
            flush()
        part += group
        size += group_size
        total += group_size
    flush()
    print(f"packed {index} tar files, {total / 2**20:.1f} MiB")


# Packages the lent machine's Python lacks (datasets and its two pins) or has older (transformers, timm), and the
# datasets that works with an older pyarrow; the versions this repository is tested with.
CARRIED_PACKAGES = ["transformers==5.24.0", "timm==1.0.31", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19"]
FALLBACK_PACKAGES = ["datasets==4.0.0", "dill==0.3.8", "multiprocess==0.70.16"]
WHEEL_PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                  "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]  # fmt: skip


def prepare_carry(args) -> None:
    """runs/gpu_carry: what benchmarks/gpu_study.sh needs on a bare GPU machine, within the device tool's 64 MiB.

    - cifar10/: the data set's parquet files rewritten with zstd (level 19): the same rows and bytes (checked), 17 MiB
      instead of 54 (the JPEG headers repeat in every row);
    - site.tar.xz / site_alt.tar.xz: the wheels of CARRIED_PACKAGES / FALLBACK_PACKAGES, unpacked, as one xz archive
      each (6 MiB instead of 17);
    - authors/ and nad/: the authors' four checkpoints without their optimizer state (read with weights_only=True,
      saved back with the other keys), and NAD's SIG mask.
    """
    import pyarrow.parquet as pq
    import torch

    carry = ROOT / "runs" / "gpu_carry"
    (carry / "cifar10").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        table = pq.read_table(Path(args.dataset) / f"{split}.parquet")
        target = carry / "cifar10" / f"{split}.parquet"
        pq.write_table(table, target, compression="zstd", compression_level=19)
        assert pq.read_table(target).equals(table)
    for name, packages in (("site", CARRIED_PACKAGES), ("site_alt", FALLBACK_PACKAGES)):
        wheels, unpacked = carry / f"{name}-wheels", carry / f"{name}-unpacked"
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        *WHEEL_PLATFORM, "-d", str(wheels), *packages], check=True)  # fmt: skip
        unpacked.mkdir(exist_ok=True)
        for wheel in wheels.glob("*.whl"):
            subprocess.run(["unzip", "-q", "-o", str(wheel), "-d", str(unpacked)], check=True)
        subprocess.run(["tar", "cJf", str(carry / f"{name}.tar.xz"), "-C", str(unpacked), "."], check=True)
        subprocess.run(["rm", "-rf", str(wheels), str(unpacked)], check=True)
    authors = load_module("authors_models")
    for path in authors.MODELS.values():
        target = carry / "authors" / path
        target.parent.mkdir(parents=True, exist_ok=True)
        raw = io.BytesIO(authors.git_file(Path(args.authors_mirror), path))
        checkpoint = torch.load(raw, weights_only=True, map_location="cpu")
        checkpoint.pop("optimizer", None)
        torch.save(checkpoint, target)
    mask = carry / "nad" / authors.SIG_MASK
    mask.parent.mkdir(parents=True, exist_ok=True)
    mask.write_bytes(authors.git_file(Path(args.nad_mirror), authors.SIG_MASK))
    size = sum(f.stat().st_size for f in carry.rglob("*") if f.is_file())
    print(f"{carry}: {size / 2**20:.1f} MiB")


def default_plan() -> list[dict]:
    """Tiers of the study, most important first: the defaults and the candidates on two seeds, the no-rebound
    budget, the baselines (`{"baselines": true}`), then more candidates."""
    return [
        dict(setting="defaults", epochs=30, clean_fraction=0.05, seeds=[0, 1]),
        dict(setting="ema", epochs=30, clean_fraction=0.05, seeds=[0, 1]),
        dict(setting="tau_to_10_ema", epochs=30, clean_fraction=0.05, seeds=[0, 1]),
        dict(setting="defaults", epochs=60, clean_fraction=0.05, seeds=[0]),
        dict(baselines=True),
        dict(setting="defaults", epochs=30, clean_fraction=0.1, seeds=[0], authors=False),
        dict(setting="tau_to_10", epochs=30, clean_fraction=0.05, seeds=[0, 1]),
        dict(setting="top25", epochs=30, clean_fraction=0.05, seeds=[0, 1]),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "cifar10"))
    parser.add_argument("--study_results", type=Path, default=STUDY_RESULTS, help="where the study's results go")
    parser.add_argument("--authors", default="runs/gpu_carry/authors", help="qiulingxu/MEDIC files (or git dir)")
    parser.add_argument("--nad", default="runs/gpu_carry/nad", help="bboylyg/NAD files (or git dir), for SIG")
    parser.add_argument("--models_dir", default="runs/gpu/models", help="where the trained models go")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "gpu")
    parser.add_argument(
        "--teachers",
        nargs="*",
        default=["none", "blended", "wanet", "label_consistent-4corners-pr0.05", "badnets-e80", "blended-e80",
                 "sig-pr0.05-e80", "convnext-badnets", "convnext-blended"],
    )  # fmt: skip
    parser.add_argument("--poison_config", default="recipes/poison_cifar10_small.yaml")
    parser.add_argument("--poison_args", default="", help="extra recipes/poison.py flags (a smoke test's short runs)")
    parser.add_argument("--baselines", nargs="*", default=["ft", "nad", "anp", "fp"])
    parser.add_argument("--baseline_seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--baseline_args", default="", help="extra medic_hf.scripts.benchmark flags")
    parser.add_argument("--models", nargs="*", default=[], help="only these models of the grid (default: all)")
    parser.add_argument("--authors_attacks", nargs="*", default=AUTHORS, choices=AUTHORS)
    parser.add_argument("--baseline_dir", type=Path, default=ROOT / "runs" / "gpu" / "benchmark")
    parser.add_argument("--deadline_s", type=float, default=520)
    parser.add_argument("--jobs", type=int, default=15)
    parser.add_argument("--pack", default=None, help="write the finished results and models as tar files here")
    parser.add_argument("--plan", type=json.loads, default=default_plan(), help="JSON list of tiers (see the code)")
    parser.add_argument("--dry_run", action="store_true")
    parser.add_argument(
        "--prepare_carry", action="store_true", help="only build runs/gpu_carry (here, before the device call)"
    )
    parser.add_argument("--authors_mirror", default="/work/.mirror/qiulingxu+MEDIC/repo", help="for --prepare_carry")
    parser.add_argument("--nad_mirror", default="/work/.mirror/bboylyg+NAD/repo", help="for --prepare_carry")
    args = parser.parse_args(argv)
    if not (PRESET_MODELS / "composite" / "model.safetensors").is_file() and "composite" not in args.teachers:
        args.teachers.append("composite")  # the preset's composite model was not finished on CPU: train it here
    args.runs = args.runs.resolve()
    args.models_dir = str(Path(args.models_dir).resolve())
    args.baseline_dir = args.baseline_dir.resolve()
    args.study_results = args.study_results.resolve()

    if args.prepare_carry:
        prepare_carry(args)
        return
    jobs = teacher_jobs(args) + study_jobs(args)
    if args.dry_run:
        for job in jobs:
            done = job.done_file.is_file() or (job.copy_to and job.copy_to.is_file())
            print(job.tier, job.name, "(done)" if done else "", " ".join(job.cmd))
        print(f"{len(jobs)} jobs")
        return
    from medic_hf.data import load_image_dataset

    load_image_dataset(args.dataset)  # fills the data set cache once, before many processes read it
    schedule(jobs, args)
    write_status(jobs, args)
    if args.pack:
        pack(jobs, args)


if __name__ == "__main__":
    main()
