"""recipes/benchmark.py end to end on a tiny grid: two attacks x two defenses, then a resume after a crash."""

import json
from pathlib import Path

import pytest

from medic_hf.scripts import benchmark
from tests.conftest import benchmark_script

ROOT = Path(__file__).resolve().parents[1]

FIXTURE = str(ROOT / "tests" / "fixtures" / "cifar_tiny")
POISON_ARGS = (
    "--num_train_epochs 1 --per_device_train_batch_size 50 --disable_tqdm true "
    """--model_kwargs '{"channels": [8, 8, 8, 8]}'"""
)
DEFENSE_KWARGS = {
    "ft": {"num_train_epochs": 1, "per_device_train_batch_size": 25, "disable_tqdm": True},
    "medic": {"num_train_epochs": 1, "per_device_train_batch_size": 25, "save_strategy": "no", "disable_tqdm": True},
}


def _args(tmp_path):
    return [
        "--dataset_name", FIXTURE,
        "--attacks", "badnets", "blended",
        "--defenses", "ft", "medic",
        "--seeds", "0",
        "--clean_fraction", "0.5",
        "--poison_args", POISON_ARGS,
        "--defense_kwargs", json.dumps(DEFENSE_KWARGS),
        "--models_dir", str(tmp_path / "models"),
        "--work_dir", str(tmp_path / "work"),
        "--output_dir", str(tmp_path / "results"),
    ]  # fmt: skip


def test_benchmark_tiny_grid_resumes_after_a_crash(tmp_path, monkeypatch):
    medic, medic_config = benchmark.DEFENSES["medic"]
    calls = []

    def crash_on_blended(model, clean, config):
        calls.append(1)
        if len(calls) == 2:  # the second MEDIC cell (blended) dies, as a killed run would
            raise KeyboardInterrupt
        return medic(model, clean, config)

    monkeypatch.setitem(benchmark.DEFENSES, "medic", (crash_on_blended, medic_config))
    with pytest.raises(KeyboardInterrupt):
        benchmark.main(_args(tmp_path))
    cells = tmp_path / "results" / "cells"
    done = sorted(str(p.relative_to(cells)) for p in cells.rglob("seed0.json"))
    assert done == ["badnets/ft/seed0.json", "badnets/medic/seed0.json", "blended/ft/seed0.json"]
    stamps = {p: (cells / p).stat().st_mtime_ns for p in done}
    model_stamp = (tmp_path / "models" / "badnets" / "model.safetensors").stat().st_mtime_ns

    monkeypatch.setitem(benchmark.DEFENSES, "medic", (medic, medic_config))
    results = benchmark.main(_args(tmp_path))
    assert len(results["cells"]) == 4
    # Finished cells and cached trojaned models are reused, not recomputed.
    assert all((cells / p).stat().st_mtime_ns == stamp for p, stamp in stamps.items())
    assert (tmp_path / "models" / "badnets" / "model.safetensors").stat().st_mtime_ns == model_stamp
    for cell in results["cells"]:
        assert set(cell["after"]) == {"clean_accuracy", "attack_success_rate", "robust_accuracy"}
        assert 0.0 <= cell["der"] <= 1.0
        before, after = cell["before"], cell["after"]
        expected = (
            max(0, before["attack_success_rate"] - after["attack_success_rate"])
            - max(0, before["clean_accuracy"] - after["clean_accuracy"])
            + 1
        ) / 2
        assert cell["der"] == pytest.approx(expected)
    table = (tmp_path / "results" / "results.md").read_text()
    assert "| badnets |" in table and "medic ASR" in table and "**mean**" in table
    assert (tmp_path / "results" / "results.png").stat().st_size > 0


def test_benchmark_rejects_unknown_defense_fields(tmp_path):
    args = _args(tmp_path)
    args[args.index("--defense_kwargs") + 1] = json.dumps({"ft": {"epochz": 1}})
    with pytest.raises(SystemExit, match="epochz"):
        benchmark.main(args + ["--attacks", "badnets", "--defenses", "ft"])


