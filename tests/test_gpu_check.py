"""benchmarks/gpu_check.py on a machine without CUDA: its arguments, and a loud failure instead of a skip."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments():
    parser = load_script().make_parser()
    defaults = parser.parse_args([])
    assert defaults.parts == [1, 2, 3, 4] and defaults.batch_sizes == [64, 256] and defaults.teacher_epochs == 15
    chosen = parser.parse_args(["--parts", "1", "2", "--batch_sizes", "128", "--dataset_name", "runs/cifar10"])
    assert chosen.parts == [1, 2] and chosen.batch_sizes == [128] and chosen.dataset_name == "runs/cifar10"
    with pytest.raises(SystemExit):
        parser.parse_args(["--parts", "5"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--part", "1"])  # no abbreviations


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure without CUDA")
def test_fails_loudly_without_cuda(tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        load_script().main(["--parts", "1", "--output_dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # nothing written: no empty table that looks like a result
    done = subprocess.run([sys.executable, str(SCRIPT), "--parts", "2"], capture_output=True, text=True)
    assert done.returncode != 0 and "needs a CUDA GPU" in done.stderr
