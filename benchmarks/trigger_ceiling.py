"""ASR of a trojaned model split by how bright the trigger's corner already is in the clean image.

A solid white corner patch cannot be seen on an image whose corner is already white; this measures how much of the
missing ASR that explains (docs/removal.md, section 1).

    python benchmarks/trigger_ceiling.py --model runs/resnet18-badnets-20ep --samples 2000
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from medic_hf.attacks import load_attack
from medic_hf.data import build_transform, load_image_dataset, resolve_preprocessing
from medic_hf.modeling import forward_logits, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model folder with attack.json (recipes/poison.py)")
    parser.add_argument("--dataset", default="../shared/data/cifar10")
    parser.add_argument("--samples", type=int, default=2000, help="first test rows to use (target class dropped)")
    parser.add_argument("--corner", type=int, default=3, help="side of the bottom-right corner, in pixels")
    args = parser.parse_args()

    model, attack = load_model(args.model).eval(), load_attack(args.model)
    test = load_image_dataset(args.dataset)["test"].select(range(args.samples))
    triggered = attack.backdoor_test_view(test)  # non-target rows, in order
    clean = [img for img, label in zip(test["img"], test["label"]) if label != attack.target_class]
    side = args.corner
    brightness = np.array([np.asarray(img.convert("RGB"))[-side:, -side:].mean() / 255 for img in clean])
    transform = build_transform(resolve_preprocessing(model), train=False)
    x = torch.stack([transform(img.convert("RGB")) for img in triggered["img"]])
    with torch.no_grad():
        hit = torch.cat([forward_logits(model, x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)])
    hit = (hit == attack.target_class).numpy()
    print(f"{len(hit)} triggered images, ASR {100 * hit.mean():.1f}%")
    for threshold in (0.7, 0.8, 0.9):
        bright = brightness > threshold
        print(
            f"corner brightness > {threshold}: {100 * bright.mean():.1f}% of images, ASR there "
            f"{100 * hit[bright].mean():.1f}%, elsewhere {100 * hit[~bright].mean():.1f}%"
        )


if __name__ == "__main__":
    main()
