"""Transfer-learned teachers: the student starts from the trusted pretrained base, not from noise."""

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import ViTForImageClassification

from medic_hf import MedicCloner, MedicConfig
from medic_hf.config import BASE_FROZEN_FRACTION
from medic_hf.importance import layer_clone_loss, pooled_clone_loss
from medic_hf.modeling import save_native, student_from_base
from medic_hf.neurons import attention_modules, freeze_early_modules, prefix_tokens
from medic_hf.scripts import clone
from tests.conftest import calibrate, pixel_dataset
from tests.tiny_models import hf_swin, hf_vit, timm_convnext, timm_resnet, timm_swin, timm_vit

ROOT = Path(__file__).resolve().parents[1]

FIXTURE = str(ROOT / "tests" / "fixtures" / "cifar_tiny")


def fine_tuned(base: torch.nn.Module, teacher: torch.nn.Module) -> torch.nn.Module:
    """The teacher as if fine-tuned from `base`: the base's weights, a little moved, and its own classifier."""
    teacher_state = teacher.state_dict()
    with torch.no_grad():
        for key, value in base.state_dict().items():
            if teacher_state[key].shape == value.shape and value.is_floating_point():
                teacher_state[key].copy_(value + 0.01 * torch.randn_like(value))
    return teacher.eval()


def config(tmp_path, **overrides) -> MedicConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=8,
        save_strategy="no",
        disable_tqdm=True,
        max_accuracy_drop=None,
    )
    return MedicConfig(**{**values, **overrides})


@pytest.mark.parametrize("family", ["timm", "transformers"])
def test_the_student_starts_from_a_local_base_with_a_fresh_classifier(family, tmp_path):
    torch.manual_seed(0)
    if family == "timm":
        base, teacher = timm_resnet(num_classes=5), timm_resnet()
    else:
        base, teacher = hf_vit(num_labels=5), hf_vit()
    base_dir = tmp_path / "base"
    save_native(base, base_dir)
    teacher = fine_tuned(base, teacher)
    cloner = MedicCloner(teacher, config(tmp_path), train_dataset=pixel_dataset(16), student=str(base_dir))
    student, base_state = cloner.model, base.state_dict()
    head = set(student.fresh_classifier)
    assert head and all(base_state[k].shape != student.state_dict()[k].shape for k in head)
    for key, value in student.state_dict().items():
        if key not in head:
            assert torch.equal(value, base_state[key]), key  # the base's weights, not the teacher's
    assert cloner.student_base == ("base", None)
    cloner.train()
    cloner.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Student initialisation" in card and "`base`" in card and str(tmp_path) not in card
    assert f"The student's first {len(cloner.frozen_modules)} modules (`" in card and cloner.frozen_modules


def test_a_base_with_the_teachers_classes_keeps_its_classifier():
    base = timm_resnet()
    teacher = fine_tuned(base, timm_resnet())
    student = student_from_base(base, teacher)
    assert student.fresh_classifier == [] and torch.equal(student.fc.weight, base.fc.weight)
    assert student.fc.weight.data_ptr() != base.fc.weight.data_ptr()


def test_a_base_of_another_architecture_is_refused_naming_the_parameter():
    teacher = timm_resnet()
    with pytest.raises(ValueError, match="not the teacher's architecture"):
        student_from_base(timm_convnext(), teacher)
    wider = timm_resnet(channels=(16, 32, 64, 256))
    with pytest.raises(ValueError, match=r"does not fit the teacher at layer4\..*shape"):
        student_from_base(wider, teacher)
    vit = ViTForImageClassification(hf_vit().config)
    with pytest.raises(ValueError, match="not the teacher's architecture"):
        student_from_base(vit, teacher)


def test_frozen_modules_stay_at_the_base_and_the_rest_trains(tmp_path):
    torch.manual_seed(0)
    base = timm_resnet(num_classes=5)
    teacher = fine_tuned(base, timm_resnet())
    args = config(tmp_path, freeze_modules="conv1|bn1|layer1\\..*", learning_rate=0.1, ema_decay=0.0)
    cloner = MedicCloner(teacher, args, train_dataset=pixel_dataset(16), student=student_from_base(base, teacher))
    cloner.train()
    after, before = cloner.model.state_dict(), base.state_dict()
    trainable = {name for name, p in cloner.model.named_parameters() if p.requires_grad}
    for name, _ in cloner.model.named_parameters():
        frozen = name.startswith(("conv1.", "bn1.", "layer1."))
        assert (name not in trainable) == frozen, name
        if frozen:
            assert torch.equal(after[name], before[name]), name
    assert any(not torch.equal(after[n], before[n]) for n in trainable if n in before and "layer4" in n)


def test_freeze_early_modules_stops_at_the_hand_counted_module():
    resnet = timm_resnet()  # 31 conv / norm / linear modules: int(0.25 * 31) = 7 frozen, through layer1.0.conv1
    frozen = freeze_early_modules(resnet, 0.25)
    assert frozen == ["conv1.0", "conv1.1", "conv1.3", "conv1.4", "conv1.6", "bn1", "layer1.0.conv1"]
    trained = [name for name, p in resnet.named_parameters() if p.requires_grad]
    assert trained[0] == "layer1.0.bn1.weight" and "conv1.0.weight" not in trained and "fc.weight" in trained
    vit = hf_vit()  # 11 modules: the patch projection and the first query projection, and the tokens before them
    assert freeze_early_modules(vit, 0.25) == [
        "vit.embeddings.patch_embeddings.projection",
        "vit.layers.0.attention.q_proj",
    ]
    frozen_params = [name for name, p in vit.named_parameters() if not p.requires_grad]
    assert frozen_params[:2] == ["vit.embeddings.cls_token", "vit.embeddings.position_embeddings"]
    assert frozen_params[-1] == "vit.layers.0.attention.q_proj.bias" and len(frozen_params) == 6
    assert freeze_early_modules(timm_resnet(), 0.0) == []
    with pytest.raises(ValueError, match=r"frozen_fraction=1.0: use a value in \[0, 1\)"):
        freeze_early_modules(timm_resnet(), 1.0)


