"""MedicCloner across architectures (timm, transformers, plain PyTorch): student, hooks, training, saving."""

import pytest
import torch
from torch import nn

from medic_hf import MedicCloner, MedicConfig
from medic_hf.modeling import forward_logits
from medic_hf.neurons import layer_kind
from tests.conftest import calibrate, pixel_dataset
from tests.tiny_models import ALL_TINY_MODELS


def make_config(tmp_path, **overrides) -> MedicConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        num_train_epochs=3,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    values.update(overrides)
    return MedicConfig(**values)


def called_modules(model, pixel_values) -> set[str]:
    """Names of conv / norm / linear modules whose forward runs, found with our own spy hooks."""
    fired, handles = set(), []
    for name, module in model.named_modules():
        if name and layer_kind(module) is not None:
            handles.append(module.register_forward_hook(lambda m, i, o, name=name: fired.add(name)))
    with torch.no_grad():
        forward_logits(model, pixel_values)
    for handle in handles:
        handle.remove()
    return fired


@pytest.mark.parametrize("name", sorted(ALL_TINY_MODELS))
def test_architecture_matrix(name, tmp_path):
    torch.manual_seed(1234)  # not the cloner's seed: the student must not re-create the teacher's initialisation
    data = pixel_dataset(16)
    teacher = calibrate(ALL_TINY_MODELS[name](), data)
    reference = {k: v.clone() for k, v in teacher.state_dict().items()}
    cloner = MedicCloner(teacher, make_config(tmp_path), train_dataset=data)
    student = cloner.model

    # A fresh instance of the teacher's own class, same keys and shapes, no parameter copied.
    assert type(student) is type(teacher)
    student_state = student.state_dict()
    assert list(student_state) == list(reference)
    assert all(student_state[k].shape == reference[k].shape for k in reference)
    for key, param in student.named_parameters():
        if param.numel() > 1:
            assert not torch.equal(param.detach(), reference[key]), key

    # Hooks sit on every conv / norm / linear module that runs in the forward pass, but the classifier
    # (clone_logits=False by default; LeViT's distilled model averages two) and outputs with no batch dimension
    # (timm's relative-position table).
    classifiers = set(cloner.teacher_recorder.result_modules)
    assert len(classifiers) == (2 if name == "timm_levit" else 1)
    batch_free = set(cloner.teacher_recorder.batch_free)
    assert bool(batch_free) == (name == "timm_vit_relpos"), batch_free
    expected = called_modules(teacher, data[:2]["pixel_values"]) - classifiers - batch_free
    assert set(cloner.teacher_recorder.modules) == expected
    assert set(cloner.student_recorder.modules) == expected

    cloner.train()
    losses = [log["loss"] for log in cloner.state.log_history if "loss" in log]
    clone_losses = [log["clone_loss"] for log in cloner.state.log_history if "clone_loss" in log]
    assert len(losses) == 6
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    assert clone_losses[-1] < clone_losses[0], clone_losses

    # The teacher is untouched and every hook is removed at the end.
    assert all(torch.equal(teacher.state_dict()[k], reference[k]) for k in reference)
    cloner.remove_hooks()
    for model in (teacher, student):
        assert all(not m._forward_hooks for m in model.modules())


def test_norm_outputs_are_captured_before_in_place_activations(tmp_path):
    """timm resnet: BN outputs feed an in-place ReLU and `x += shortcut`; the captured values keep their sign."""
    data = pixel_dataset(8)
    teacher = calibrate(ALL_TINY_MODELS["timm_resnet"](), data)
    cloner = MedicCloner(teacher, make_config(tmp_path), train_dataset=data)
    forward_logits(cloner.teacher, data[:4]["pixel_values"])
    captured = cloner.teacher_recorder.pop()
    assert (captured["bn1"] < 0).any()  # would be >= 0 had the in-place ReLU overwritten it
    bn = teacher.bn1
    with torch.no_grad():
        expected = bn(teacher.conv1(data[:4]["pixel_values"]))
    assert torch.allclose(captured["bn1"], expected, atol=1e-5)
    cloner.remove_hooks()


