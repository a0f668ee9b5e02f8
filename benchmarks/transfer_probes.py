"""Fifteen probes of docs/transfer.md ("A second set of models", "A second architecture") that are not MedicConfig
settings, on the transfer benchmark's models (`benchmarks/transfer.py` trains them first):

- `reset_teacher`: where each backdoor lives. The trojaned model with its first `--fraction` of conv / norm / linear
  modules (and every parameter before them) put back to the base's values, evaluated as it is (no training):

      python benchmarks/transfer_probes.py reset_teacher --attacks sig-half label_consistent

- `teacher_classes`: the share of upstream images (other classes than the task's) that the clean downstream model
  and each trojaned model predict as each downstream class, the target named (one JSON line per model):

      python benchmarks/transfer_probes.py teacher_classes --models_dir runs/transfer-set4 \\
          --attacks badnets-5px blended label_consistent sig-half | grep "^{" \\
          > benchmarks/results/transfer-set4/teacher_classes.jsonl

- `delta_mask`: whether the backdoor lives in the part of the fine-tuning (Δ = trojaned − base) that matters least on
  clean data: the trojaned model with all but the `--keeps` fraction of Δ of highest saliency on the defender's clean
  set put back to the base's values (`fisher`: Δ² times the squared gradient; `magnitude`: |Δ|), or with Δ scaled by
  it (`interpolate`), the classifier whole and batch-norm statistics recomputed on the clean set, no training:

      python benchmarks/transfer_probes.py delta_mask --criteria fisher magnitude interpolate \\
          --keeps 0 0.001 0.01 0.1 0.5 1.0 | grep "^{" > benchmarks/results/transfer-set2/delta_mask.jsonl

- `prune_dormant`: whether the backdoor lives in units quiet on clean data: the trojaned model with the `--ratios`
  fraction of least active units of every module matching `--modules` pruned (fine-pruning on every hidden layer),
  no training; and `pruned_teacher`, MEDIC from the base cloning the model so pruned at `--prune_ratio`:

      python benchmarks/transfer_probes.py prune_dormant --attacks sig-half badnets-5px \\
          | grep "^{" > benchmarks/results/transfer-set2/prune_dormant.jsonl
      OMP_NUM_THREADS=1 python benchmarks/transfer_probes.py pruned_teacher --prune_ratio 0.2 \\
          --output_dir benchmarks/results/transfer-set2 --methods medic_base --seeds 0 --attacks sig-half \\
          --tag prune0.2

- `hybrid`: MEDIC with a student whose first quarter is the base's (frozen, as this mode's default) and whose rest is
  freshly initialised, as in MEDIC from scratch; any other flag goes to `benchmarks/transfer.py` (tag its cells):

      OMP_NUM_THREADS=1 python benchmarks/transfer_probes.py hybrid --output_dir benchmarks/results/transfer-set2 \\
          --methods medic_base --seeds 0 --attacks sig-half label_consistent --tag hybrid

- `ce_early`: the early modules that `early_lr_scale` trains (instead of freezing them) learn from the labels alone:
  the gradient of the clone loss, their own and the later layers', is taken out of their parameters, so nothing of
  the teacher reaches them; the later layers are cloned as usual. Give `early_lr_scale` (their learning rate's
  fraction) in `--medic_kwargs`:

      OMP_NUM_THREADS=1 python benchmarks/transfer_probes.py ce_early --output_dir benchmarks/results/transfer-set2 \\
          --methods medic_base --seeds 0 --attacks sig-half label_consistent --tag ce_early1 \\
          --medic_kwargs '{"early_lr_scale": 1.0}'

- `fresh_head`: MEDIC from the base at this mode's defaults with the base's classifier freshly initialised, as a base
  made for another number of classes would have it (the simulated base was made for five classes, as the downstream
  task is, so `student_from_base` keeps its classifier); timm models only:

      OMP_NUM_THREADS=1 python benchmarks/transfer_probes.py fresh_head \\
          --output_dir benchmarks/results/transfer-set2 --methods medic_base --seeds 0 \\
          --attacks sig-half label_consistent --tag fresh_head

- `swa`: stochastic weight averaging (Izmailov et al., UAI 2018) in place of the exponential average: the student
  evaluated and saved is the plain mean of its weights after every step from `--swa_start` (a fraction of the run)
  on, norm statistics included; give the schedule in `--medic_kwargs` (SWA's own: a constant learning rate):

      OMP_NUM_THREADS=1 python benchmarks/transfer_probes.py swa --swa_start 0.5 \\
          --output_dir benchmarks/results/transfer-set2 --methods medic_base --seeds 0 \\
          --attacks sig-half label_consistent --tag swa-lrconst \\
          --medic_kwargs '{"lr_scheduler_type": "constant_with_warmup"}'

- `adv_unlearn`: MEDIC from the base whose student also learns the labels of the clean batch under a universal
  adversarial perturbation of the teacher (after I-BAU and SAU), kept across steps, bounded by `--adv_epsilon` times
  the batch's per-channel standard deviation (`AdversarialUnlearningCloner` says how):

      OMP_NUM_THREADS=1 python benchmarks/transfer_probes.py adv_unlearn --adv_epsilon 0.5 \\
          --output_dir benchmarks/results/transfer-set2 --methods medic_base --seeds 0 --attacks sig-half --tag adv0.5

- `universal_perturbation`: whether such a perturbation points at the trigger, for the trojaned and the clean model
  (one JSON line per attack, model and bound):

      OMP_NUM_THREADS=1 python benchmarks/transfer_probes.py universal_perturbation --epsilons 0.1 0.25 0.5 \\
          --attacks sig-half badnets-5px blended label_consistent --output_dir benchmarks/results/transfer-set2 \\
          | grep "^{" > benchmarks/results/transfer-set2/universal_perturbation.jsonl

- `trivial_augment`: MEDIC from the base with TrivialAugmentWide on each training image before the crop and flip,
  teacher and student seeing the same image:

      OMP_NUM_THREADS=1 python benchmarks/transfer_probes.py trivial_augment \\
          --output_dir benchmarks/results/transfer-set2 --methods medic_base --seeds 0 --attacks sig-half --tag trivaug

- `l2sp`: MEDIC from the base with the trained parameters pulled towards the base's values (L2-SP) with weight
  `--alpha`, the classifier left out:

      OMP_NUM_THREADS=1 python benchmarks/transfer_probes.py l2sp --alpha 0.01 --seeds 0 \\
          --output_dir benchmarks/results/transfer-set2 --methods medic_base --attacks sig-half --tag l2sp0.01

- `unlabeled_early`: MEDIC from the base with unlabeled images (`--unlabeled_upstream`) whose rows enter the clone
  loss of the first `--unlabeled_fraction` of the cloned modules only (the labelled rows enter every module's):
  whether the accuracy they bring and the SIG they carry come from different depths:

      OMP_NUM_THREADS=1 python benchmarks/transfer_probes.py unlabeled_early --unlabeled_fraction 0.5 \\
          --models_dir runs/transfer-set4 --output_dir benchmarks/results/transfer-set4 --methods medic_base \\
          --seeds 0 1 --attacks sig-half badnets-5px --unlabeled_upstream 5000 --tag unl5000-early0.5

- `pooled`: MEDIC from the base whose clone loss compares each channel's mean over the positions (pixels, tokens)
  instead of every position (`medic_hf.importance.pooled_clone_loss`): the student must match what the teacher's
  channels say about the image, not where, so a detector of a local trigger need not be copied position by position.
  Now `MedicConfig(clone_positions="mean")`, except that the probe averages a ViT's class token with its patch tokens
  (same results elsewhere):

      OMP_NUM_THREADS=1 python benchmarks/transfer_probes.py pooled --poison_config \\
          recipes/poison_cifar10_swin_adamw.yaml --downstream_lr 5e-4 --models_dir runs/transfer-swin --tag pooled \\
          --output_dir benchmarks/results/transfer-swin --methods medic_base --seeds 0 --attacks badnets-5px
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transfer  # noqa: E402

from medic_hf import MedicCloner  # noqa: E402
from medic_hf.averaging import WeightAverage  # noqa: E402
from medic_hf.config import BASE_FROZEN_FRACTION  # noqa: E402
from medic_hf.data import class_balanced_subset, find_columns, load_image_dataset, prepare_for_model  # noqa: E402
from medic_hf.defenses._training import recompute_batchnorm  # noqa: E402
from medic_hf.modeling import forward_logits, load_model, make_student, student_from_base  # noqa: E402
from medic_hf.neurons import early_modules  # noqa: E402
from medic_hf.scripts.benchmark import evaluate, predict  # noqa: E402
from medic_hf.scripts.poison import select_classes  # noqa: E402


def early_keys(model: torch.nn.Module, fraction: float) -> set[str]:
    """State-dict keys of the first `fraction` of the model's modules, as `frozen_fraction` counts them (the
    parameters before the cut, and the frozen modules' buffers: normalisation statistics)."""
    modules, params = early_modules(model, fraction)
    return set(params) | {key for key in model.state_dict() if any(key.startswith(m + ".") for m in modules)}