def test_a_base_started_student_freezes_its_early_modules_by_default(tmp_path):
    torch.manual_seed(0)
    base, teacher = timm_resnet(num_classes=5), timm_resnet()
    save_native(base, tmp_path / "base")
    teacher = fine_tuned(base, teacher)
    cloner = MedicCloner(teacher, config(tmp_path), train_dataset=pixel_dataset(16), student=str(tmp_path / "base"))
    expected = int(BASE_FROZEN_FRACTION * 31)
    assert len(cloner.frozen_modules) == expected and not set(cloner.frozen_modules) & set(cloner.cloned_modules)
    assert cloner.cloned_modules[0] == "layer1.0.bn1"
    fresh = MedicCloner(teacher, config(tmp_path), train_dataset=pixel_dataset(16))  # the paper: nothing frozen
    assert fresh.frozen_modules == [] and all(p.requires_grad for p in fresh.model.parameters())
    kept = MedicCloner(
        teacher, config(tmp_path, frozen_fraction=0.0), train_dataset=pixel_dataset(16), student=str(tmp_path / "base")
    )
    assert kept.frozen_modules == [] and all(p.requires_grad for p in kept.model.parameters())
    assert cloner.args.warmup_steps == 0.1 and fresh.args.warmup_steps == 0 and kept.args.warmup_steps == 0.1
    chosen = MedicCloner(
        teacher, config(tmp_path, warmup_steps=3), train_dataset=pixel_dataset(16), student=str(tmp_path / "base")
    )
    assert chosen.args.warmup_steps == 3  # the user's warmup is kept
    with pytest.raises(ValueError, match="Give frozen_fraction or freeze_modules, not both"):
        config(tmp_path, frozen_fraction=0.5, freeze_modules=["layer1"])


def test_attention_modules_are_the_projections_inside_attention_layers():
    timm_names = attention_modules(timm_vit())
    assert {"blocks.1.attn.qkv", "blocks.1.attn.proj"} <= set(timm_names)
    assert not any("mlp" in name or "norm1" in name for name in timm_names)
    vit = hf_vit()  # transformers names them q_proj ... o_proj, or query ... output.dense in older versions
    hf_names = attention_modules(vit)
    assert len(hf_names) >= 4 and set(hf_names) == {n for n, _ in vit.named_modules() if ".attention." in n}
    assert {"layers.1.blocks.0.attn.qkv", "layers.1.blocks.0.attn.proj"} <= set(attention_modules(timm_swin()))
    hf_swin_names = attention_modules(hf_swin())  # SwinAttention, windowed, with its relative position bias
    assert any(name.endswith("attention.q_proj") or name.endswith("self.query") for name in hf_swin_names)
    assert not any("intermediate" in name or "layernorm" in name for name in hf_swin_names)
    assert attention_modules(timm_resnet()) == [] and attention_modules(timm_convnext()) == []


@pytest.mark.parametrize("make", [timm_vit, hf_vit, timm_swin, hf_swin])
def test_a_base_started_vit_or_swin_clones_no_attention_layer_unless_told(make, tmp_path):
    """This mode's default leaves the attention projections out of the clone loss (they still train); the paper's
    student, built without a base, clones them, and so does `clone_attention=True`."""
    torch.manual_seed(0)
    base, teacher = make(), make()
    save_native(base, tmp_path / "base")
    teacher = fine_tuned(base, teacher)
    attention = set(attention_modules(teacher))
    data = pixel_dataset(16)
    default = MedicCloner(teacher, config(tmp_path), train_dataset=data, student=str(tmp_path / "base"))
    told = MedicCloner(
        teacher, config(tmp_path, clone_attention=True), train_dataset=data, student=str(tmp_path / "base")
    )
    paper = MedicCloner(teacher, config(tmp_path), train_dataset=data)
    assert not attention & set(default.cloned_modules)
    assert default.hyperparameters()["attention_modules_not_cloned"] == len(attention)  # on the card
    assert told.hyperparameters()["attention_modules_not_cloned"] == 0
    assert attention & set(told.cloned_modules) and attention & set(paper.cloned_modules)
    assert set(told.cloned_modules) - set(default.cloned_modules) == attention & set(told.cloned_modules)
    trained = {n for n, p in default.model.named_parameters() if p.requires_grad}
    assert any(".attn." in n or ".attention." in n for n in trained)  # left out of the loss, not frozen


def test_clone_attention_changes_nothing_on_a_model_without_attention(tmp_path):
    torch.manual_seed(0)
    base, teacher = timm_resnet(num_classes=5), timm_resnet()
    save_native(base, tmp_path / "base")
    teacher = fine_tuned(base, teacher)
    clones = [
        MedicCloner(
            teacher,
            config(tmp_path, clone_attention=flag),
            train_dataset=pixel_dataset(16),
            student=str(tmp_path / "base"),
        ).cloned_modules
        for flag in (None, True)
    ]
    assert clones[0] == clones[1]


