"""The one training stack: `ClassifierConfig` and `ClassifierTrainer`, the base of MEDIC and of every baseline.

`ClassifierConfig` is a `transformers.TrainingArguments` with the options every method shares: how an image column is
preprocessed (size, mean / std, augmentation), where the decoded images live (`device_data`) and the optimiser
(`torch.optim.Adam` or `torch.optim.SGD` with coupled L2 weight decay on every parameter, as the papers train).
`ClassifierTrainer` is a `transformers.Trainer` that prepares such data for its model, trains it with cross-entropy
and saves it in its native format. `MedicCloner` adds the teacher and the clone loss; the defenses in
`medic_hf.defenses` add their own losses (docs/defenses.md, docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from dataclasses import dataclass, field

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

from .data import (
    DeviceBatchTransform,
    DeviceImageSet,
    TorchImageDataset,
    check_labels,
    collate,
    find_columns,
    keep_batches_on_device,
    prepare_for_model,
    resolve_preprocessing,
)
from .modeling import forward_logits, model_family, num_classes, save_native

logger = logging.get_logger(__name__)

DEVICE_DATA_MODES = ("auto", "never")


@dataclass
class ClassifierConfig(TrainingArguments):
    """`TrainingArguments` plus what every training method of medic_hf shares (data and optimiser), with the
    defaults of an image classifier trained on a small clean set: batch 64, cosine schedule, no checkpoints, no
    trackers. `MedicConfig` and the defenses' configs extend it."""

    augment: bool = field(
        default=True,
        metadata={
            "help": "Random crop (padding 1/8 of the side) and horizontal flip on training images given as an image "
            "column, the usual CIFAR training transform of the papers and BackdoorBench. False feeds them with the "
            "evaluation preprocessing only. Rows of ready `pixel_values` are never augmented."
        },
    )
    image_size: list[int] | None = field(
        default=None,
        metadata={
            "help": "Input size for image columns: one value (square) or height width. None takes it from the "
            "image processor, the timm data config or the model config. A timm model built without pretrained "
            "weights still carries its default tag's config (224 px for resnet18): set this for 32 px data."
        },
    )
    image_mean: list[float] | None = field(
        default=None,
        metadata={
            "help": "Per-channel normalisation mean for image columns (one value per channel); None: the model's."
        },
    )
    image_std: list[float] | None = field(
        default=None,
        metadata={
            "help": "Per-channel normalisation std for image columns (one value per channel); None: the model's."
        },
    )
    device_data: str = field(
        default="auto",
        metadata={
            "help": "'auto': an image-column data set that fits device_data_max_mb is decoded once into a uint8 "
            "tensor on the training device, and each batch is augmented and normalised there as tensor ops "
            "(docs/performance.md). 'never': decode and augment every image with PIL in the data loader.",
            "choices": list(DEVICE_DATA_MODES),
        },
    )
    device_data_max_mb: float = field(
        default=2048.0,
        metadata={
            "help": "The most memory (MiB, N x C x H x W bytes) one decoded data set may take on the device with "
            "device_data='auto'; larger sets use per-image loading. A 5 percent draw of CIFAR-10 takes 7.3 MiB, "
            "its test split 29 MiB, 5 percent of ImageNet at 224 px 9.2 GiB."
        },
    )
    coupled_weight_decay: bool = field(
        default=True,
        metadata={
            "help": "Build the papers' optimiser: L2 weight decay added to the gradient of every parameter, with "
            "torch.optim.SGD (momentum `sgd_momentum`) when `optim` is 'sgd', else torch.optim.Adam (MEDIC). False "
            "falls back to the Trainer's `optim` (AdamW by default, no decay on biases and norms)."
        },
    )
    sgd_momentum: float = field(default=0.9, metadata={"help": "Momentum of torch.optim.SGD (optim='sgd')."})

    # --- TrainingArguments defaults that differ ---
    output_dir: str | None = field(default="medic-output", metadata={"help": "Where checkpoints and the model go."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "The scheduler type (cosine, per step)."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Training batch size per device."})
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Evaluation batch size per device."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep image columns: they are transformed on the fly."}
    )
    label_names: list[str] | None = field(
        default_factory=lambda: ["labels"], metadata={"help": "The label key in the batches."}
    )
    report_to: None | str | list[str] = field(
        default="none", metadata={"help": "Trackers to report to ('none', 'all', 'tensorboard', 'wandb', ...)."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps."})
    save_strategy: str = field(default="no", metadata={"help": "When to save checkpoints."})

    def __post_init__(self):
        super().__post_init__()
        if self.device_data not in DEVICE_DATA_MODES:
            raise ValueError(f"device_data={self.device_data!r}: choose 'auto' or 'never'.")
        if self.sgd_momentum < 0:
            raise ValueError("sgd_momentum must be >= 0.")
        if self.image_size is not None:
            self.image_size = [
                int(v) for v in ([self.image_size] if isinstance(self.image_size, int) else self.image_size)
            ]
            if len(self.image_size) not in (1, 2) or min(self.image_size) <= 0:
                raise ValueError(f"image_size={self.image_size}: give one size (square) or height width, e.g. 32.")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, [float(v) for v in ([value] if isinstance(value, (int, float)) else value)])
        if self.image_std is not None and min(self.image_std) <= 0:
            raise ValueError(f"image_std={self.image_std}: every value must be > 0.")


def distillation_loss(
    logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float, temperature: float
) -> torch.Tensor:
    """Hinton et al.'s label loss: ``(1 - alpha) * CE(logits, labels) + alpha * T^2 * KL(softmax(teacher / T) ||
    softmax(logits / T))``, averaged over the batch; ``alpha = 0`` is the cross-entropy alone. ``labels`` are class
    indices or class probabilities."""
    ce = F.cross_entropy(logits, labels)
    if alpha == 0:
        return ce
    return (1 - alpha) * ce + alpha * soft_target_loss(logits, teacher_logits, temperature)


def soft_target_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(logits / T))``, averaged over the batch (Hinton et al.)."""
    t = temperature
    teacher = F.log_softmax(teacher_logits / t, dim=-1)
    return t * t * F.kl_div(F.log_softmax(logits / t, dim=-1), teacher, log_target=True, reduction="batchmean")


def preprocessing_overrides(args) -> dict:
    """resolve_preprocessing's input_size / mean / std from a config's image_size / image_mean / image_std."""
    size = getattr(args, "image_size", None)
    return dict(
        input_size=size[0] if size and len(size) == 1 else size,
        mean=getattr(args, "image_mean", None),
        std=getattr(args, "image_std", None),
    )


def accuracy_metrics(eval_pred) -> dict[str, float]:
    """Top-1 accuracy; on a backdoor set (triggered images labelled with the target) this is the ASR."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