def test_bn_act_modules_are_captured_after_norm_before_activation(tmp_path):
    import timm

    data = pixel_dataset(8)
    teacher = calibrate(ALL_TINY_MODELS["timm_bnact_se"](), data)
    cloner = MedicCloner(teacher, make_config(tmp_path), train_dataset=data)
    names = [n for n, m in teacher.named_modules() if isinstance(m, timm.layers.BatchNormAct2d)]
    assert names and set(names) <= set(cloner.teacher_recorder.modules)
    module = dict(teacher.named_modules())[names[0]]
    inputs = {}
    handle = module.register_forward_hook(lambda m, i, o: inputs.setdefault("x", i[0].clone()))
    forward_logits(cloner.teacher, data[:2]["pixel_values"])
    handle.remove()
    captured = cloner.teacher_recorder.pop()[names[0]]
    expected = nn.functional.batch_norm(
        inputs["x"], module.running_mean, module.running_var, module.weight, module.bias, False, 0.0, module.eps
    )
    assert torch.allclose(captured, expected, atol=1e-5)
    cloner.remove_hooks()


def test_weights_of_a_sample_do_not_depend_on_its_batch(tmp_path):
    data = pixel_dataset(8)
    teacher = calibrate(ALL_TINY_MODELS["plain_wrn"](), data)
    cloner = MedicCloner(teacher, make_config(tmp_path), train_dataset=data)
    cloner.stats = cloner.compute_statistics()
    batch = data[:8]
    full = cloner._teacher_targets(batch["pixel_values"], batch["labels"])
    for size in (1, 3):
        part = cloner._teacher_targets(batch["pixel_values"][:size], batch["labels"][:size])
        for name in full:
            assert torch.allclose(part[name][1], full[name][1][:size], atol=1e-6), name
    cloner.remove_hooks()


def test_plain_cloning_makes_student_activations_approach_the_teacher(tmp_path):
    """importance='none' (uniform weights) and enough steps: the student's neurons match the teacher's."""
    torch.manual_seed(1234)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4)).eval()
    data = pixel_dataset(32, num_classes=4, size=2)
    config = make_config(
        tmp_path,
        importance="none",
        clone_logits=True,
        num_train_epochs=300,
        learning_rate=1e-2,
        clone_loss_weight=10.0,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        per_device_train_batch_size=32,
        logging_steps=50,
    )
    cloner = MedicCloner(teacher, config, train_dataset=data)

    def relative_error():
        x = data[:32]["pixel_values"]
        with torch.no_grad():
            forward_logits(cloner.teacher, x)
            t = cloner.teacher_recorder.pop()
            cloner.student_recorder.set_enabled(True)
            forward_logits(cloner.model, x)
            s = cloner.student_recorder.pop()
            cloner.student_recorder.set_enabled(False)
        return max(((t[k] - s[k]).norm() / t[k].norm()).item() for k in t)

    before = relative_error()
    cloner.train()
    after = relative_error()
    assert before > 0.5
    assert after < 0.05, (before, after)
    cloner.remove_hooks()


def test_logs_cross_entropy_clone_loss_and_importance_diagnostics(tmp_path):
    data = pixel_dataset(16)
    teacher = calibrate(ALL_TINY_MODELS["plain_wrn"](), data)
    cloner = MedicCloner(teacher, make_config(tmp_path, num_train_epochs=1), train_dataset=data)
    cloner.train()
    log = next(log for log in cloner.state.log_history if "loss" in log)
    assert {"ce_loss", "clone_loss", "importance/support_activation", "importance/support_impact"} <= set(log)
    assert log["loss"] == pytest.approx(log["ce_loss"] + 10 * log["clone_loss"], rel=1e-3)
    lines = (tmp_path / "out" / "importance_diagnostics.jsonl").read_text().splitlines()
    assert lines and "layers" in lines[0]
    cloner.remove_hooks()