def test_early_lr_scale_trains_and_clones_the_early_modules_slower(tmp_path):
    torch.manual_seed(0)
    base, teacher = timm_resnet(num_classes=5), timm_resnet()
    save_native(base, tmp_path / "base")
    teacher = fine_tuned(base, teacher)
    args = config(tmp_path, early_lr_scale=0.1, learning_rate=0.02, ema_decay=0.0)
    cloner = MedicCloner(teacher, args, train_dataset=pixel_dataset(16), student=str(tmp_path / "base"))
    assert cloner.frozen_modules == [] and all(p.requires_grad for p in cloner.model.parameters())
    assert cloner.cloned_modules[0] == "conv1.0"  # the stem is cloned again
    cloner.train()
    by_name = {id(p): name for name, p in cloner.model.named_parameters()}
    groups = {by_name[id(p)]: group["initial_lr"] for group in cloner.optimizer.param_groups for p in group["params"]}
    assert groups["conv1.0.weight"] == pytest.approx(0.002) and groups["layer1.0.conv1.weight"] == pytest.approx(0.002)
    assert groups["layer1.0.bn1.weight"] == pytest.approx(0.02) and groups["fc.weight"] == pytest.approx(0.02)
    assert len(groups) == len(list(cloner.model.parameters()))  # every parameter in exactly one group
    with pytest.raises(ValueError, match=r"early_lr_scale=2: use a value in \[0, 1\]"):
        config(tmp_path, early_lr_scale=2)
    with pytest.raises(ValueError, match="with freeze_modules, give early_lr_scale=0"):
        config(tmp_path, early_lr_scale=0.1, freeze_modules=["layer1"])


def test_a_freeze_pattern_matching_nothing_is_refused_before_training(tmp_path):
    base = timm_resnet(num_classes=5)
    with pytest.raises(ValueError, match="freeze_modules='stem' matches no module"):
        teacher = fine_tuned(base, timm_resnet())
        MedicCloner(teacher, config(tmp_path, freeze_modules="stem"), student=student_from_base(base, teacher))


def test_the_recipe_takes_student_name_or_path(tmp_path):
    torch.manual_seed(0)
    base, teacher = timm_resnet(num_classes=5), timm_resnet()
    save_native(base, tmp_path / "base")
    save_native(fine_tuned(base, calibrate(teacher, pixel_dataset(8))), tmp_path / "teacher")
    results = clone.main(
        ["--model_name_or_path", str(tmp_path / "teacher"), "--student_name_or_path", str(tmp_path / "base")]
        + ["--dataset_name", FIXTURE, "--image_size", "32", "--max_steps", "2", "--output_dir", str(tmp_path / "out")]
        + ["--save_strategy", "no", "--disable_tqdm", "true", "--allow_accuracy_drop", "true"]
        + ["--max_eval_samples", "20", "--clean_fraction", "1.0"]
    )
    assert results["student_base"] == "base" and results["steps"] == 2 and results["model"] == "teacher"
    saved = (tmp_path / "out" / "results.json").read_text()
    assert json.loads(saved)["student_base"] == "base" and str(tmp_path) not in saved  # uploaded with the model
    assert "## Student initialisation" in (tmp_path / "out" / "README.md").read_text()


