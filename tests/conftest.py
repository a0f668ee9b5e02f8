import os

# Tests never reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# At most 2 threads; OMP_NUM_THREADS=1 wins (oversubscribed threads run the suite many times slower when a
# training job holds the cores).
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1, int(os.environ.get("OMP_NUM_THREADS", 2)))))


def pixel_dataset(n: int = 16, num_classes: int = 10, size: int = 32, seed: int = 0) -> datasets.Dataset:
    """A data set of ready `pixel_values` / `labels` rows (no preprocessing), torch-formatted."""
    rng = np.random.default_rng(seed)
    ds = datasets.Dataset.from_dict(
        {
            "pixel_values": rng.standard_normal((n, 3, size, size)).astype(np.float32),
            "labels": (np.arange(n) % num_classes).astype(np.int64),
        }
    )
    return ds.with_format("torch")


@torch.no_grad()
def calibrate(model: torch.nn.Module, ds) -> torch.nn.Module:
    """Make an untrained model look trained: perturbed weights (so no tensor is still at its constant init) and
    exact BatchNorm running statistics of the data; returned in eval mode."""
    for param in model.parameters():
        param.add_(0.05 * torch.randn_like(param))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one pass gives the exact statistics
    model.train()
    pixel_values = ds[: len(ds)]["pixel_values"]
    if hasattr(model, "config") and hasattr(model.config, "num_labels"):
        model(pixel_values=pixel_values)
    else:
        model(pixel_values)
    for m in norms:
        m.momentum = 0.1
    return model.eval()


@pytest.fixture(autouse=True, scope="session")
def no_full_garbage_collection_per_training():
    """Every `Trainer.train()` starts with `accelerator.free_memory()`, a full `gc.collect()`: about 0.3 s in a test
    process, where the suite trains hundreds of tiny models on a CPU with nothing to free. The cache is still
    cleared; only the collection is skipped, in tests alone."""
    from accelerate.utils import memory

    original = memory.clear_device_cache
    memory.clear_device_cache = lambda garbage_collection=False: original(garbage_collection=False)
    yield
    memory.clear_device_cache = original


@pytest.fixture
def tiny_pixels():
    return pixel_dataset()


def benchmark_script(name: str):
    """A script of benchmarks/ (not a package) imported as a module, without changing the import path."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
