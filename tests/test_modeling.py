"""Tests for medic_hf.modeling: safe loading, fresh students, dropout control, native save/load."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the Hub is never reachable in tests

import json
import pickle
from pathlib import Path
from unittest import mock

import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch
import transformers
from torch import nn

from medic_hf.modeling import (
    ModelLoadError,
    disable_dropout,
    dropout_disabled,
    forward_logits,
    load_model,
    load_native,
    load_state_dict_file,
    make_student,
    model_family,
    num_classes,
    save_native,
)
from tests.tiny_models import ALL_TINY_MODELS, hf_vit, plain_wrn, timm_convnext, timm_resnet, timm_vit

EXPECTED_FAMILY = {name: name.split("_")[0] for name in ALL_TINY_MODELS}
EXPECTED_FAMILY = {
    name: {"timm": "timm", "hf": "transformers", "plain": "torch"}[f] for name, f in EXPECTED_FAMILY.items()
}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models run fastest on one thread; on a busy 2-core machine extra threads mostly spin."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """Keep huggingface_hub offline even if it was imported before HF_HUB_OFFLINE was set."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def simulate_training(model: nn.Module) -> nn.Module:
    """Perturb every saved floating tensor, like training would, so no weight keeps its (often constant) initial
    value. Non-persistent buffers (timm's relative-position coordinates) are rebuilt on load, as training leaves
    them."""
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.01 * torch.randn(tensor.shape, generator=generator))
    return model


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_fresh_student(student: nn.Module, teacher: nn.Module) -> None:
    assert type(student) is type(teacher)
    student_sd, teacher_sd = student.state_dict(), teacher.state_dict()
    assert list(student_sd) == list(teacher_sd)
    for key, value in teacher_sd.items():
        assert student_sd[key].shape == value.shape, key
        assert student_sd[key].dtype == value.dtype, key
    teacher_params = dict(teacher.named_parameters())
    for name, param in student.named_parameters():
        assert param.requires_grad, name
        if param.is_floating_point() and param.numel() > 1:
            assert not torch.equal(param, teacher_params[name]), f"{name} was not re-initialised"
    assert student.training


# --------------------------------------------------------------------------------------------------------------------
# Families, logits, classes
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALL_TINY_MODELS))
def test_tiny_model_family_logits_and_classes(name, images):
    model = ALL_TINY_MODELS[name]().eval()
    assert model_family(model) == EXPECTED_FAMILY[name]
    assert forward_logits(model, images).shape == (2, 10)
    assert num_classes(model) == 10


def test_forward_logits_handles_tuple_and_dict_outputs(images):
    class TupleOutput(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            logits = self.fc(x.mean(dim=(2, 3)))
            return logits, x

    class DictOutput(TupleOutput):
        def forward(self, x):
            return {"features": x, "logits": super().forward(x)[0]}

    assert forward_logits(TupleOutput(), images).shape == (2, 4)
    assert forward_logits(DictOutput(), images).shape == (2, 4)
    assert num_classes(TupleOutput()) == 4
    assert num_classes(nn.Conv2d(3, 3, 1)) is None


def test_tiny_models_have_the_layers_they_promise():
    from timm.layers import BatchNormAct2d, LayerNorm2d
    from timm.models._efficientnet_blocks import SqueezeExcite

    resnet_modules = list(timm_resnet().modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in resnet_modules)
    assert any(isinstance(m, nn.ReLU) and m.inplace for m in resnet_modules)
    bnact_se_modules = list(ALL_TINY_MODELS["timm_bnact_se"]().modules())
    assert any(isinstance(m, BatchNormAct2d) for m in bnact_se_modules)
    assert any(isinstance(m, SqueezeExcite) for m in bnact_se_modules)
    assert any(isinstance(m, LayerNorm2d) for m in timm_convnext().modules())
    assert any(isinstance(m, nn.ReLU) and m.inplace for m in plain_wrn().modules())


# --------------------------------------------------------------------------------------------------------------------
# make_student
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALL_TINY_MODELS))
def test_make_student_is_fresh_copy_of_architecture(name, images):
    teacher = ALL_TINY_MODELS[name]().eval()
    # An untrained teacher shares constant initial values (zero biases, unit norm weights) with any fresh
    # student; that must not be mistaken for copied weights.
    make_student(teacher)

    simulate_training(teacher)
    for param in teacher.parameters():
        param.requires_grad_(False)  # a frozen teacher must still give a fully trainable student
    before = state_snapshot(teacher)
    student = make_student(teacher)

    assert_fresh_student(student, teacher)
    assert forward_logits(student, images).shape == (2, 10)
    assert not teacher.training, "make_student must not change the teacher's mode"
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), f"make_student modified the teacher's {key}"