def test_transfer_benchmark_end_to_end_on_the_fixture(tmp_path):
    """benchmarks/transfer.py on the tiny fixture: base, trojaned fine-tune, MEDIC from the base with its backdoor
    trajectory, fine-tuning the base alone, a report; a second call resumes (nothing is trained again)."""
    from tests.conftest import benchmark_script

    transfer = benchmark_script("transfer")
    fixture = Path(__file__).resolve().parent / "fixtures" / "cifar_tiny"
    argv = [
        "--dataset_name", str(fixture), "--upstream_epochs", "1", "--downstream_epochs", "1",
        "--attacks", "badnets", "--methods", "medic_base", "ft_base", "--seeds", "0", "--clean_fraction", "0.5",
        "--medic_epochs", "2", "--eval_every", "1", "--trace_samples", "10",
        "--poison_args", """--model_kwargs {"channels":[8,8,8,8]} --per_device_train_batch_size 25""",
        "--models_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    summary = transfer.main(argv)
    assert set(summary) == {"medic_base", "ft_base"}
    cell = json.loads((tmp_path / "out" / "cells" / "badnets" / "medic_base" / "seed0.json").read_text())
    assert [round(p["epoch"]) for p in cell["trajectory"]] == [1, 2]
    assert {"clean_accuracy", "attack_success_rate"} <= set(cell["trajectory"][0])
    assert cell["clean_samples"] == 25  # half of the fixture's 50 downstream training images
    assert (tmp_path / "models" / "upstream" / "metrics.json").exists()
    results = (tmp_path / "out" / "results.md").read_text()
    assert "`medic_base`" in results and "`ft_base`" in results
    stamp = (tmp_path / "out" / "cells" / "badnets" / "medic_base" / "seed0.json").stat().st_mtime
    transfer.main(argv)  # resumes: the finished cell is kept as it is
    assert (tmp_path / "out" / "cells" / "badnets" / "medic_base" / "seed0.json").stat().st_mtime == stamp

    # Another setting of a baseline is its own tagged cell, with the fields it ran with.
    other = [*argv[: argv.index("--methods") + 1], "ft_base", *argv[argv.index("--seeds") :]]
    adamw = {"optim": "adamw_torch", "coupled_weight_decay": False, "learning_rate": 0.001}
    transfer.main([*other, "--baseline_kwargs", json.dumps(adamw), "--tag", "adamw"])
    tagged = json.loads((tmp_path / "out" / "cells" / "badnets" / "ft_base-adamw" / "seed0.json").read_text())
    assert tagged["baseline_kwargs"] == adamw

    # A run of another attack adds its column to the report and keeps the columns it had.
    transfer.main([*other[: other.index("badnets")], "blended", *other[other.index("badnets") + 1 :]])
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(report["ft_base"]) == {"badnets", "blended"} and set(report["medic_base"]) == {"badnets"}
    narrowed = transfer.main([*other, "--report_only"])  # a report asked for one column gets that column
    assert set(narrowed["ft_base"]) == {"badnets"}

    # Unlabeled upstream images for the MEDIC-style runs: a tagged setting of its own, recorded in the cell.
    medic = [*argv[: argv.index("--methods") + 1], "medic_base", *argv[argv.index("--seeds") :]]
    with pytest.raises(SystemExit, match="--tag"):
        transfer.main([*medic, "--unlabeled_upstream", "10"])
    transfer.main([*medic, "--unlabeled_upstream", "10", "--tag", "unl10"])
    cell = json.loads((tmp_path / "out" / "cells" / "badnets" / "medic_base-unl10" / "seed0.json").read_text())
    assert cell["unlabeled_upstream"] == 10 and len(cell["trajectory"]) == 2


def test_ce_early_probe_gives_the_early_parameters_the_cross_entropy_gradient_alone(tmp_path):
    """benchmarks/transfer_probes.py ce_early: the early parameters' gradient is the cross-entropy's, computed here
    by hand on the same batch; the later parameters keep the whole loss's (cross-entropy + λ · clone loss)."""
    import torch.nn.functional as F

    from tests.conftest import benchmark_script

    probes = benchmark_script("transfer_probes")
    torch.manual_seed(0)
    base, teacher = timm_resnet(num_classes=5), timm_resnet()
    save_native(base, tmp_path / "base")
    args = config(tmp_path, early_lr_scale=1.0, learning_rate=0.02, ema_decay=0.0, max_steps=1)
    cloner = probes.ce_early_cloner(fine_tuned(base, teacher), args, train_dataset=pixel_dataset(16),
                                    student=str(tmp_path / "base"))  # fmt: skip
    cloner.train()  # the importance statistics, and one step
    model, batch = cloner.model.train(), next(iter(cloner.get_train_dataloader()))
    early = [p for p in model.parameters() if id(p) in cloner._slow_params]
    late = [p for p in model.parameters() if id(p) not in cloner._slow_params]
    assert early and late

    model.zero_grad()
    cloner.compute_loss(model, batch).backward()
    got = [p.grad.clone() for p in model.parameters()]
    for handle in cloner._ce_hooks:
        handle.remove()

    model.zero_grad()
    loss, outputs = MedicCloner.compute_loss(cloner, model, batch, return_outputs=True)
    ce_grads = torch.autograd.grad(F.cross_entropy(outputs["logits"].float(), batch["labels"]), early,
                                   retain_graph=True, allow_unused=True)  # fmt: skip
    loss.backward()
    by_id = dict(zip(map(id, model.parameters()), got))
    for param, ce_grad in zip(early, ce_grads):
        expected = torch.zeros_like(param) if ce_grad is None else ce_grad
        assert torch.allclose(by_id[id(param)], expected, atol=1e-6)
    assert not all(torch.allclose(by_id[id(p)], p.grad) for p in early)  # the clone loss did reach them
    assert all(torch.allclose(by_id[id(p)], p.grad, atol=1e-6) for p in late)
    with pytest.raises(SystemExit, match="early_lr_scale"):
        probes.ce_early_cloner(teacher, config(tmp_path), student=str(tmp_path / "base"))


def test_swa_probe_saves_the_plain_mean_of_the_second_half(tmp_path):
    """benchmarks/transfer_probes.py swa: with 4 steps and swa_start 0.5 the student left after training is the mean
    of its weights after steps 3 and 4 (norm statistics included), recorded here step by step."""
    from transformers import TrainerCallback

    from tests.conftest import benchmark_script

    class Snapshots(TrainerCallback):
        def __init__(self):
            self.states = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.states.append({k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()})

    probes = benchmark_script("transfer_probes")
    torch.manual_seed(0)
    base, teacher = timm_resnet(num_classes=5), timm_resnet()
    save_native(base, tmp_path / "base")
    snapshots = Snapshots()
    cloner = probes.swa_cloner(0.5)(fine_tuned(base, teacher), config(tmp_path, max_steps=4, ema_decay=0.5),
                                    train_dataset=pixel_dataset(16), student=str(tmp_path / "base"),
                                    callbacks=[snapshots])  # fmt: skip
    cloner.train()
    assert len(snapshots.states) == 4
    final = cloner.model.state_dict()
    for name, third in snapshots.states[2].items():
        assert torch.allclose(final[name], (third + snapshots.states[3][name]) / 2, atol=1e-6), name
    assert not torch.allclose(snapshots.states[2]["fc.weight"], snapshots.states[3]["fc.weight"])  # it did train
    with pytest.raises(SystemExit, match="ema_decay"):
        probes.swa_cloner(0.5)(teacher, config(tmp_path, ema_decay=0.0), student=str(tmp_path / "base"))


def test_adv_unlearn_probe_steps_the_universal_perturbation_and_adds_its_cross_entropy(tmp_path):
    """benchmarks/transfer_probes.py adv_unlearn: from zero, one step moves the perturbation by bound / 8 times the
    sign of the teacher's cross-entropy gradient (computed here by hand), it never leaves ±epsilon × the batch's
    per-channel std, and the loss is MEDIC's plus weight × the student's cross-entropy on the perturbed batch."""
    import torch.nn.functional as F

    from medic_hf.modeling import forward_logits
    from tests.conftest import benchmark_script

    probes = benchmark_script("transfer_probes")
    torch.manual_seed(0)
    base, teacher = timm_resnet(num_classes=5), timm_resnet()
    save_native(base, tmp_path / "base")
    args = config(tmp_path, max_steps=1, clone_loss_weight=1e-6)  # the untrained models' clone loss is ~1e6
    cloner = probes.adversarial_cloner(0.5, 2.0, 1)(fine_tuned(base, teacher), args, train_dataset=pixel_dataset(16),
                                                    student=str(tmp_path / "base"))  # fmt: skip
    cloner.train()  # the importance statistics, and one step (the perturbation moved once)
    batch = next(iter(cloner.get_train_dataloader()))
    x, y = batch["pixel_values"], batch["labels"]
    bound = 0.5 * x.std(dim=(0, 2, 3), keepdim=True)

    cloner.delta = None
    zero = torch.zeros_like(x[:1]).requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(forward_logits(cloner.teacher, x + zero), y), zero)
    assert torch.allclose(cloner.update_delta(x, y), bound / 8 * grad.sign())
    for _ in range(12):
        delta = cloner.update_delta(x, y)
    assert (delta.abs() <= bound + 1e-6).all() and torch.isclose(delta.abs().amax(), bound.amax())

    model = cloner.model.train()
    torch.manual_seed(1)
    got = cloner.compute_loss(model, batch)
    moved = cloner.delta  # the step this loss took
    torch.manual_seed(1)
    medic = MedicCloner.compute_loss(cloner, model, batch)
    expected = medic + 2.0 * F.cross_entropy(forward_logits(model, x + moved), y)
    assert torch.allclose(got, expected, rtol=1e-5)
    assert not torch.allclose(got, medic)