def test_dropout_is_off_while_cloning_and_restored(tmp_path):
    data = pixel_dataset(8)
    teacher = calibrate(ALL_TINY_MODELS["timm_vit"](drop_rate=0.1, drop_path_rate=0.1), data)
    cloner = MedicCloner(teacher, make_config(tmp_path, num_train_epochs=1), train_dataset=data)
    seen = []

    def spy(module, inputs, output):
        seen.append(module.p)

    dropouts = [m for m in cloner.model.modules() if isinstance(m, nn.Dropout)]
    handles = [m.register_forward_hook(spy) for m in dropouts]
    cloner.train()
    for handle in handles:
        handle.remove()
    assert seen and all(p == 0 for p in seen)
    assert any(m.p == 0.1 for m in dropouts)
    cloner.remove_hooks()


def test_coupled_weight_decay_adam_is_the_default(tmp_path):
    data = pixel_dataset(8)
    cloner = MedicCloner(calibrate(ALL_TINY_MODELS["plain_wrn"](), data), make_config(tmp_path), train_dataset=data)
    optimizer = cloner.create_optimizer()
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.param_groups[0]["weight_decay"] == pytest.approx(1e-4)
    cloner.remove_hooks()


def test_config_defaults_follow_the_paper_but_two():
    config = MedicConfig(output_dir="x")
    assert config.clone_loss_weight == 10 and config.temperature == 5 and config.importance == "both"
    assert config.learning_rate == 1e-2 and config.weight_decay == 1e-4 and config.num_train_epochs == 30
    assert config.per_device_train_batch_size == 64 and str(config.lr_scheduler_type.value) == "cosine"
    assert config.remove_unused_columns is False and config.hook_layers == ["conv", "norm", "linear"]
    # the two defaults that are not the paper's: logits not cloned (docs/removal.md), 30 epochs (docs/benchmarks.md)
    assert config.clone_logits is False and config.num_train_epochs == 30
    with pytest.raises(ValueError, match="importance"):
        MedicConfig(output_dir="x", importance="sharp")
    with pytest.raises(ValueError, match="hook_layers"):
        MedicConfig(output_dir="x", hook_layers=["attention"])


def test_bf16_autocast_keeps_the_loss_in_fp32(tmp_path):
    data = pixel_dataset(16)
    teacher = calibrate(ALL_TINY_MODELS["plain_wrn"](), data)
    cloner = MedicCloner(
        teacher, make_config(tmp_path, num_train_epochs=1, bf16=True, use_cpu=True), train_dataset=data
    )
    cloner.train()
    losses = [log["loss"] for log in cloner.state.log_history if "loss" in log]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    cloner.remove_hooks()


@pytest.mark.parametrize("importance", ["both", "activation", "impact", "none"])
def test_every_importance_mode_trains_at_zero_and_positive_temperature(importance, tmp_path):
    data = pixel_dataset(8)
    teacher = calibrate(ALL_TINY_MODELS["plain_wrn"](), data)
    for temperature in (0.0, 5.0):
        config = make_config(tmp_path, num_train_epochs=1, importance=importance, temperature=temperature)
        cloner = MedicCloner(teacher, config, train_dataset=data)
        cloner.train()
        assert cloner.needs_teacher_grad == (importance in ("both", "impact") and temperature > 0)
        assert all(torch.isfinite(torch.tensor(log["loss"])) for log in cloner.state.log_history if "loss" in log)
        cloner.remove_hooks()


@pytest.mark.parametrize("name", sorted(ALL_TINY_MODELS))
def test_clone_logits_false_leaves_out_exactly_the_classifier(name, tmp_path):
    data = pixel_dataset(4)
    teacher = calibrate(ALL_TINY_MODELS[name](), data)
    with_logits = MedicCloner(teacher, make_config(tmp_path, clone_logits=True), train_dataset=data)
    without = MedicCloner(teacher, make_config(tmp_path), train_dataset=data)  # the default
    left_out = set(with_logits.teacher_recorder.modules) - set(without.teacher_recorder.modules)
    assert set(without.teacher_recorder.modules) < set(with_logits.teacher_recorder.modules)
    assert len(left_out) == (2 if name == "timm_levit" else 1)  # LeViT's distilled model averages two heads
    for classifier in left_out:
        module = with_logits.teacher_recorder.modules[classifier]
        assert isinstance(module, nn.Linear) and module.out_features == 10
        assert classifier not in without.student_recorder.modules and classifier not in without.channel_dims
    assert without.hyperparameters()["clone_logits"] is False
    for cloner in (with_logits, without):
        cloner.remove_hooks()