@pytest.mark.parametrize("factory", [timm_vit, hf_vit, plain_wrn], ids=["timm", "transformers", "torch"])
def test_make_student_seed_is_reproducible_and_leaves_global_rng_alone(factory):
    teacher = factory()
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    first = make_student(teacher, seed=7)
    assert torch.equal(torch.rand(1), expected_next), "seeded make_student changed the global RNG state"
    second = make_student(teacher, seed=7)
    third = make_student(teacher, seed=8)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    assert any(not torch.equal(v, third.state_dict()[k]) for k, v in first.state_dict().items())


@pytest.mark.parametrize("factory", [timm_vit, hf_vit, plain_wrn], ids=["timm", "transformers", "torch"])
def test_make_student_matches_teacher_dtype(factory, images):
    teacher = simulate_training(factory()).to(torch.float64)
    student = make_student(teacher)
    assert all(p.dtype == torch.float64 for p in student.parameters())
    assert forward_logits(student, images.double()).dtype == torch.float64


def test_make_student_timm_without_creation_args_falls_back_to_reinitialised_copy():
    # Older timm versions do not record creation kwargs; depth=2 etc. are then unrecoverable from the registry.
    teacher = simulate_training(timm_vit())
    del teacher._model_args
    assert_fresh_student(make_student(teacher), teacher)


def test_make_student_timm_fallback_reinitialises_parameters_nothing_resets(caplog):
    # ConvNeXt's layer-scale gamma is a naked nn.Parameter that neither reset_parameters() nor init_weights() covers.
    teacher = simulate_training(timm_convnext())
    del teacher._model_args
    with caplog.at_level("WARNING"):
        student = make_student(teacher)
    assert_fresh_student(student, teacher)
    assert any("gamma" in r.getMessage() and "truncated normal" in r.getMessage() for r in caplog.records)


def test_make_student_timm_keeps_classifier_resized_after_creation():
    teacher = timm_vit()
    teacher.reset_classifier(5)
    student = make_student(simulate_training(teacher))
    assert num_classes(student) == 5
    assert_fresh_student(student, teacher)


class ScaledLinear(nn.Module):
    """A custom layer with a "naked" parameter that no reset_parameters() covers."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return self.linear(x) * self.scale


class ResettableScaledLinear(ScaledLinear):
    def reset_parameters(self):
        nn.init.normal_(self.scale)


def test_make_student_reinitialises_naked_parameters_and_says_so(caplog):
    """torchvision's ViT / Swin own position embeddings, tokens and bias tables with no reset_parameters()."""
    teacher = nn.Sequential(ScaledLinear(), nn.Linear(4, 2))
    with caplog.at_level("WARNING"):
        student = make_student(teacher)
    scale = student[0].scale
    assert not torch.equal(scale, teacher[0].scale) and scale.abs().max() <= 0.04  # truncated normal, std 0.02
    assert any("0.scale" in r.getMessage() and "reset_parameters()" in r.getMessage() for r in caplog.records)