def test_trivial_augment_probe_augments_each_training_image_before_the_crop(tmp_path):
    """benchmarks/transfer_probes.py trivial_augment: in training each uint8 image goes through the augmentation, one
    call per image, before the device transform; evaluation batches do not; float batches are refused."""
    from tests.conftest import benchmark_script

    probes = benchmark_script("transfer_probes")
    calls = []

    class Recorder(probes.AugmentedCloner):
        def __init__(self):  # only _model_input is exercised: no Trainer is built
            self._augment = lambda image: calls.append(image.clone()) or 255 - image
            self.device_transform = lambda images, train: images.float()
            self.args = MedicConfig(output_dir=str(tmp_path), augment=False)

    cloner = Recorder()
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(cloner._model_input(images, train=True), (255 - images).float())
    assert len(calls) == 3 and torch.equal(calls[1], images[1])
    assert torch.equal(cloner._model_input(images, train=False), images.float()) and len(calls) == 3
    with pytest.raises(SystemExit, match="uint8"):
        cloner._model_input(images.float(), train=True)


def test_l2sp_probe_adds_the_pull_towards_the_starting_weights(tmp_path):
    """benchmarks/transfer_probes.py l2sp: the loss is MEDIC's plus alpha / 2 times the squared distance of the trained
    parameters from their starting (base) values, the classifier and the frozen modules left out; moving one weight
    by 0.5 adds alpha / 2 · 0.25."""
    from tests.conftest import benchmark_script

    probes = benchmark_script("transfer_probes")
    torch.manual_seed(0)
    base, teacher = timm_resnet(num_classes=5), timm_resnet()
    save_native(base, tmp_path / "base")
    args = config(tmp_path, max_steps=1, clone_loss_weight=1e-6)  # the untrained models' clone loss is ~1e6
    cloner = probes.l2sp_cloner(0.4)(fine_tuned(base, teacher), args, train_dataset=pixel_dataset(16),
                                     student=str(tmp_path / "base"))  # fmt: skip
    cloner.train()  # the importance statistics, and one step; then back to the starting weights
    model = cloner.model.train()
    with torch.no_grad():
        for name, start in cloner.start.items():
            model.get_parameter(name).copy_(start)
    assert "fc.weight" not in cloner.start and "conv1.0.weight" not in cloner.start  # classifier; frozen stem
    assert "layer4.0.conv2.weight" in cloner.start
    batch = next(iter(cloner.get_train_dataloader()))
    torch.manual_seed(1)
    medic = MedicCloner.compute_loss(cloner, model, batch)
    torch.manual_seed(1)
    assert torch.allclose(cloner.compute_loss(model, batch), medic)  # at the start: no pull
    with torch.no_grad():
        model.get_parameter("layer4.0.conv2.weight")[0, 0, 0, 0] += 0.5
        model.get_parameter("fc.weight")[0, 0] += 3.0  # the classifier: not pulled
    torch.manual_seed(1)
    medic = MedicCloner.compute_loss(cloner, model, batch)
    torch.manual_seed(1)
    assert torch.allclose(cloner.compute_loss(model, batch) - medic, torch.tensor(0.4 / 2 * 0.25), atol=1e-5)


def test_trigger_change_compares_each_backdoor_image_with_its_own_clean_image():
    """benchmarks/transfer_probes.py universal_perturbation: the backdoor view leaves the target class out, so its
    rows are the non-target test images; a constant stamp comes back exactly, whatever the images."""
    from tests.conftest import benchmark_script

    probes = benchmark_script("transfer_probes")
    torch.manual_seed(0)
    x_test, y_test = torch.randn(6, 3, 4, 4), torch.tensor([0, 1, 0, 2, 3, 0])
    stamp = torch.randn(3, 4, 4)
    x_backdoor = x_test[y_test != 0] + stamp
    assert torch.allclose(probes.trigger_change(x_test, y_test, x_backdoor, target=0), stamp, atol=1e-6)


