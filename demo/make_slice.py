"""Cut the demo's CIFAR-10 slice (committed as demo/cifar10-slice/) from the full local copy.

    python demo/make_slice.py --source ../shared/data/cifar10 --output demo/cifar10-slice

Class-balanced, seeded draws: 140 images per class from the train split (the clean set MEDIC clones on) and 60 per
class from the test split (for clean accuracy and ASR). The JPEG bytes are copied as they are, so the files keep the
`uoft-cs/cifar10` schema (`img`, `label`) and stay under 2 MB.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medic_hf.data import class_balanced_subset, load_image_dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="../shared/data/cifar10")
    parser.add_argument("--output", default="demo/cifar10-slice")
    parser.add_argument("--train_per_class", type=int, default=140)
    parser.add_argument("--test_per_class", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data = load_image_dataset(args.source)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        ds = data[split]
        subset = class_balanced_subset(ds, num_samples=per_class * ds.features["label"].num_classes, seed=args.seed)
        subset.to_parquet(out / f"{split}.parquet")
        print(f"{split}: {len(subset)} rows, {(out / f'{split}.parquet').stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
