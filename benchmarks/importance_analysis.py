"""Where does MEDIC's importance weight go on a trojaned model? A diagnostic, no training.

For every cloned layer it finds the "trigger channels": the channels whose mean output moves most (in σ units)
when the trigger is stamped on clean test images. It then measures, on clean images, which share of the layer's
importance weight (Eqs. 2-4) those channels receive, against their share of the layer's neurons. A ratio well
below 1 means importance keeps the trigger channels out of the clone loss; near 1, they are cloned like the rest.

    python benchmarks/importance_analysis.py --model runs/resnet18-badnets --temperatures 0 5 10

Writes `<output>.json` and prints a per-layer table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from medic_hf.attacks import load_attack
from medic_hf.data import build_transform, class_balanced_subset, load_image_dataset, resolve_preprocessing
from medic_hf.importance import NeuronStats, importance_weights
from medic_hf.modeling import forward_logits, load_model
from medic_hf.neurons import NeuronRecorder, channel_dim, find_clone_modules


def pixels(ds, transform, column="img"):
    return torch.stack([transform(img.convert("RGB")) for img in ds[column]])


def record(model, recorder, x, labels=None, batch=256):
    """Captured activations (and, with labels, gradients of the per-sample summed CE), concatenated over batches."""
    acts, grads = {}, {}
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        with torch.enable_grad() if labels is not None else torch.no_grad():
            logits = forward_logits(model, xb)
            a = recorder.pop()
            if labels is not None:
                loss = F.cross_entropy(logits, labels[i : i + batch], reduction="sum")
                g = torch.autograd.grad(loss, list(a.values()))
                for name, gi in zip(a, g):
                    grads.setdefault(name, []).append(gi.detach())
        for name, ai in a.items():
            acts.setdefault(name, []).append(ai.detach())
    return {k: torch.cat(v) for k, v in acts.items()}, {k: torch.cat(v) for k, v in grads.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", default="../shared/data/cifar10")
    parser.add_argument("--samples", type=int, default=512, help="clean test images to analyse")
    parser.add_argument("--trigger_share", type=float, default=0.05, help="share of channels called trigger channels")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[5.0, 10.0])
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)

    model = load_model(args.model).eval()
    attack = load_attack(args.model)
    data = load_image_dataset(args.dataset)
    transform = build_transform(resolve_preprocessing(model), train=False)
    clean_train = class_balanced_subset(data["train"], fraction=0.05, seed=0)
    test = data["test"].select(range(args.samples * 2))
    test = test.filter(lambda row: row["label"] != attack.target_class).select(range(args.samples))
    triggered = attack.backdoor_test_view(test)

    modules = find_clone_modules(model)
    recorder = NeuronRecorder(modules, require_grad=True)
    recorder.probe(lambda: forward_logits(model, pixels(test.select(range(2)), transform)))
    stats = NeuronStats({n: channel_dim(m) for n, m in modules.items()})
    x_train = pixels(clean_train, transform)
    for i in range(0, len(x_train), 256):
        with torch.no_grad():
            forward_logits(model, x_train[i : i + 256])
        stats.update(recorder.pop())
    stats.finalize()

    x_clean, x_trig = pixels(test, transform), pixels(triggered, transform)
    labels = torch.tensor(test["label"])
    clean_acts, clean_grads = record(model, recorder, x_clean, labels)
    trig_acts, _ = record(model, recorder, x_trig)

    rows = []
    for name in modules:
        f, g, ft = clean_acts[name], clean_grads[name], trig_acts[name]
        mean, std = stats.mean[name], stats.std[name]
        cdim = channel_dim(modules[name]) % f.ndim
        reduce = [d for d in range(f.ndim) if d != cdim]
        shift = ((ft - f) / std).mean(dim=reduce).abs()  # per channel, σ units
        k = max(1, round(args.trigger_share * shift.numel()))
        trigger_channels = shift.topk(k).indices
        mask = torch.zeros_like(f[:1], dtype=torch.bool)
        mask.index_fill_(cdim, trigger_channels, True)
        mask = mask.expand_as(f[:1]).flatten(1)[0]
        row = {"layer": name, "neurons": mask.numel(), "trigger_shift_max": shift.max().item()}
        for tau in args.temperatures:
            w, parts = importance_weights(f, g, mean, std, mode="both", temperature=tau)
            share = (w[:, mask].sum(1) / w.sum(1)).mean().item()
            share_act = (parts["activation"][:, mask].sum(1)).mean().item()
            _, rms_parts = importance_weights(f, g, mean, std, mode="impact", temperature=tau, impact_scale="rms")
            share_imp = (rms_parts["impact"][:, mask].sum(1)).mean().item()
            row[f"tau{tau:g}"] = {
                "share_both": share / mask.float().mean().item(),
                "share_activation": share_act / mask.float().mean().item(),
                "share_impact_rms": share_imp / mask.float().mean().item(),
                "sum_w": w.sum(1).mean().item(),
            }
        rows.append(row)
    recorder.remove()

    print(f"{'layer':28s} {'N':>6s} {'shift':>6s} " + " ".join(f"τ={t:g} both/act/imp_rms" for t in args.temperatures))
    for row in rows:
        cells = " ".join(
            f"{row[f'tau{t:g}']['share_both']:6.2f}/{row[f'tau{t:g}']['share_activation']:5.2f}"
            f"/{row[f'tau{t:g}']['share_impact_rms']:5.2f}"
            for t in args.temperatures
        )
        print(f"{row['layer']:28s} {row['neurons']:6d} {row['trigger_shift_max']:6.2f} {cells}")
    out = Path(args.output or Path(args.model) / "importance_analysis.json")
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