class TinyClassifier(torch.nn.Module):
    """A two-layer classifier with a batch norm, naming its classifier as timm does (`get_classifier`)."""

    def __init__(self):
        super().__init__()
        self.body, self.norm = torch.nn.Linear(2, 3, bias=False), torch.nn.BatchNorm1d(3)
        self.head = torch.nn.Linear(3, 2)

    def get_classifier(self):
        return self.head

    def forward(self, x):
        return self.head(self.norm(self.body(x)))


def test_delta_saliency_is_the_squared_change_times_the_summed_squared_gradient():
    """benchmarks/transfer_probes.py delta_mask: one sample, a linear model: the gradient of the cross-entropy is
    (softmax - one-hot) times the input, so the Fisher score is Δ² times its square, and the magnitude score |Δ|."""
    from tests.conftest import benchmark_script

    probes = benchmark_script("transfer_probes")
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    base = {"weight": torch.tensor([[0.5, 0.0], [0.0, 1.0]])}
    x, y = torch.tensor([[1.0, 3.0]]), torch.tensor([0])
    p = torch.softmax(torch.tensor([1.0, 6.0]), dim=0)
    grad = torch.outer(p - torch.tensor([1.0, 0.0]), x[0])
    delta = torch.tensor([[0.5, 0.0], [0.0, 1.0]])
    fisher = probes.delta_saliency(model, base, x, y, "fisher")["weight"]
    assert torch.allclose(fisher, delta**2 * grad**2, atol=1e-6)
    assert torch.equal(probes.delta_saliency(model, base, x, y, "magnitude")["weight"], delta)


def test_keep_top_delta_keeps_the_most_salient_changes_and_the_classifier():
    """Twelve changed parameters outside the classifier: six norm ones of saliency 0.5, six body weights of 1..6.
    Keeping a quarter keeps the three highest (k = int(0.25 * 12)); the classifier's change is kept whatever its
    saliency; interpolation scales every change but the classifier's."""
    from tests.conftest import benchmark_script

    probes = benchmark_script("transfer_probes")
    torch.manual_seed(0)
    teacher = TinyClassifier()
    base = {n: torch.zeros_like(p) for n, p in teacher.named_parameters()}
    saliency = {n: torch.zeros_like(p) for n, p in teacher.named_parameters()}
    saliency["body.weight"] = torch.arange(1.0, 7.0).reshape(3, 2)
    saliency["norm.weight"] = saliency["norm.bias"] = torch.full((3,), 0.5)  # below every body weight
    head = probes.classifier_keys(teacher)
    assert head == {"head.weight", "head.bias"}
    original = {n: p.detach().clone() for n, p in teacher.named_parameters()}

    model = probes.keep_top_delta(copy_of(teacher), base, saliency, head, 0.25, False)
    expected_body = original["body.weight"] * (saliency["body.weight"] > 3)
    assert torch.equal(model.body.weight, expected_body)
    assert torch.equal(model.norm.weight, torch.zeros(3)) and torch.equal(model.head.weight, original["head.weight"])

    halfway = probes.keep_top_delta(copy_of(teacher), base, saliency, head, 0.5, True)
    assert torch.allclose(halfway.body.weight, 0.5 * original["body.weight"])
    assert torch.equal(halfway.head.bias, original["head.bias"])


def copy_of(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model)


def test_recalibrate_norms_sets_the_batch_norm_statistics_to_the_clean_sets():
    """The running mean and (unbiased) variance become those of the whole clean set, over batches of 64."""
    from tests.conftest import benchmark_script

    probes = benchmark_script("transfer_probes")
    torch.manual_seed(0)
    model = TinyClassifier()
    x = torch.randn(100, 2)
    probes.recalibrate_norms(model, x)
    features = model.body(x).detach()
    first, second = features[:64], features[64:]
    assert not model.training
    assert torch.allclose(model.norm.running_mean, (first.mean(0) + second.mean(0)) / 2, atol=1e-5)
    assert torch.allclose(model.norm.running_var, (first.var(0) + second.var(0)) / 2, atol=1e-5)


def test_prune_least_active_zeroes_the_quietest_units_of_each_module():
    """benchmarks/transfer_probes.py prune_dormant: a unit's activity is its mean positive output over the clean set
    (tokens: the last dimension); pruning a third of three units zeroes the weight row and bias of the quietest."""
    from tests.conftest import benchmark_script

    probes = benchmark_script("transfer_probes")
    layer = torch.nn.Linear(2, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
        layer.bias.zero_()
    model = torch.nn.Sequential(layer)
    x = torch.tensor([[[2.0, 1.0], [-1.0, 3.0]]])  # one image of two tokens
    activity = probes.unit_activity(model, {"0": layer}, x)["0"]
    # unit outputs per token: (2, 1, -2) and (-1, 3, 1); positive parts averaged over the two tokens
    assert torch.allclose(activity, torch.tensor([1.0, 2.0, 0.5]))
    probes.prune_least_active({"0": layer}, {"0": activity}, 1 / 3)
    assert torch.equal(layer.weight[2], torch.zeros(2)) and layer.bias[2] == 0
    assert torch.equal(layer.weight[:2], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_pooled_clone_loss_compares_each_channels_mean_over_its_positions():
    """clone_positions="mean": two tokens x two channels, teacher [[1, 2], [3, 4]], student 0, σ 1, weights
    [[.1, .2], [.3, .4]]: channel means 2 and 3, channel weights .4 and .6, so .4·4 + .6·9 = 7.0 (the per-position
    loss would be .1 + .8 + 2.7 + 6.4 = 10.0); a (B, C) layer keeps Eq. 1."""
    teacher, std = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), torch.ones(1, 1, 2)
    weights = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    assert torch.allclose(pooled_clone_loss(teacher, torch.zeros_like(teacher), std, weights), torch.tensor([7.0]))
    assert torch.allclose(layer_clone_loss(teacher, torch.zeros_like(teacher), std, weights), torch.tensor([10.0]))
    flat, flat_std = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.0]])
    assert torch.allclose(
        pooled_clone_loss(flat, torch.zeros_like(flat), flat_std, weights[:, :2]), torch.tensor([0.1 * 1 + 0.2 * 1])
    )


