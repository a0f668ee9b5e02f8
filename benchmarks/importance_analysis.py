"""Where does MEDIC's importance weight go on a trojaned model? A diagnostic, no training.

For every cloned layer it finds the "trigger channels": the 5% of channels whose mean output moves most (in σ
units) when the trigger is stamped on clean test images. It then measures, on clean images, which share of the
layer's importance weight those channels receive, divided by their share of the layer's neurons: 1 means they are
cloned like any other neuron, below 1 that importance keeps them out of the clone loss. It reports this on all
clean images and on the 10% of clean images that the trojaned model pushes most toward the target class ("natural
triggers": e.g. a bright bottom-right corner for a white-patch BadNets), which are the ones that can teach a
student the backdoor.

    python benchmarks/importance_analysis.py --model runs/resnet18-badnets-20ep \
        --output benchmarks/results/resnet18-badnets-20ep/importance_analysis

Writes `<output>.json` (per layer) and `<output>.md` (the table and the layer means).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from medic_hf.attacks import load_attack
from medic_hf.cloned_neurons import ClonedNeurons
from medic_hf.data import build_transform, class_balanced_subset, load_image_dataset, resolve_preprocessing
from medic_hf.importance import importance_weights
from medic_hf.modeling import forward_logits, load_model
from medic_hf.neurons import channel_dim


def attribution_weights(f, grad, mean, temperature):
    """A criterion tried and dropped (docs/removal.md): softmax of τ·(−(f − μ)·∂ℓ/∂f) / RMS per sample, set to 0
    where the neuron's deviation from its mean works against the true label."""
    h = -((f - mean) * grad).flatten(1)
    h = h / h.pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(1e-12)
    w = torch.softmax(temperature * h, dim=1)
    return torch.where(h > 0, w, torch.zeros_like(w))


# criterion name -> (f, grad, mean, std) -> weights (B, N)
CRITERIA = {
    "paper (both, τ=5)": lambda f, g, m, s: importance_weights(f, g, m, s, mode="both", temperature=5.0)[0],
    "activation, τ=5": lambda f, g, m, s: importance_weights(f, g, m, s, mode="activation", temperature=5.0)[0],
    "attribution, τ=0.5": lambda f, g, m, s: attribution_weights(f, g, m, 0.5),
    "attribution, τ=1": lambda f, g, m, s: attribution_weights(f, g, m, 1.0),
}


def pixels(ds, transform, column="img"):
    return torch.stack([transform(img.convert("RGB")) for img in ds[column]])


def record(model, recorder, x, labels=None, batch=256):
    """Captured activations (and, with labels, gradients of the per-sample summed CE), concatenated over batches."""
    acts, grads = {}, {}
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        with torch.enable_grad() if labels is not None else torch.no_grad():
            logits = forward_logits(model, xb)
            captured = recorder.pop()
            if labels is not None:
                loss = F.cross_entropy(logits, labels[i : i + batch], reduction="sum")
                found = dict(zip(captured, torch.autograd.grad(loss, list(captured.values()))))
                for name, g in recorder.by_sample(found).items():
                    grads.setdefault(name, []).append(g.detach())
            captured = recorder.by_sample(captured)
        for name, a in captured.items():
            acts.setdefault(name, []).append(a.detach())
    return {k: torch.cat(v) for k, v in acts.items()}, {k: torch.cat(v) for k, v in grads.items()}


def trigger_mask(clean: torch.Tensor, triggered: torch.Tensor, std: torch.Tensor, cdim: int, share: float):
    """Boolean mask over a sample's flattened neurons: the channels the trigger moves most."""
    reduce = [d for d in range(clean.ndim) if d != cdim]
    shift = ((triggered - clean) / std).mean(dim=reduce).abs()
    k = max(1, round(share * shift.numel()))
    mask = torch.zeros_like(clean[:1], dtype=torch.bool)
    mask.index_fill_(cdim, shift.topk(k).indices, True)
    return mask.expand_as(clean[:1]).flatten(1)[0], shift.max().item()