def test_benchmark_rejects_unknown_attacks(tmp_path):
    with pytest.raises(SystemExit, match="badnet.*choose from"):
        benchmark.main(_args(tmp_path) + ["--attacks", "badnet"])


def test_attack_variants_make_their_own_poison_command():
    flags = benchmark.poison_flags("label_consistent-4corners-pr0.05", "models", "poison.yaml", "data")
    assert flags == [
        "--config", "poison.yaml", "--dataset_name", "data", "--attack", "label_consistent",
        "--attack_kwargs", '{"corners": "all"}', "--poison_rate", "0.05",
        "--output_dir", "models/label_consistent-4corners-pr0.05", "--surrogate", "models/clean",
    ]  # fmt: skip
    badnets = benchmark.poison_flags("badnets", "models", "poison.yaml", "data")
    assert badnets[-2:] == ["--output_dir", "models/badnets"]
    # flags for every model (the paper preset clears its config's BadNets pattern) never undo a variant's own
    flags = benchmark.poison_flags("label_consistent-4corners", "m", "p.yaml", "d", "--attack_kwargs '{}'")
    assert flags.index('{"corners": "all"}') > flags.index("{}")


def test_medic_ablation_summary_applies_the_targets_to_every_attack(tmp_path):
    medic_ablation = benchmark_script("medic_ablation")

    def cell(setting, attack, acc_after, asr_after, epochs):
        path = tmp_path / setting / "cells" / attack / "medic" / "seed0.json"
        path.parent.mkdir(parents=True)
        before = {"clean_accuracy": 0.78, "attack_success_rate": 0.99}
        after = {"clean_accuracy": acc_after, "attack_success_rate": asr_after}
        config = {"num_train_epochs": epochs, "temperature": 5.0}
        path.write_text(json.dumps({"attack": attack, "before": before, "after": after, "config": config}))

    cell("short", "badnets", 0.76, 0.05, 30)  # 2 points lost, 5% ASR
    cell("short", "sig", 0.7525, 0.10, 30)  # 2.75 points lost, 10% ASR: both targets met at the boundary
    cell("long", "badnets", 0.77, 0.40, 60)  # the backdoor is back
    cell("long", "sig", 0.74, 0.02, 60)  # 4 points lost
    summary = medic_ablation.main(["--root", str(tmp_path)])
    assert summary["short"]["meets_targets"] and not summary["long"]["meets_targets"]
    assert summary["long"]["mean_accuracy_drop"] == pytest.approx((0.01 + 0.04) / 2)
    assert summary["long"]["max_asr_after"] == 0.40
    table = (tmp_path / "summary.md").read_text()
    assert "| badnets | 1.00 / 40.00 | 2.00 / 5.00 |" in table and "| epochs, τ | 60, 5 | 30, 5 |" in table