class IdentityMixer(nn.Module):
    """Initialised to the identity whatever the seed, as timm ConViT's `v` projection."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(4))

    def reset_parameters(self):
        with torch.no_grad():
            self.weight.copy_(torch.eye(4))

    def forward(self, x):
        return x @ self.weight


def test_make_student_accepts_a_seed_independent_initialisation():
    teacher = nn.Sequential(IdentityMixer(), nn.Linear(4, 2))
    student = make_student(teacher)  # weight equals the untrained teacher's, by design, not by a copy
    assert torch.equal(student[0].weight, torch.eye(4)) and student[0].weight is not teacher[0].weight


def test_make_student_accepts_custom_module_with_reset_parameters():
    teacher = simulate_training(nn.Sequential(ResettableScaledLinear(), nn.Linear(4, 2)))
    assert_fresh_student(make_student(teacher), teacher)


# --------------------------------------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------------------------------------


def dropout_rates(model: nn.Module) -> dict[str, float]:
    """All dropout-like rates of the test models, by a readable name."""
    rates = {}
    for module_name, module in model.named_modules():
        for attr in ("p", "drop_prob", "drop_rate", "attention_dropout"):
            value = getattr(module, attr, None)
            if isinstance(value, float) and (attr != "p" or isinstance(module, nn.Dropout)):
                rates[f"{module_name}.{attr}"] = value
    return rates


DROPOUT_MODELS = {
    "timm_vit": lambda: timm_vit(drop_rate=0.1, drop_path_rate=0.1),
    "timm_resnet": lambda: timm_resnet(drop_rate=0.5),  # functional F.dropout(p=self.drop_rate) in forward_head
    "hf_vit": lambda: hf_vit(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1),
    "plain_wrn": lambda: plain_wrn(drop_rate=0.5),
}


@pytest.mark.parametrize("name", list(DROPOUT_MODELS))
def test_dropout_disabled_zeroes_rates_and_restores_them(name, images):
    model = DROPOUT_MODELS[name]().train()
    before = dropout_rates(model)
    assert any(rate > 0 for rate in before.values())
    # With dropout active, two training-mode passes differ.
    assert not torch.equal(forward_logits(model, images), forward_logits(model, images))

    with dropout_disabled(model):
        assert all(rate == 0.0 for rate in dropout_rates(model).values())
        assert torch.equal(forward_logits(model, images), forward_logits(model, images))
        assert model.training, "dropout_disabled must not switch the model to eval mode"

    assert dropout_rates(model) == before


def test_dropout_disabled_handles_several_models_and_restores_on_error():
    vit, wrn = DROPOUT_MODELS["timm_vit"](), DROPOUT_MODELS["plain_wrn"]()
    vit_before, wrn_before = dropout_rates(vit), dropout_rates(wrn)
    with pytest.raises(RuntimeError, match="boom"), dropout_disabled(vit, wrn):
        assert all(rate == 0.0 for rate in [*dropout_rates(vit).values(), *dropout_rates(wrn).values()])
        raise RuntimeError("boom")
    assert dropout_rates(vit) == vit_before
    assert dropout_rates(wrn) == wrn_before


def test_disable_dropout_returns_restore_function():
    model = DROPOUT_MODELS["hf_vit"]()
    before = dropout_rates(model)
    restore = disable_dropout(model)
    assert all(rate == 0.0 for rate in dropout_rates(model).values())
    # The config keeps its rates, so a config.json saved during training still describes the real model.
    assert model.config.hidden_dropout_prob == 0.1
    assert model.config.attention_probs_dropout_prob == 0.1
    restore()
    assert dropout_rates(model) == before


# --------------------------------------------------------------------------------------------------------------------
# Native save / load
# --------------------------------------------------------------------------------------------------------------------


def load_with_library(name: str, folder: Path) -> nn.Module:
    """Load a save_native folder the way a user of each library would, without medic_hf."""
    family = EXPECTED_FAMILY[name]
    if family == "timm":
        return timm.create_model(f"local-dir:{folder}", pretrained=True)
    if family == "transformers":
        return transformers.AutoModelForImageClassification.from_pretrained(folder, use_safetensors=True)
    return load_native(folder, model=plain_wrn())


@pytest.mark.parametrize("name", list(ALL_TINY_MODELS))
def test_save_native_round_trips(name, tmp_path, images):
    model = simulate_training(ALL_TINY_MODELS[name]()).eval()
    expected = forward_logits(model, images)
    save_native(model, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin")), "save_native must not write pickles"

    loaded = load_with_library(name, tmp_path).eval()
    assert type(loaded) is type(model)
    assert torch.equal(forward_logits(loaded, images), expected)

    if EXPECTED_FAMILY[name] == "torch":
        metadata = json.loads((tmp_path / "medic_model.json").read_text())
        assert metadata["class"] == "tests.tiny_models.WideResNet"
        with pytest.raises(ModelLoadError, match="load_native"):
            load_native(tmp_path)
    else:
        for reloaded in (load_native(tmp_path), load_model(f"local-dir:{tmp_path}")):
            assert not reloaded.training
            assert torch.equal(forward_logits(reloaded, images), expected)


def test_save_native_timm_records_creation_kwargs(tmp_path):
    save_native(timm_vit(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["model_args"]["depth"] == 2
    assert config["model_args"]["patch_size"] == 8
    assert config["model_args"]["embed_dim"] == 32


def test_save_native_refuses_pickle_serialization(tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        save_native(plain_wrn(), tmp_path, safe_serialization=False)


def test_load_native_into_wrong_architecture_fails_clearly(tmp_path):
    save_native(plain_wrn(), tmp_path)
    with pytest.raises(ModelLoadError, match="same architecture"):
        load_native(tmp_path, model=plain_wrn(widen_factor=2))


# --------------------------------------------------------------------------------------------------------------------
# Safe loading of untrusted files
# --------------------------------------------------------------------------------------------------------------------


class MaliciousPayload:
    """Unpickling this object would create a marker file: a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_load_state_dict_file_reads_safetensors_and_tensor_pickles(tmp_path):
    state = {"weight": torch.randn(3, 2), "bias": torch.zeros(3)}
    safetensors.torch.save_file(state, tmp_path / "w.safetensors")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ckpt.pth")
    for path in (tmp_path / "w.safetensors", tmp_path / "ckpt.pth"):
        loaded = load_state_dict_file(path)
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_load_state_dict_file_refuses_malicious_pickle(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "trojan.pt"
    payload = {"weight": torch.zeros(2), "evil": MaliciousPayload(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with path.open("wb") as f:
            pickle.dump(payload, f, protocol=2)
    assert not marker.exists()

    with pytest.raises(ValueError, match="(?i)refusing to unpickle"):
        load_state_dict_file(path)
    assert not marker.exists(), "the malicious pickle was executed"


def test_load_state_dict_file_refuses_non_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ModelLoadError, match="state dict"):
        load_state_dict_file(tmp_path / "list.pt")


@pytest.mark.parametrize("config", [None, {"model_type": "vit"}, {"architecture": "resnet10t"}])
@pytest.mark.parametrize("weights_name", ["pytorch_model.bin", "model.pth"])
def test_load_model_refuses_folder_with_only_pickled_weights(tmp_path, config, weights_name):
    torch.save(timm_resnet().state_dict(), tmp_path / weights_name)
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=rf"{weights_name}.*never unpickles.*[Cc]onvert.*safetensors"):
        load_model(str(tmp_path))


def test_load_model_refuses_bare_weights_file(tmp_path):
    safetensors.torch.save_file({"w": torch.zeros(1)}, tmp_path / "w.safetensors")
    with pytest.raises(ModelLoadError, match="load_state_dict_file"):
        load_model(str(tmp_path / "w.safetensors"))


def test_load_model_rejects_unknown_names():
    with pytest.raises(ModelLoadError, match="not an existing folder"):
        load_model("not a model id!")


# --------------------------------------------------------------------------------------------------------------------
# Hub ids and timm names (the Hub is mocked)
# --------------------------------------------------------------------------------------------------------------------


def test_load_model_hub_transformers_id_uses_safetensors_and_no_remote_code(tmp_path):
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({"model_type": "vit"}))
    with (
        mock.patch("huggingface_hub.hf_hub_download", return_value=str(config_path)) as download,
        mock.patch.object(
            transformers.AutoModelForImageClassification, "from_pretrained", return_value=hf_vit()
        ) as fp,
    ):
        model = load_model("some-org/trojaned-vit")
    download.assert_called_once_with("some-org/trojaned-vit", "config.json", revision=None)
    fp.assert_called_once_with("some-org/trojaned-vit", use_safetensors=True, trust_remote_code=False)
    assert not model.training


def test_load_model_hub_timm_id_goes_through_timm(tmp_path):
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({"architecture": "resnet10t", "num_classes": 10}))
    with (
        mock.patch("huggingface_hub.hf_hub_download", return_value=str(config_path)),
        mock.patch("timm.create_model", return_value=timm_resnet()) as create,
    ):
        load_model("some-org/trojaned-resnet")
        load_model("hf-hub:some-org/trojaned-resnet", num_classes=10)
    assert create.call_args_list == [
        mock.call("hf-hub:some-org/trojaned-resnet", pretrained=True),
        mock.call("hf-hub:some-org/trojaned-resnet", pretrained=True, num_classes=10),
    ]


def test_load_model_timm_registry_name(tmp_path):
    with mock.patch("timm.create_model", return_value=timm_resnet()) as create:
        load_model("resnet18.a1_in1k", num_classes=10)
    create.assert_called_once_with("resnet18.a1_in1k", pretrained=True, num_classes=10)


def test_load_model_offline_hub_failure_names_the_fix():
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_model("some-org/definitely-not-cached")
