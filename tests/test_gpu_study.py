"""benchmarks/gpu_study.py: the plan it builds, and its scheduler (priorities, dependencies, failures, deadline)."""

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_study.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_study"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def write(path: Path, text: str = "{}") -> list[str]:
    """A command that writes `path` (its folder made first)."""
    code = f"import pathlib; p = pathlib.Path({str(path)!r}); p.parent.mkdir(parents=True, exist_ok=True); "
    return [sys.executable, "-c", code + f"p.write_text({text!r})"]


def test_scheduler_runs_by_tier_waits_for_models_and_stops_at_the_deadline(tmp_path):
    gpu_study = load_script()
    Job = gpu_study.Job
    teacher, broken = tmp_path / "models" / "teacher", tmp_path / "models" / "broken"
    jobs = [
        Job("study/late", write(tmp_path / "late.json"), 2, tmp_path / "late.json", log=tmp_path / "l1.log"),
        Job("teacher/teacher", write(teacher / "metrics.json"), 0, teacher / "metrics.json", log=tmp_path / "t.log"),
        Job("teacher/broken", [sys.executable, "-c", "raise SystemExit(3)"], 0, broken / "metrics.json",
            log=tmp_path / "b.log"),
        Job("study/needs-teacher", write(tmp_path / "a.json"), 1, tmp_path / "a.json", [teacher], tmp_path / "a.log",
            copy_to=tmp_path / "results" / "a.json"),
        Job("study/needs-broken", write(tmp_path / "c.json"), 1, tmp_path / "c.json", [broken], tmp_path / "c.log"),
        Job("study/slow", [sys.executable, "-c", "import time; time.sleep(60)"], 3, tmp_path / "never.json",
            log=tmp_path / "s.log"),
        Job("study/done-before", write(tmp_path / "x.json"), 1, tmp_path / "results" / "old.json", log=tmp_path / "x"),
    ]  # fmt: skip
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "old.json").write_text("{}")
    gpu_study.schedule(jobs, SimpleNamespace(deadline_s=8, jobs=2))
    state = {job.name: job.state for job in jobs}
    assert state == {
        "study/late": "done",
        "teacher/teacher": "done",
        "teacher/broken": "failed",
        "study/needs-teacher": "done",
        "study/needs-broken": "blocked",
        "study/slow": "stopped",
        "study/done-before": "done before",
    }
    assert json.loads((tmp_path / "results" / "a.json").read_text()) == {}  # copied where the study reports from
    assert not (tmp_path / "x.json").exists()  # a finished run is not run again


def test_plan_covers_models_tiers_and_dependencies(tmp_path, capsys):
    gpu_study = load_script()
    argv = ["--dry_run", "--runs", str(tmp_path), "--models_dir", str(tmp_path / "models")]
    argv += ["--study_results", str(tmp_path / "study"), "--baseline_dir", str(tmp_path / "bench")]
    argv += ["--teachers", "none", "label_consistent-4corners-pr0.05", "--authors_attacks", "badnet"]
    argv += ["--plan", '[{"setting": "defaults", "epochs": 30, "clean_fraction": 0.05, "seeds": [0, 1]},'
             ' {"baselines": true}]', "--baseline_seeds", "0"]  # fmt: skip
    gpu_study.main(argv)
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[1] for line in lines[:-1]]
    assert names[:2] == ["teacher/none", "teacher/label_consistent-4corners-pr0.05"]
    # every committed preset model and the new one, at both seeds, then the authors' model; baselines last
    assert "study/label_consistent-4corners-pr0.05/defaults/seed1" in names
    assert "study/badnets/defaults/seed0" in names and "study/authors-badnet/defaults/seed1" in names
    assert names[-1].startswith("baselines/") and not any(n.startswith("study/clean") for n in names)
    label_consistent = next(line for line in lines if line.split()[1] == "teacher/label_consistent-4corners-pr0.05")
    assert "--surrogate" in label_consistent and "--save_strategy no" in label_consistent