def test_attack_table_compares_each_row_with_the_clean_model_trained_as_long(tmp_path):
    attack_table = benchmark_script("attack_table")

    def model(name, acc, asr=None):
        (tmp_path / "runs" / name).mkdir(parents=True)
        metrics = {"clean_accuracy": acc} | ({} if asr is None else {"attack_success_rate": asr})
        (tmp_path / "runs" / name / "metrics.json").write_text(json.dumps(metrics))

    model("clean", 0.78)
    model("wanet", 0.76, 0.95)  # 2 points below the 20-epoch clean model: meets
    model("clean-e80", 0.83)
    model("wanet-e80", 0.79, 0.95)  # 4 points below the 80-epoch clean model, though above the 20-epoch one
    args = ["--table_only", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    rows = attack_table.main(args + ["--attacks", "wanet-e80"])  # the table keeps every finished row
    assert list(rows) == ["none", "wanet", "clean-e80", "wanet-e80"]
    assert rows["wanet"]["meets_target"] and not rows["wanet-e80"]["meets_target"]
    assert "meets_target" not in rows["clean-e80"]
    table = (tmp_path / "results" / "poison_cifar10_small" / "attack_table.md").read_text()
    assert "| wanet-e80 | 79.00% | -4.00 | 95.00% | ≥ 90% | **no** |" in table
    assert "| clean-e80 (no attack) | 83.00% |  |  |  |  |" in table
    assert "--num_train_epochs 80 --output_dir" in rows["clean-e80"]["command"]
    assert benchmark.clean_reference("wanet-e80") == "clean-e80" and benchmark.clean_reference("sig-pr0.05") == "none"
    assert benchmark.clean_reference("wanet-s0.75-e80") == "clean-e80"  # a variant on the longer schedule


def test_benchmark_rejects_a_clean_model_as_an_attack(tmp_path):
    with pytest.raises(SystemExit, match="clean-e80.*choose from"):
        benchmark.main(_args(tmp_path) + ["--attacks", "clean-e80"])


def test_authors_wrn_has_their_state_dict_layout_and_their_badnet_trigger():
    """benchmarks/authors_models.py loads the MEDIC authors' WRN-16-1 checkpoints (82 entries, their names)."""
    import numpy as np
    from PIL import Image

    authors = benchmark_script("authors_models")
    state = authors.AuthorsWRN().state_dict()
    assert len(state) == 82
    assert tuple(state["block2.layer.0.convShortcut.weight"].shape) == (32, 16, 1, 1)
    assert tuple(state["block3.layer.1.conv2.weight"].shape) == (64, 64, 3, 3) and tuple(state["fc.weight"].shape) == (
        10,
        64,
    )
    assert "block1.layer.0.convShortcut.weight" not in state  # 16 -> 16 channels: identity shortcut
    stamped = np.array(authors.stamp_badnet(Image.new("RGB", (32, 32), (7, 7, 7))))
    assert stamped[-3:, -3:, 0].tolist() == [[255, 0, 0], [0, 255, 0], [255, 0, 255]]
    assert (stamped[-3:, -3:, 0] == stamped[-3:, -3:, 2]).all() and (stamped[:29] == 7).all()


def test_authors_sig_and_adaptive_triggers_follow_their_code():
    """SIG truncates the float blend to uint8 as their astype('uint8'); adaptive 2 pastes sigmoid(trigger) by mask."""
    import numpy as np
    import torch
    from PIL import Image

    authors = benchmark_script("authors_models")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[0, 0], mask[0, 1] = 255, 14
    stamped = np.array(authors.sig_stamper(mask)(Image.new("RGB", (32, 32), (101, 101, 101))))
    # 0.8 · 101 = 80.8 -> 80; + 0.2 · 255 = 131.8 -> 131; + 0.2 · 14 = 83.6 -> 83
    assert stamped[1, 1].tolist() == [80] * 3 and stamped[0, 0].tolist() == [131] * 3
    assert stamped[0, 1].tolist() == [83] * 3
    pattern_mask = torch.zeros(1, 3, 32, 32)
    pattern_mask[:, :, :3, :3] = 1.0
    pattern = {"trigger": torch.zeros(1, 3, 32, 32), "mask": pattern_mask}  # sigmoid(0) = 0.5 -> 128 (127.5)
    stamped = np.array(authors.pattern_stamper(pattern)(Image.new("RGB", (32, 32), (9, 9, 9))))
    assert (stamped[:3, :3] == 128).all() and (stamped[3:] == 9).all() and (stamped[:, 3:] == 9).all()


def test_compare_cells_pairs_the_cells_both_runs_have(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_cells", ROOT / "benchmarks" / "compare_cells.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    for run, accuracy in (("a", 0.7461), ("b", 0.747)):
        for attack in ("badnets", "blended" if run == "a" else "sig"):
            cell = {
                "attack": attack,
                "defense": "ft",
                "after": {"clean_accuracy": accuracy, "attack_success_rate": 0.308},
            }
            path = tmp_path / run / "cells" / attack / "ft" / "seed0.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps({**cell, "der": 0.82468}))
    text = compare.main([str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "old", "new"])
    assert text.splitlines()[2] == "| badnets | ft | 0 | 74.61 / 30.80 — 82.47 | 74.70 / 30.80 — 82.47 |"
    assert len(text.splitlines()) == 3  # blended and sig are in one run only