def test_pooled_clone_loss_keeps_the_class_token_per_position():
    """A class token [5, 6] with weights [.5, .5] before the two tokens of the test above: .5·25 + .5·36 = 30.5 for
    the class token, plus 7.0 for the averaged tokens; with no prefix token, the mean over three tokens (3, 4) with
    channel weights .9 and 1.1: .9·9 + 1.1·16 = 25.7. An image layer (B, C, H, W) has no tokens to keep."""
    teacher, std = torch.tensor([[[5.0, 6.0], [1.0, 2.0], [3.0, 4.0]]]), torch.ones(1, 1, 2)
    weights = torch.tensor([[0.5, 0.5, 0.1, 0.2, 0.3, 0.4]])
    student = torch.zeros_like(teacher)
    assert torch.allclose(pooled_clone_loss(teacher, student, std, weights, 1), torch.tensor([37.5]))
    assert torch.allclose(pooled_clone_loss(teacher, student, std, weights, 0), torch.tensor([25.7]))
    image, image_std = torch.arange(8.0).reshape(1, 2, 2, 2), torch.ones(1, 2, 1, 1)
    image_weights, zeros = torch.ones(1, 8), torch.zeros_like(image)
    # channel means 1.5 and 5.5, channel weights 4: 4 · (2.25 + 30.25) = 130, prefix or not
    assert torch.allclose(pooled_clone_loss(image, zeros, image_std, image_weights, 1), torch.tensor([130.0]))


@pytest.mark.parametrize("make, prefix", [(timm_vit, 1), (hf_vit, 1), (timm_swin, 0), (timm_resnet, 0)])
def test_clone_positions_mean_keeps_the_teachers_prefix_tokens(make, prefix, tmp_path, monkeypatch):
    """The cloner counts the teacher's class tokens and passes them to the pooled loss, which its step uses."""
    import medic_hf.cloner

    torch.manual_seed(0)
    teacher = make()
    calls = []

    def spy(teacher_f, student_f, std, weights, num_prefix_tokens):
        calls.append(num_prefix_tokens)
        return pooled_clone_loss(teacher_f, student_f, std, weights, num_prefix_tokens)

    monkeypatch.setattr(medic_hf.cloner, "pooled_clone_loss", spy)
    cloner = MedicCloner(teacher, config(tmp_path, clone_positions="mean"), train_dataset=pixel_dataset(16))
    assert prefix_tokens(teacher) == prefix
    cloner.train()
    assert calls and set(calls) == {prefix}
    assert cloner.hyperparameters()["clone_positions"] == "mean"


def test_a_base_started_student_clones_channel_means_by_default(tmp_path):
    """clone_positions=None: 'mean' from a base, 'each' (the paper's Eq. 1) without one, with neuron statistics, or
    when told; the card says which."""
    torch.manual_seed(0)
    base, teacher = timm_resnet(num_classes=5), timm_resnet()
    save_native(base, tmp_path / "base")
    teacher, data, start = fine_tuned(base, teacher), pixel_dataset(16), str(tmp_path / "base")

    def resolved(student=None, **overrides):
        cloner = MedicCloner(teacher, config(tmp_path, **overrides), train_dataset=data, student=student)
        assert cloner.hyperparameters()["clone_positions"] == cloner.clone_positions
        return cloner.clone_positions

    assert resolved(start) == "mean"
    assert resolved() == "each"
    assert resolved(start, stats_granularity="neuron") == "each"
    assert resolved(start, clone_positions="each") == "each"


def test_clone_positions_mean_needs_channel_statistics():
    with pytest.raises(ValueError, match="stats_granularity='channel'"):
        MedicConfig(output_dir="unused", clone_positions="mean", stats_granularity="neuron")
    with pytest.raises(ValueError, match="choose one of"):
        MedicConfig(output_dir="unused", clone_positions="pixel")


def test_pooled_probe_trains_a_swin_from_its_base(tmp_path):
    from tests.conftest import benchmark_script

    probes = benchmark_script("transfer_probes")
    torch.manual_seed(0)
    base, teacher = timm_swin(num_classes=5), timm_swin()
    save_native(base, tmp_path / "base")
    cloner = probes.PooledCloner(fine_tuned(base, teacher), config(tmp_path), train_dataset=pixel_dataset(16),
                                 student=str(tmp_path / "base"))  # fmt: skip
    cloner.train()
    batch = next(iter(cloner.get_train_dataloader()))
    model = cloner.model.train()
    torch.manual_seed(1)
    pooled = cloner.compute_loss(model, batch)
    cloner.layer_clone_loss = layer_clone_loss  # Eq. 1 at every position, on this instance only
    torch.manual_seed(1)
    plain = cloner.compute_loss(model, batch)
    assert torch.isfinite(pooled) and pooled < plain  # a mean over positions is matched more easily than each one


