"""Plain supervised training of an image classifier with the Trainer (used to make trojaned models)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from transformers import Trainer

from .data import DeviceBatchTransform, collate, keep_batches_on_device
from .modeling import forward_logits, save_native


class ClassifierTrainer(Trainer):
    """A `Trainer` for timm, transformers and plain classifiers fed `{"pixel_values", "labels"}` batches.

    The loss is the cross-entropy of the logits, whatever the model returns, and `save_model()` writes the model
    in its native format (timm `config.json` + `model.safetensors`, transformers `save_pretrained`, or
    `model.safetensors`).
    """

    def __init__(self, *args, device_transform: DeviceBatchTransform | None = None, **kwargs):
        """``device_transform``: for a `DeviceImageSet` training set (uint8 batches already on the device), the
        batched augmentation and normalisation that turn its batches into the model's input."""
        if device_transform is not None:
            kwargs.setdefault("data_collator", collate)
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.device_transform = device_transform
        if device_transform is not None:
            keep_batches_on_device(self.args)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pixel_values = inputs["pixel_values"]
        if pixel_values.dtype == torch.uint8:  # a DeviceImageSet batch: augment (in training) and normalise here
            if self.device_transform is None:
                raise ValueError("uint8 pixel_values need ClassifierTrainer(device_transform=...).")
            pixel_values = self.device_transform(pixel_values.to(self.args.device), train=model.training)
        logits = forward_logits(model, pixel_values)
        loss = F.cross_entropy(logits.float(), inputs["labels"])
        return (loss, {"logits": logits}) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            save_native(self.accelerator.unwrap_model(self.model), output_dir)