def copy_keys(target: torch.nn.Module, source: torch.nn.Module, keys: set[str]) -> torch.nn.Module:
    target_state, source_state = target.state_dict(), source.state_dict()
    with torch.no_grad():
        for key in keys:
            target_state[key].copy_(source_state[key])
    return target


def each_attack(argv: list[str], parser: argparse.ArgumentParser):
    """The evaluation probes' set-up: the probe's own flags (`parser`, given `--attacks` here), the benchmark's (the
    rest); then, per attack, yields both, the attack, its trojaned model's folder and its data (`task_data`)."""
    parser.add_argument("--attacks", nargs="+", default=transfer.DEFAULT_ATTACKS)
    args, rest = parser.parse_known_args(argv)
    bench = transfer.make_parser().parse_args(rest)
    dataset = load_image_dataset(bench.dataset_name)
    for attack in args.attacks:
        teacher_dir = transfer.downstream(bench, attack)
        yield args, bench, attack, teacher_dir, transfer.task_data(bench, dataset, teacher_dir)


def teacher_classes(argv: list[str]) -> None:
    """The share of `--samples` upstream images (class-balanced, seed 0) that the clean downstream model and each
    trojaned model put in each downstream class, the attack's target named: whether the target is a sink for them."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=2000)
    clean = None
    for args, bench, attack, teacher_dir, data in each_attack(argv, parser):
        if clean is None:  # the same upstream images and clean model for every attack
            dataset = load_image_dataset(bench.dataset_name)
            _, label_column = find_columns(dataset["train"])
            upstream = select_classes(dataset["train"], label_column, bench.upstream_classes)
            images = class_balanced_subset(upstream, num_samples=args.samples, seed=0)
            clean = predict(load_model(transfer.downstream(bench, "none")), images, 256)
        for model, predicted in (("clean", clean), (attack, predict(load_model(teacher_dir), images, 256))):
            shares = torch.bincount(torch.as_tensor(predicted), minlength=len(bench.downstream_classes)) / len(images)
            row = {"attack": attack, "model": model, "target": data["target"], "shares": shares.tolist()}
            print(json.dumps(row), flush=True)


def reset_teacher(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.125, 0.25])
    base = None
    for args, bench, attack, teacher_dir, data in each_attack(argv, parser):
        if base is None:  # loaded once: every attack's teacher was fine-tuned from the same base
            base = load_model(transfer.upstream(bench))
        for fraction in [0.0, *args.fractions]:
            teacher = load_model(teacher_dir)
            teacher = copy_keys(teacher, base, early_keys(teacher, fraction)).eval()
            metrics = evaluate(teacher, data["test"], data["backdoor"], data["target"], 256)
            row = {"attack": attack, "fraction": fraction, **{k: round(100 * v, 2) for k, v in metrics.items()}}
            print(json.dumps(row), flush=True)


def as_tensors(dataset, model) -> tuple[torch.Tensor, torch.Tensor]:
    loader = torch.utils.data.DataLoader(prepare_for_model(dataset, model, train=False), batch_size=len(dataset))
    batch = next(iter(loader))
    return batch["pixel_values"], batch["labels"]


def ascent_step(model, pixel_values: torch.Tensor, labels, delta: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """One signed-gradient ascent step of the model's cross-entropy on a universal perturbation (step bound / 8),
    clamped to ±bound: how `adv_unlearn` and `universal_perturbation` both move it."""
    delta = delta.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(forward_logits(model, pixel_values.detach() + delta).float(), labels)
        (grad,) = torch.autograd.grad(loss, delta)
    return torch.clamp(delta.detach() + bound / 8 * grad.sign(), -bound, bound)


def trigger_change(x_test: torch.Tensor, y_test: torch.Tensor, x_backdoor: torch.Tensor, target: int) -> torch.Tensor:
    """The trigger's mean change of the model's input. The backdoor view holds the test images of the other classes,
    in order, stamped: each is compared with its own clean image, not with the test image at the same row."""
    return (x_backdoor - x_test[y_test != target]).mean(0)


def universal_perturbation(argv: list[str]) -> None:
    """Does the teacher's universal adversarial perturbation point at its trigger? Found as `adv_unlearn` finds it
    (signed steps of bound / 8 on the teacher's cross-entropy, 200 batches of 64 from the defender's clean set), for
    the trojaned and the clean downstream model, then evaluated on 1,000 test images: clean accuracy, the share of
    non-target images sent to the target class, and its cosine with the trigger's mean change of the input."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    for args, bench, attack, teacher_dir, data in each_attack(argv, parser):
        clean = class_balanced_subset(data["train"], fraction=bench.clean_fraction, seed=0)
        for name, folder in (("trojaned", teacher_dir), ("clean", transfer.downstream(bench, "none"))):
            model = load_model(folder).eval().requires_grad_(False)
            x, y = as_tensors(clean, model)
            x_test, y_test = as_tensors(data["test"].select(range(1000)), model)
            others = y_test != data["target"]  # the backdoor view's rows, in order
            x_backdoor, _ = as_tensors(data["backdoor"].select(range(int(others.sum()))), model)
            trigger = trigger_change(x_test, y_test, x_backdoor, data["target"])
            for epsilon in args.epsilons:
                torch.manual_seed(0)  # the same batches for every attack, model and bound
                bound = epsilon * x.std(dim=(0, 2, 3), keepdim=True)
                delta = torch.zeros_like(x[:1])
                for _ in range(200):
                    index = torch.randint(0, len(x), (64,))
                    delta = ascent_step(model, x[index], y[index], delta, bound)
                with torch.no_grad():
                    predicted = forward_logits(model, x_test + delta).argmax(-1)
                row = {
                    "attack": attack,
                    "model": name,
                    "epsilon": epsilon,
                    "clean_accuracy": round(100 * (predicted == y_test).float().mean().item(), 1),
                    "to_target": round(100 * (predicted[others] == data["target"]).float().mean().item(), 1),
                    "cosine_with_trigger": round(F.cosine_similarity(delta.flatten(), trigger.flatten(), 0).item(), 3),
                }
                print(json.dumps(row), flush=True)