def share_ratio(w: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over samples of (the masked neurons' share of w) / (their share of the neurons)."""
    share = w[:, mask].sum(1) / w.sum(1).clamp_min(1e-30)
    return (share.mean() / mask.float().mean()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model folder with attack.json (recipes/poison.py)")
    parser.add_argument("--dataset", default="../shared/data/cifar10")
    parser.add_argument("--samples", type=int, default=768, help="non-target clean test images to analyse")
    parser.add_argument("--trigger_share", type=float, default=0.05, help="share of channels called trigger channels")
    parser.add_argument("--output", default=None, help="path prefix of the .json and .md results")
    args = parser.parse_args()
    torch.manual_seed(0)

    model = load_model(args.model).eval()
    attack = load_attack(args.model)
    data = load_image_dataset(args.dataset)
    transform = build_transform(resolve_preprocessing(model), train=False)
    clean_train = class_balanced_subset(data["train"], fraction=0.05, seed=0)
    test = data["test"].select(range(min(len(data["test"]), 2 * args.samples)))
    test = test.filter(lambda row: row["label"] != attack.target_class).select(range(args.samples))
    triggered = attack.backdoor_test_view(test)

    # The neurons MEDIC clones, the classifier's included (this analysis has always reported it).
    neurons = ClonedNeurons(model, clone_logits=True, require_grad=True)
    with neurons.recording():
        neurons.probe(pixels(test.select(range(2)), transform))
        stats = neurons.statistics(pixels(clean_train, transform).split(256))
        x_clean, x_trig = pixels(test, transform), pixels(triggered, transform)
        labels = torch.tensor(test["label"])
        clean_acts, clean_grads = record(model, neurons.teacher_recorder, x_clean, labels)
        trig_acts, _ = record(model, neurons.teacher_recorder, x_trig)
    modules = neurons.teacher_recorder.modules
    with torch.no_grad():
        p_target = torch.softmax(forward_logits(model, x_clean), dim=1)[:, attack.target_class]
    natural = p_target.topk(max(1, len(p_target) // 10)).indices

    rows = []
    for name, module in modules.items():
        f, g = clean_acts[name], clean_grads[name]
        mean, std = stats.mean[name], stats.std[name]
        mask, max_shift = trigger_mask(f, trig_acts[name], std, channel_dim(module) % f.ndim, args.trigger_share)
        row = {"layer": name, "neurons": mask.numel(), "trigger_shift_max": round(max_shift, 3)}
        for label, criterion in CRITERIA.items():
            w = criterion(f, g, mean, std)
            row[label] = {"all": round(share_ratio(w, mask), 3), "natural": round(share_ratio(w[natural], mask), 3)}
        rows.append(row)

    header = "| layer | neurons | max trigger shift (σ) | " + " | ".join(CRITERIA) + " |"
    lines = [header, "|---" * (3 + len(CRITERIA)) + "|"]
    for row in rows:
        cells = " | ".join(f"{row[c]['all']:.2f} / {row[c]['natural']:.2f}" for c in CRITERIA)
        lines.append(f"| {row['layer']} | {row['neurons']} | {row['trigger_shift_max']:.2f} | {cells} |")
    deep = [r for r in rows if r["trigger_shift_max"] >= 1.0]
    for title, subset in (("mean, all layers", rows), ("mean, layers with shift ≥ 1σ", deep)):
        cells = " | ".join(
            f"{sum(r[c]['all'] for r in subset) / len(subset):.2f} / "
            f"{sum(r[c]['natural'] for r in subset) / len(subset):.2f}"
            for c in CRITERIA
        )
        lines.append(f"| **{title}** ({len(subset)}) | | | {cells} |")
    table = "\n".join(lines)
    intro = (
        f"Share of importance weight on the trigger channels / their share of neurons, on {args.samples} clean "
        f"non-target test images (all) and on the {len(natural)} of them the model pushes most toward class "
        f"{attack.target_class} (natural; mean p(target) {p_target[natural].mean():.2f} vs "
        f"{p_target.mean():.2f} overall). 1 = cloned like any neuron; < 1 = kept out.\n\n"
    )
    print(intro + table)
    prefix = Path(args.output or Path(args.model) / "importance_analysis")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    prefix.with_suffix(".md").write_text(intro + table + "\n")
    print(f"wrote {prefix}.json and {prefix}.md")


if __name__ == "__main__":
    main()