@pytest.mark.parametrize("name", ["timm_swin", "hf_levit"])
def test_weights_of_a_sample_in_a_windowed_model_are_over_its_own_rows(name, tmp_path):
    """Swin's attention outputs batch x windows rows, LeViT's BatchNorm batch x tokens: a sample's importance
    weights (two softmaxes over all its rows) and its clone loss do not depend on the rest of the batch."""
    data = pixel_dataset(8)
    teacher = calibrate(ALL_TINY_MODELS[name](), data)
    cloner = MedicCloner(teacher, make_config(tmp_path), train_dataset=data)
    grouped = {n: k for n, k in cloner.rows_per_sample.items() if k > 1}
    assert grouped, cloner.rows_per_sample
    cloner.stats = cloner.compute_statistics()
    batch = data[:8]
    full = cloner._teacher_targets(batch["pixel_values"], batch["labels"])
    for name_, rows in grouped.items():
        f, w = full[name_]
        assert f.shape[:2] == (8, rows) and w.shape == (8, f[0].numel())
    for size in (1, 3):
        part = cloner._teacher_targets(batch["pixel_values"][:size], batch["labels"][:size])
        for module in full:
            assert torch.allclose(part[module][1], full[module][1][:size], atol=1e-6), module
    cloner.remove_hooks()

    # Each softmax is over all of a sample's rows: one criterion alone sums to 1 per sample, not per window.
    for importance in ("activation", "impact"):
        single = MedicCloner(teacher, make_config(tmp_path, importance=importance), train_dataset=data)
        single.stats = single.compute_statistics()
        targets = single._teacher_targets(batch["pixel_values"], batch["labels"])
        for name_ in grouped:
            assert torch.allclose(targets[name_][1].sum(dim=1), torch.ones(8), atol=1e-5), (importance, name_)
        single.remove_hooks()


def test_batch_free_outputs_are_left_out_and_logged(tmp_path, caplog):
    """timm's relative-position MLP computes a table from parameters only: no sample's neuron."""
    data = pixel_dataset(8)
    teacher = calibrate(ALL_TINY_MODELS["timm_vit_relpos"](), data)
    with caplog.at_level("WARNING"):
        cloner = MedicCloner(teacher, make_config(tmp_path), train_dataset=data)
    table = {n for n in cloner.left_out_modules if ".rel_pos.mlp." in n}
    assert table and all("no batch dimension" in cloner.left_out_modules[n] for n in table)
    assert not table & set(cloner.cloned_modules) and not table & set(cloner.channel_dims)
    assert sum("no batch dimension" in r.getMessage() for r in caplog.records) == 1
    cloner.remove_hooks()


def test_rows_that_are_not_grouped_by_sample_are_refused_with_the_fix(tmp_path):
    class TokenMajor(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 8, 8)
            self.mix = nn.Linear(8, 8)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            tokens = self.conv(x).flatten(2).permute(2, 0, 1)  # (T, B, C): rows token after token
            tokens = self.mix(tokens.reshape(-1, 8)).reshape(tokens.shape)
            return self.fc(tokens.mean(0))

    data = pixel_dataset(8)
    teacher = calibrate(TokenMajor(), data)
    with pytest.raises(ValueError, match=r"exclude_modules=\['mix'\]"):
        MedicCloner(teacher, make_config(tmp_path), train_dataset=data)
    cloner = MedicCloner(teacher, make_config(tmp_path, exclude_modules=["mix"]), train_dataset=data)
    assert "mix" not in cloner.cloned_modules
    cloner.remove_hooks()


def test_modules_that_never_run_are_logged(tmp_path, caplog):
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 8, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            tokens = self.conv(x).flatten(2).transpose(1, 2)
            return self.fc(self.attn(tokens, tokens, tokens)[0].mean(1))

    data = pixel_dataset(8)
    with caplog.at_level("WARNING"):
        cloner = MedicCloner(calibrate(Attention(), data), make_config(tmp_path), train_dataset=data)
    assert "never called" in cloner.left_out_modules["attn.out_proj"]
    assert any("attn.out_proj" in r.getMessage() for r in caplog.records)
    cloner.remove_hooks()