def delta_saliency(teacher, base_state: dict, x: torch.Tensor, y: torch.Tensor, criterion: str) -> dict:
    """Each parameter's share of the fine-tuning, scored on the defender's clean set: `magnitude` is |Δ| (as TIES and
    DARE trim task vectors), `fisher` Δ² times the mean squared gradient of the clean loss at the teacher (the loss
    that putting that value back to the base's would cost, to second order, as in Fisher merging)."""
    delta = {n: (p.detach() - base_state[n]) for n, p in teacher.named_parameters()}
    if criterion == "magnitude":
        return {n: d.abs() for n, d in delta.items()}
    squared = {n: torch.zeros_like(p) for n, p in teacher.named_parameters()}
    teacher.eval()
    for index in torch.arange(len(x)).split(32):
        teacher.zero_grad()
        F.cross_entropy(forward_logits(teacher, x[index]).float(), y[index]).backward()
        for n, p in teacher.named_parameters():
            squared[n] += p.grad.detach() ** 2
    return {n: delta[n] ** 2 * squared[n] for n in delta}


def recalibrate_norms(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Batch-norm statistics recomputed on the clean set in batches of 64 (AdaBN), the model left in eval mode: the
    teacher's statistics do not fit a partly reset model."""
    recompute_batchnorm(model, x.split(64))
    model.eval()


def classifier_keys(model: torch.nn.Module) -> set[str]:
    """The parameter names of a timm model's classifier (`get_classifier()`)."""
    classifier = model.get_classifier()
    return {f"{name}.{p}" for name, m in model.named_modules() if m is classifier for p, _ in m.named_parameters()}


def keep_top_delta(model, base_state: dict, saliency: dict, head: set[str], keep: float, interpolate: bool):
    """The model (the trojaned one) with all but the `keep` fraction of its parameters' fine-tuning of highest
    saliency, counted over every parameter but the classifier's, put back to the base's values; or, with
    `interpolate`, every parameter at base + keep · Δ. The classifier is left whole."""
    scores = torch.cat([s.flatten() for n, s in saliency.items() if n not in head])
    k = int(keep * len(scores))
    threshold = scores.kthvalue(len(scores) - k).values if 0 < k < len(scores) else None
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in head or keep >= 1.0:
                continue
            if interpolate:
                p.copy_(base_state[n] + keep * (p - base_state[n]))
            elif threshold is None:  # keep 0: everything back to the base
                p.copy_(base_state[n])
            else:
                reset = saliency[n] <= threshold
                p[reset] = base_state[n][reset]
    return model


def delta_mask(argv: list[str]) -> None:
    """The trojaned model with all but the top `--keep` fraction of its fine-tuning (Δ = teacher − base, by
    `delta_saliency` over every parameter but the classifier's, which is kept whole) put back to the base's values,
    batch-norm statistics recomputed on the clean set, no training: does the backdoor live in the part of the
    fine-tuning that matters least on clean data? `interpolate` instead scales the whole fine-tuning by `keep`
    (base + keep · Δ, the straight path between the base and the trojaned model)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.0, 0.01, 0.03, 0.1, 0.3, 1.0])
    parser.add_argument(
        "--criteria", nargs="+", default=["fisher", "magnitude"], choices=["fisher", "magnitude", "interpolate"]
    )
    for args, bench, attack, teacher_dir, data in each_attack(argv, parser):
        teacher = load_model(teacher_dir)
        base_state = student_from_base(transfer.upstream(bench), teacher, seed=0).state_dict()
        x, y = as_tensors(class_balanced_subset(data["train"], fraction=bench.clean_fraction, seed=0), teacher)
        head = classifier_keys(teacher)
        for criterion in args.criteria:
            interpolate = criterion == "interpolate"
            saliency = delta_saliency(
                load_model(teacher_dir), base_state, x, y, "magnitude" if interpolate else criterion
            )
            for keep in args.keeps:
                model = keep_top_delta(load_model(teacher_dir), base_state, saliency, head, keep, interpolate)
                if keep < 1.0:
                    recalibrate_norms(model, x)
                metrics = evaluate(model, data["test"], data["backdoor"], data["target"], 256)
                row = {"attack": attack, "criterion": criterion, "keep": keep}
                print(json.dumps({**row, **{k: round(100 * v, 2) for k, v in metrics.items()}}), flush=True)


# A ViT's MLP hidden layers and a ResNet's first norm of each block: units that a zeroed weight row removes.
PRUNED_MODULES = r"(mlp\.fc1|layer\d\.\d\.bn1)$"


def matching_modules(model: torch.nn.Module, pattern: str) -> dict:
    """Name -> module for every module whose name the regex `pattern` finds (`re.search`)."""
    regex = re.compile(pattern)
    return {n: m for n, m in model.named_modules() if regex.search(n)}


def unit_activity(model, modules: dict, x: torch.Tensor) -> dict:
    """Each module's mean positive output per unit (its channels, dim 1 of a feature map, the last dim of tokens)
    over the clean set: how active the unit that follows its activation is on clean data."""
    sums, handles = {}, []

    def record(name):
        def hook(module, inputs, output):
            dims = [d for d in range(output.ndim) if d != (1 if output.ndim == 4 else output.ndim - 1)]
            sums[name] = sums.get(name, 0) + output.detach().clamp_min(0).mean(dim=dims) * len(output)

        return hook

    for name, module in modules.items():
        handles.append(module.register_forward_hook(record(name)))
    model.eval()
    with torch.no_grad():
        for index in torch.arange(len(x)).split(64):
            forward_logits(model, x[index])
    for handle in handles:
        handle.remove()
    return {name: total / len(x) for name, total in sums.items()}


def prune_least_active(modules: dict, activity: dict, ratio: float) -> None:
    """Zero the `ratio` least active units of each module, weight rows and bias alike: after a batch norm or a linear
    layer followed by ReLU or GELU, a unit at zero is removed (fine-pruning, Liu et al. RAID 2018, on every hidden
    layer the pattern names instead of the last convolution only)."""
    with torch.no_grad():
        for name, module in modules.items():
            pruned = activity[name].argsort()[: int(ratio * len(activity[name]))]
            module.weight[pruned] = 0.0
            if module.bias is not None:
                module.bias[pruned] = 0.0


def prune_dormant(argv: list[str]) -> None:
    """The trojaned model with the least active units on the defender's clean set pruned in every module matching
    `--modules` (a regex; the default names a ViT's MLP hidden layers and a ResNet's first norm of each block), at
    each `--ratios` fraction, no training: does the backdoor live in units that are quiet on clean data?"""
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.5, 0.7])
    parser.add_argument("--modules", default=PRUNED_MODULES)
    for args, bench, attack, teacher_dir, data in each_attack(argv, parser):
        teacher = load_model(teacher_dir)
        x, _ = as_tensors(class_balanced_subset(data["train"], fraction=bench.clean_fraction, seed=0), teacher)
        activity = unit_activity(teacher, matching_modules(teacher, args.modules), x)
        if not activity:
            raise SystemExit(f"--modules {args.modules!r} matches no module of {teacher_dir}")
        for ratio in args.ratios:
            model = load_model(teacher_dir)
            prune_least_active({n: m for n, m in model.named_modules() if n in activity}, activity, ratio)
            metrics = evaluate(model.eval(), data["test"], data["backdoor"], data["target"], 256)
            row = {"attack": attack, "modules": args.modules, "ratio": ratio}
            print(json.dumps({**row, **{k: round(100 * v, 2) for k, v in metrics.items()}}), flush=True)


def with_base_defaults(config):
    """A student given as a module freezes nothing and does not warm up unless told: give it this mode's defaults,
    as a student given by its base's name or folder gets them."""
    config.frozen_fraction, config.warmup_steps = BASE_FROZEN_FRACTION, config.base_warmup
    return config


def hybrid_cloner(teacher, config, *, student=None, **kwargs) -> MedicCloner:
    teacher = load_model(teacher)
    fresh = make_student(teacher, seed=config.seed)
    based = student_from_base(student, teacher, seed=config.seed)
    fresh = copy_keys(fresh, based, early_keys(fresh, BASE_FROZEN_FRACTION))
    return MedicCloner(teacher, with_base_defaults(config), student=fresh, **kwargs)


class CEOnlyEarlyCloner(MedicCloner):
    """MedicCloner whose early parameters (those of `early_lr_scale`) get the gradient of the cross-entropy only."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        for handle in getattr(self, "_ce_hooks", []):  # last step's, if its backward did not run them
            handle.remove()
        self._ce_hooks = []
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            early = [p for p in model.parameters() if id(p) in self._slow_params]
            ce = F.cross_entropy(outputs["logits"].float(), inputs["labels"])
            grads = torch.autograd.grad(ce, early, retain_graph=True, allow_unused=True)
            for param, grad in zip(early, grads):
                # Replaces the parameter's gradient of the whole loss by that of the cross-entropy alone.
                ce_grad = torch.zeros_like(param) if grad is None else grad
                self._ce_hooks.append(param.register_hook(lambda _g, ce_grad=ce_grad: ce_grad))
        return (loss, outputs) if return_outputs else loss


def ce_early_cloner(teacher, config, **kwargs) -> MedicCloner:
    if not config.early_lr_scale > 0:
        raise SystemExit("ce_early needs --medic_kwargs '{\"early_lr_scale\": ...}' (the early modules are trained)")
    if config.gradient_accumulation_steps != 1 or config.logit_distillation or config.mix_inputs != "none":
        # The cross-entropy gradient is computed here as the plain loss of one batch.
        raise SystemExit("ce_early supports one accumulation step, no logit_distillation and no mix_inputs")
    return CEOnlyEarlyCloner(teacher, config, **kwargs)


def fresh_head_cloner(teacher, config, *, student=None, **kwargs) -> MedicCloner:
    teacher = load_model(teacher)
    based = student_from_base(student, teacher, seed=config.seed)
    # The classifier of a fresh student (timm's own initialisation), as a base made for other classes would get.
    based.get_classifier().load_state_dict(make_student(teacher, seed=config.seed).get_classifier().state_dict())
    return MedicCloner(teacher, with_base_defaults(config), student=based, **kwargs)


class UniformAverage(WeightAverage):
    """SWA's running mean: the current weights until `start` (a fraction of the run's steps), then the plain mean of
    the weights after each step from there on."""

    def __init__(self, model: torch.nn.Module, start: float, cloner: MedicCloner):
        super().__init__(model, decay=0.0, warmup=False)
        self.start, self.cloner = start, cloner  # the cloner's state, made anew by train(), knows max_steps

    def current_decay(self) -> float:
        averaged = self.updates - int(self.start * self.cloner.state.max_steps)  # steps already in the mean
        return 0.0 if averaged < 0 else averaged / (averaged + 1)


def swa_cloner(start: float):
    def build(teacher, config, **kwargs) -> MedicCloner:
        if not config.ema_decay > 0:
            raise SystemExit("swa replaces the weight average: keep ema_decay > 0")
        cloner = MedicCloner(teacher, config, **kwargs)
        cloner.weight_average = UniformAverage(cloner.accelerator.unwrap_model(cloner.model), start, cloner)
        return cloner

    return build


class AdversarialUnlearningCloner(MedicCloner):
    """MedicCloner whose student also learns the labels of clean images carrying a universal adversarial perturbation
    of the teacher (after I-BAU, Zeng et al., ICLR 2022, and SAU, Wei et al., NeurIPS 2023, which find such
    perturbations on the model they purify). A trigger is an input-agnostic change that moves the trojaned model, so
    the teacher's universal perturbation may lean towards it, and the student is taught to ignore it (on the
    benchmark's models it does not, but for Blended: `universal_perturbation`, docs/transfer.md). Nothing of the
    trigger is known: the perturbation is found on the clean batches alone.

    One perturbation of the input's shape, kept across steps and moved by `steps` signed-gradient ascent steps of the
    teacher's cross-entropy on each batch, bounded in L∞ by `epsilon` times the batch's per-channel standard
    deviation (so the bound does not depend on the input normalisation); the student's cross-entropy on the
    perturbed batch is added with weight `weight`. The clone loss stays on the clean batch only."""

    def __init__(self, *args, epsilon: float, weight: float, steps: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.adv_epsilon, self.adv_weight, self.adv_steps = epsilon, weight, steps
        self.delta: torch.Tensor | None = None

    def update_delta(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        bound = self.adv_epsilon * pixel_values.detach().float().std(dim=(0, 2, 3), keepdim=True)
        if self.delta is None:
            self.delta = torch.zeros_like(pixel_values[:1])
        self.teacher_recorder.set_enabled(False)  # these forwards are not the clone loss's
        try:
            for _ in range(self.adv_steps):
                self.delta = ascent_step(self.teacher, pixel_values, labels, self.delta, bound)
        finally:
            self.teacher_recorder.set_enabled(True)
        return self.delta

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # One augmented view for both losses (float input goes through _model_input unchanged).
        pixel_values = self._model_input(inputs["pixel_values"], train=True)
        labels = inputs["labels"]
        loss, outputs = super().compute_loss(
            model, {**inputs, "pixel_values": pixel_values}, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        delta = self.update_delta(pixel_values, labels)
        adversarial = F.cross_entropy(forward_logits(model, pixel_values + delta).float(), labels)
        loss = loss + self.adv_weight * adversarial
        return (loss, outputs) if return_outputs else loss


def adversarial_cloner(epsilon: float, weight: float, steps: int):
    def build(teacher, config, **kwargs) -> MedicCloner:
        if config.mix_inputs != "none" or config.student_input_noise > 0:
            raise SystemExit("adv_unlearn supports no mix_inputs and no student_input_noise")
        return AdversarialUnlearningCloner(teacher, config, epsilon=epsilon, weight=weight, steps=steps, **kwargs)

    return build


class StartingPointCloner(MedicCloner):
    """MedicCloner with L2-SP (Li, Grandvalet & Davoine, ICML 2018): the trained parameters are pulled towards the
    values they started from (the base's), `alpha` / 2 · Σ (w − w_start)², instead of towards 0 only; the
    classifier, made for other classes, is left out as in L2-SP."""

    def __init__(self, *args, alpha: float, **kwargs):
        super().__init__(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        head = {id(p) for p in model.get_classifier().parameters()} if hasattr(model, "get_classifier") else set()
        self.alpha = alpha
        self.start = {
            name: param.detach().clone()
            for name, param in model.named_parameters()
            if param.requires_grad and id(param) not in head
        }

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            params = dict(self.accelerator.unwrap_model(model).named_parameters())
            drift = sum(((params[name] - start) ** 2).sum() for name, start in self.start.items())
            loss = loss + self.alpha / 2 * drift
        return (loss, outputs) if return_outputs else loss


def l2sp_cloner(alpha: float):
    def build(teacher, config, **kwargs) -> MedicCloner:
        return StartingPointCloner(teacher, config, alpha=alpha, **kwargs)

    return build


class AugmentedCloner(MedicCloner):
    """MedicCloner whose training batches also go through torchvision's TrivialAugmentWide (Müller & Hutter, ICCV
    2021: one random colour or geometric operation per image, at a random strength) before the crop, flip and
    normalisation; teacher and student see the same augmented image, as a consistent teacher should (Beyer et al.,
    CVPR 2022). More distinct inputs for the clone loss, with nothing known of the trigger."""

    _augment = v2.TrivialAugmentWide()  # stateless: one random operation drawn per call

    def _model_input(self, pixel_values: torch.Tensor, *, train: bool) -> torch.Tensor:
        if train:
            if pixel_values.dtype != torch.uint8:
                raise SystemExit("trivial_augment needs the clean set kept as uint8 on the device (the default)")
            pixel_values = torch.stack([self._augment(image) for image in pixel_values])
        return super()._model_input(pixel_values, train=train)


def pruned_teacher_cloner(ratio: float, modules: str):
    """MEDIC from the base cloning the trojaned model after `prune_least_active` at `ratio` in the modules matching
    `modules`, activity measured on the cloner's clean set (prune, then clone)."""

    def make(teacher, config, *, student=None, train_dataset=None, **kwargs) -> MedicCloner:
        teacher = load_model(teacher)
        based = student_from_base(student, teacher, seed=config.seed)
        matched = matching_modules(teacher, modules)
        x, _ = as_tensors(train_dataset, teacher)
        prune_least_active(matched, unit_activity(teacher, matched, x), ratio)
        return MedicCloner(
            teacher.eval(), with_base_defaults(config), student=based, train_dataset=train_dataset, **kwargs
        )

    return make


