"""Plain supervised training of an image classifier with the Trainer (used to make trojaned models)."""

from __future__ import annotations

import os

import torch.nn.functional as F
from transformers import Trainer

from .modeling import forward_logits, save_native


class ClassifierTrainer(Trainer):
    """A `Trainer` for timm, transformers and plain classifiers fed `{"pixel_values", "labels"}` batches.

    The loss is the cross-entropy of the logits, whatever the model returns, and `save_model()` writes the model
    in its native format (timm `config.json` + `model.safetensors`, transformers `save_pretrained`, or
    `model.safetensors`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = forward_logits(model, inputs["pixel_values"])
        loss = F.cross_entropy(logits.float(), inputs["labels"])
        return (loss, {"logits": logits}) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            save_native(self.accelerator.unwrap_model(self.model), output_dir)