class ClassifierTrainer(Trainer):
    """A `Trainer` for timm, transformers and plain classifiers, trained with cross-entropy on `{"pixel_values",
    "labels"}` batches and saved in their native format (timm `config.json` + `model.safetensors`, transformers
    `save_pretrained`, or `model.safetensors`).

    With a :class:`ClassifierConfig`, data sets with an image column get the model's preprocessing (that of
    ``preprocessing_model``, default ``model``; decoded once onto the device when they fit, see `device_data`);
    data that already yields `pixel_values` is used as it is. With plain `TrainingArguments` the data must be ready
    (rows of tensors, or a `DeviceImageSet` with its ``device_transform``).
    """

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments | None = None,
        train_dataset=None,
        eval_dataset=None,
        data_collator=None,
        *,
        preprocessing_model: nn.Module | None = None,
        image_processor=None,
        device_transform: DeviceBatchTransform | None = None,
        **kwargs,
    ):
        """``device_transform``: for a ready `DeviceImageSet` training set (uint8 batches already on the device),
        the batched augmentation and normalisation that turn its batches into the model's input."""
        args = ClassifierConfig(output_dir=tempfile.mkdtemp(prefix="classifier-")) if args is None else args
        self.args = args  # the Trainer sets it again; the data preparation below reads it first
        self.preprocessing_model = model if preprocessing_model is None else preprocessing_model
        self.num_classes = num_classes(self.preprocessing_model)
        self.image_processor = image_processor
        self.preprocessing: dict | None = None
        self.device_transform = device_transform
        self._custom_collator = data_collator is not None
        if isinstance(args, ClassifierConfig):
            train_dataset = self._prepare_data(train_dataset, train=args.augment)
            if isinstance(eval_dataset, dict):
                eval_dataset = {k: self._prepare_data(v, train=False) for k, v in eval_dataset.items()}
            else:
                eval_dataset = self._prepare_data(eval_dataset, train=False)
        if device_transform is not None or isinstance(args, ClassifierConfig):
            data_collator = data_collator or collate
        if kwargs.get("compute_metrics") is None:
            kwargs["compute_metrics"] = accuracy_metrics
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=data_collator,
            **kwargs,
        )
        # Our losses are per-batch means that know nothing of `num_items_in_batch`.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        if device_transform is not None:
            keep_batches_on_device(self.args)

    # ------------------------------------------------------------------ data

    def _prepare_data(self, dataset, *, train: bool):
        """Image columns get the model's preprocessing; data that already yields `pixel_values` (a user's
        `with_transform`, ready tensors, a torch data set of tensors) is used as it is."""
        if dataset is None:
            return None
        name = type(self).__name__
        if isinstance(dataset, datasets.Dataset) and len(dataset) == 0:
            raise ValueError(f"A data set given to {name} is empty: check the split or the filter that made it.")
        if isinstance(dataset, datasets.Dataset) and dataset.format["type"] == "custom":
            return self._user_transformed(dataset)
        if isinstance(dataset, datasets.Dataset):
            image_column, label_column = find_columns(dataset)
            self._check_class_count(dataset, label_column)
            if image_column != "pixel_values":
                preprocessing = self._resolve_preprocessing()
                if train:
                    self._log_preprocessing(preprocessing, dataset, image_column)
                if self._fits_on_device(dataset, preprocessing):
                    check_labels(dataset, label_column, self.num_classes)
                    return DeviceImageSet.from_dataset(
                        dataset, image_column, label_column, preprocessing, device=self.args.device
                    )
        # Per-image loading; `self.preprocessing` is set above for an image column (or by an earlier data set).
        return prepare_for_model(
            dataset,
            self.preprocessing_model,
            train=train,
            augment=self.args.augment,
            preprocessing=self.preprocessing,
            num_classes=self.num_classes,
            **self._preprocessing_options(),
        )

    def _fits_on_device(self, dataset: datasets.Dataset, preprocessing: dict) -> bool:
        """device_data='auto': decode the set once onto the device when it takes at most device_data_max_mb."""
        if self.args.device_data != "auto" or self._custom_collator:  # a user's collator expects rows, not batches
            return False
        if DeviceImageSet.nbytes(dataset, preprocessing) > self.args.device_data_max_mb * 2**20:
            logger.info(f"The data set ({len(dataset)} rows) exceeds device_data_max_mb: per-image loading.")
            return False
        self.device_transform = DeviceBatchTransform(preprocessing)
        keep_batches_on_device(self.args)
        return True

    def _model_input(self, pixel_values: torch.Tensor, *, train: bool) -> torch.Tensor:
        """Batches of a device-resident set are uint8: augment (in training) and normalise them here, batched."""
        if pixel_values.dtype != torch.uint8:
            return pixel_values
        if self.device_transform is None:
            raise ValueError("uint8 pixel_values need ClassifierTrainer(device_transform=...).")
        augment = train and getattr(self.args, "augment", True)
        return self.device_transform(pixel_values.to(self.args.device), train=augment)

    def _user_transformed(self, dataset: datasets.Dataset):
        """A data set with the user's own transform (`with_transform` / `set_transform`), used as it is."""
        name = type(self).__name__
        item = dataset[0]
        label_key = next((k for k in ("labels", "label") if k in item), None)
        if "pixel_values" not in item or label_key is None:
            raise ValueError(
                f"The data set's own transform returns keys {sorted(item)}; {name} uses such a data set as it "
                "is and needs 'pixel_values' (a tensor) and 'label' or 'labels'. Return those from your transform, "
                f"or remove it (ds.reset_format()) to let {name} preprocess the image column itself."
            )
        if label_key in dataset.column_names:  # read from the stored column: no image goes through the transform
            self._check_class_count(dataset, label_key)
            check_labels(dataset, label_key, self.num_classes)
        logger.warning(f"The data set has its own transform: {name} uses its pixel_values as they are.")
        return TorchImageDataset(
            dataset, transform=None, num_classes=self.num_classes, image_key="pixel_values", label_key=label_key
        )

    def _resolve_preprocessing(self) -> dict:
        """The model's preprocessing (image processor, timm data config or model config) with the config's
        image_size / image_mean / image_std on top."""
        if self.preprocessing is None:
            self.preprocessing = resolve_preprocessing(self.preprocessing_model, **self._preprocessing_options())
        return self.preprocessing

    def _preprocessing_options(self) -> dict:
        """resolve_preprocessing's keywords from the trainer's image processor and config."""
        return dict(image_processor=self.image_processor, **preprocessing_overrides(self.args))

    def _log_preprocessing(self, preprocessing: dict, dataset: datasets.Dataset, image_column: str) -> None:
        """One line saying what is applied; a warning when it resizes the images (e.g. 32 px data for a 224 px
        timm config that came with the architecture, not with the weights)."""
        channels, height, width = preprocessing["input_size"]
        first = dataset[0][image_column]
        size = getattr(first, "size", None)  # PIL: (width, height)
        augment = f"random crop (padding {min(height, width) // 8}) + horizontal flip" if self.args.augment else "none"
        line = (
            f"{type(self).__name__} preprocessing of column '{image_column}': {channels}x{height}x{width}, "
            f"mean {_rounded(preprocessing['mean'])}, std {_rounded(preprocessing['std'])}, augmentation: {augment}"
        )
        if size is not None and tuple(size) != (width, height):
            logger.warning(
                f"{line}. The images are {size[0]}x{size[1]}: they are resized to {width}x{height}. If the model "
                "expects their own size, set image_size (and image_mean / image_std) in the config or pass its "
                "image_processor."
            )
        else:
            logger.info(line)

    def _check_class_count(self, dataset: datasets.Dataset, label_column: str) -> None:
        feature = dataset.features.get(label_column)
        if isinstance(feature, datasets.ClassLabel) and self.num_classes and feature.num_classes != self.num_classes:
            raise ValueError(
                f"The data set has {feature.num_classes} classes but the model has {self.num_classes} outputs: "
                "use the data set the model was trained for, or remap the labels to the model's classes."
            )

    def get_eval_dataloader(self, eval_dataset=None):
        """Evaluation sees every image: `dataloader_drop_last` is about training batches."""
        if not self.args.dataloader_drop_last:
            return super().get_eval_dataloader(eval_dataset)
        self.args.dataloader_drop_last = False
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.args.dataloader_drop_last = True

    # ------------------------------------------------------------------ optimiser and loss

    def create_optimizer(self, model=None):
        """The papers' optimiser: Adam or SGD with coupled L2 weight decay on every parameter (ClassifierConfig's
        `coupled_weight_decay`, on by default); otherwise the Trainer's `optim`."""
        if self.optimizer is None and getattr(self.args, "coupled_weight_decay", False):
            args = self.args
            params = [p for p in (model or self.model).parameters() if p.requires_grad]
            if str(getattr(args.optim, "value", args.optim)) == "sgd":
                self.optimizer = torch.optim.SGD(
                    params, lr=args.learning_rate, momentum=args.sgd_momentum, weight_decay=args.weight_decay
                )
            else:
                self.optimizer = torch.optim.Adam(
                    params,
                    lr=args.learning_rate,
                    betas=(args.adam_beta1, args.adam_beta2),
                    eps=args.adam_epsilon,
                    weight_decay=args.weight_decay,
                )
            return self.optimizer
        return super().create_optimizer(model)

    def optimizer_description(self) -> str:
        """The optimiser in words, for model cards and reports."""
        a = self.args
        optim = str(getattr(a.optim, "value", a.optim))
        if not getattr(a, "coupled_weight_decay", False):
            return optim
        return "SGD (coupled L2)" if optim == "sgd" else "Adam (coupled L2)"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pixel_values = self._model_input(inputs["pixel_values"], train=model.training)
        logits = forward_logits(model, pixel_values)
        loss = F.cross_entropy(logits.float(), inputs["labels"])
        return (loss, {"logits": logits}) if return_outputs else loss

    # ------------------------------------------------------------------ saving

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Writes the model in its native format (timm / transformers / safetensors) and its preprocessing (a
        transformers image processor, or timm's pretrained_cfg)."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        preprocessing = self._saved_preprocessing()
        if preprocessing is not None and model_family(model) == "timm":
            # The model's config says how to feed it: what it was trained with, not the architecture's default.
            model.pretrained_cfg = {**(model.pretrained_cfg or {}), **_timm_data_config(preprocessing)}
        save_native(model, output_dir)
        if model_family(model) == "transformers":
            processor = self.image_processor or (_image_processor(preprocessing) if preprocessing else None)
            if processor is not None:
                processor.save_pretrained(output_dir)  # so pipeline("image-classification", model=dir) works

    def _saved_preprocessing(self) -> dict | None:
        if not isinstance(self.args, ClassifierConfig):
            return None  # ready data under plain TrainingArguments (recipes/poison.py): the caller knows its own
        try:
            return self._resolve_preprocessing()
        except ValueError:  # a plain model fed ready tensors: nothing known to save
            return None


def _timm_data_config(preprocessing: dict) -> dict:
    return {
        "input_size": tuple(preprocessing["input_size"]),
        "mean": tuple(preprocessing["mean"]),
        "std": tuple(preprocessing["std"]),
        "interpolation": preprocessing.get("interpolation", "bilinear"),
        "crop_pct": preprocessing.get("crop_pct", 1.0),
    }


def _image_processor(preprocessing: dict):
    """A transformers image processor that resizes to the input size and normalises as the model was trained."""
    from PIL import Image
    from transformers import ViTImageProcessor

    _, height, width = preprocessing["input_size"]
    resample = getattr(Image.Resampling, str(preprocessing.get("interpolation", "bilinear")).upper(), None)
    return ViTImageProcessor(
        size={"height": height, "width": width},
        resample=resample if resample is not None else Image.Resampling.BILINEAR,
        image_mean=list(preprocessing["mean"]),
        image_std=list(preprocessing["std"]),
    )


def _rounded(values) -> tuple[float, ...]:
    return tuple(round(float(v), 4) for v in values)


@contextlib.contextmanager
def random_state_kept():
    """The Python, NumPy and torch random states are put back as they were when the block ends."""
    python, numpy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