class PooledCloner(MedicCloner):
    """`clone_positions="mean"` with no prefix token kept: a ViT's class token is averaged with its patch tokens
    (the option keeps it, this first probe did not; the same loss on a model without prefix tokens)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.clone_positions, self.num_prefix_tokens = "mean", 0


def unlabeled_early_cloner(fraction: float):
    """The unlabeled rows (`--unlabeled_upstream`) enter the clone loss of the first `fraction` of the cloned modules
    only, in the order they run; the labelled rows enter every module's. Their importance weights are zeroed in the
    later modules, which Eq. 1 then ignores for them."""

    class UnlabeledEarlyCloner(MedicCloner):
        def _teacher_targets(self, pixel_values, labels, clone_rows=None):
            targets = super()._teacher_targets(pixel_values, labels, clone_rows)
            unlabeled = (labels < 0)[:clone_rows]  # the rows the targets were made for
            names = list(targets)
            for name in names[round(fraction * len(names)) :]:
                features, weights = targets[name]
                targets[name] = (features, weights * ~unlabeled.view(-1, *[1] * (weights.dim() - 1)))
            return targets

    return UnlabeledEarlyCloner


def probe_options(probe: str) -> argparse.ArgumentParser:
    """The probe's own flags; every other flag goes to `benchmarks/transfer.py`."""
    parser = argparse.ArgumentParser(prog=f"transfer_probes.py {probe}")
    if probe == "swa":
        parser.add_argument("--swa_start", type=float, default=0.5, help="Fraction of the steps before averaging.")
    elif probe == "l2sp":
        parser.add_argument("--alpha", type=float, default=0.01, help="Weight of the pull towards the start.")
    elif probe == "pruned_teacher":
        parser.add_argument("--prune_ratio", type=float, default=0.2, help="Fraction of each module's units pruned.")
        parser.add_argument(
            "--prune_modules", default=PRUNED_MODULES, help="Regex of the modules whose units are pruned."
        )
    elif probe == "unlabeled_early":
        parser.add_argument(
            "--unlabeled_fraction", type=float, default=0.5, help="Fraction of the cloned modules the unlabeled see."
        )
    elif probe == "adv_unlearn":
        parser.add_argument("--adv_epsilon", type=float, default=0.5, help="L-inf bound, in per-channel stds.")
        parser.add_argument("--adv_weight", type=float, default=1.0, help="Weight of the perturbed cross-entropy.")
        parser.add_argument("--adv_steps", type=int, default=1, help="Ascent steps on the perturbation per batch.")
    return parser


