"""medic_hf: remove backdoors from timm / transformers / PyTorch image classifiers with MEDIC (CVPR 2023)."""

from .cloner import MedicCloner
from .config import MedicConfig
from .training import ClassifierConfig, ClassifierTrainer

__version__ = "0.1.0"
__all__ = ["ClassifierConfig", "ClassifierTrainer", "MedicCloner", "MedicConfig", "__version__"]