def test_transfer_compare_tables_two_methods_on_the_seeds_both_have(tmp_path):
    """benchmarks/transfer_compare.py: method A at seeds 0, 1, 2 and B at 0, 1; only seeds 0 and 1 count. A: acc .80
    and .82, ASR .10 and .20, DER .90 and .80, trajectories [.3, .1] and [.1, .2] (seed means .2, .15: peak 20.0);
    B: acc .78 both, ASR .05, DER .95, no trajectory. Accuracy change 78.00 − 81.00 = −3.00."""
    from tests.conftest import benchmark_script

    compare = benchmark_script("transfer_compare")
    folder = tmp_path / "set"
    values = {
        ("A", 0): (0.80, 0.10, 0.90, [0.3, 0.1]),
        ("A", 1): (0.82, 0.20, 0.80, [0.1, 0.2]),
        ("A", 2): (0.10, 0.90, 0.10, [0.9, 0.9]),
        ("B", 0): (0.78, 0.05, 0.95, []),
        ("B", 1): (0.78, 0.05, 0.95, []),
    }
    for (method, seed), (acc, asr, der, trajectory) in values.items():
        cell = {
            "attack": "blended",
            "method": method,
            "seed": seed,
            "before": {"clean_accuracy": 0.9, "attack_success_rate": 1.0},
            "after": {"clean_accuracy": acc, "attack_success_rate": asr},
            "der": der,
            "trajectory": [{"attack_success_rate": v} for v in trajectory],
        }
        path = folder / "cells" / "blended" / method / f"seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cell))
    text = compare.main(["--set", "S", str(folder), "A", "B", "--output", str(tmp_path / "out")])
    assert "| S | blended | 90.00 / 100.0 | 81.00 / 15.0 (20.0) — 85.0 | 78.00 / 5.0 — 95.0 | 2 |" in text
    assert "| S | 1 | -3.00 | 85.0 | 95.0 |" in text
    assert json.loads((tmp_path / "out.json").read_text())[0]["seeds"] == [0, 1]


def test_transfer_benchmark_split_train_gives_each_task_its_own_half(tmp_path):
    """--split_train: the base trains on the first half of the training split and the downstream models and the
    defender's clean set come from the second, so the two tasks may share classes; without it, shared classes are
    refused before anything trains."""
    from medic_hf.data import load_image_dataset
    from tests.conftest import benchmark_script

    transfer = benchmark_script("transfer")
    fixture = Path(__file__).resolve().parent / "fixtures" / "cifar_tiny"
    argv = [
        "--dataset_name", str(fixture), "--upstream_classes", "0", "1", "2", "--downstream_classes", "2", "1", "0",
        "--upstream_epochs", "1", "--downstream_epochs", "1", "--attacks", "badnets", "--methods", "ft_base",
        "probe_base", "--seeds", "0", "--clean_fraction", "0.5",
        "--poison_args", """--model_kwargs {"channels":[8,8,8,8]} --per_device_train_batch_size 25""",
        "--models_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    with pytest.raises(SystemExit, match="share \\[0, 1, 2\\].*--split_train"):
        transfer.main(argv)
    assert not (tmp_path / "models").exists()

    transfer.main([*argv, "--split_train"])
    labels = load_image_dataset(str(fixture))["train"]["label"]
    first, second = (sum(label in (0, 1, 2) for label in half) for half in (labels[:50], labels[50:]))
    assert (first, second) == (18, 12)  # counted by hand in the fixture
    upstream = json.loads((tmp_path / "models" / "upstream" / "metrics.json").read_text())
    trojaned = json.loads((tmp_path / "models" / "badnets" / "metrics.json").read_text())
    assert upstream["train_rows"] == first and trojaned["train_rows"] == second
    for method in ("ft_base", "probe_base"):
        cell = json.loads((tmp_path / "out" / "cells" / "badnets" / method / "seed0.json").read_text())
        assert cell["clean_samples"] == 6  # half of the second half's 12, class-balanced


def test_linear_probe_keeps_the_base_and_solves_the_penalised_logistic_regression():
    """probe_base: every weight and statistic of the base stays as it was; the fresh classifier sits at the optimum of
    cross-entropy + l2·|W|² on the base's frozen features, where that objective's gradient vanishes."""
    from tests.conftest import benchmark_script

    transfer = benchmark_script("transfer")
    torch.manual_seed(0)
    base = calibrate(timm_resnet(num_classes=5), pixel_dataset(24))
    before = {k: v.clone() for k, v in base.state_dict().items() if not k.startswith("fc.")}
    clean = pixel_dataset(24, num_classes=3, seed=1)
    probed = transfer.linear_probe(base, clean, num_classes=3, l2=1e-2)

    after = probed.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert probed.fc.out_features == 3 and not probed.training
    features, labels = transfer.pre_logits(probed, clean)
    weight, bias = (p.detach().clone().requires_grad_(True) for p in (probed.fc.weight, probed.fc.bias))
    loss = torch.nn.functional.cross_entropy(features @ weight.T + bias, labels) + 1e-2 * weight.square().sum()
    loss.backward()
    assert weight.grad.abs().max() < 1e-4 and bias.grad.abs().max() < 1e-4
    assert loss < torch.log(torch.tensor(3.0))  # better than the zero start, which predicts every class alike