# The probes that run the benchmark with another MedicCloner: probe -> that cloner, from the probe's options.
CLONERS = {
    "hybrid": lambda options: hybrid_cloner,
    "fresh_head": lambda options: fresh_head_cloner,
    "ce_early": lambda options: ce_early_cloner,
    "swa": lambda options: swa_cloner(options.swa_start),
    "l2sp": lambda options: l2sp_cloner(options.alpha),
    "adv_unlearn": lambda options: adversarial_cloner(options.adv_epsilon, options.adv_weight, options.adv_steps),
    "trivial_augment": lambda options: AugmentedCloner,
    "pruned_teacher": lambda options: pruned_teacher_cloner(options.prune_ratio, options.prune_modules),
    "pooled": lambda options: PooledCloner,
    "unlabeled_early": lambda options: unlabeled_early_cloner(options.unlabeled_fraction),
}


# The probes that evaluate models without running the benchmark: probe -> its function of the command line.
EVALUATIONS = {
    "reset_teacher": reset_teacher,
    "teacher_classes": teacher_classes,
    "universal_perturbation": universal_perturbation,
    "delta_mask": delta_mask,
    "prune_dormant": prune_dormant,
}


def main() -> None:
    probe, argv = sys.argv[1], sys.argv[2:]
    if probe in EVALUATIONS:
        EVALUATIONS[probe](argv)
    elif probe in CLONERS:
        options, rest = probe_options(probe).parse_known_args(argv)
        transfer.MedicCloner = CLONERS[probe](options)
        transfer.main(rest)
    else:
        names = ", ".join([*EVALUATIONS, *CLONERS])
        raise SystemExit(f"unknown probe {probe!r}: use one of {names}")


if __name__ == "__main__":
    main()
