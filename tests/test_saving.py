"""Saving the sanitized model in its native format, the model card, pushing to the Hub, resuming a killed run."""

from unittest import mock

import pytest
import timm
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, TrainerCallback

from medic_hf import MedicCloner, MedicConfig
from medic_hf.modeling import forward_logits, load_native
from tests.conftest import calibrate, pixel_dataset
from tests.tiny_models import hf_vit, plain_wrn, timm_resnet


def config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        num_train_epochs=1,
        per_device_train_batch_size=8,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    values.update(overrides)
    return MedicConfig(**values)


def trained_cloner(factory, tmp_path, **overrides):
    torch.manual_seed(1234)
    data = pixel_dataset(16)
    teacher = calibrate(factory(), data)
    cloner = MedicCloner(
        teacher,
        config(tmp_path, **overrides),
        train_dataset=data,
        eval_dataset={"clean": pixel_dataset(8, seed=1), "backdoor": pixel_dataset(8, seed=2)},
        dataset_name="tiny-synthetic",
        base_model_name="org/trojaned-model",
    )
    cloner.train()
    return cloner


def reload(family, folder, like):
    if family == "timm":
        return timm.create_model(f"local-dir:{folder}", pretrained=True)
    if family == "transformers":
        return AutoModelForImageClassification.from_pretrained(folder)
    return load_native(folder, model=like)


@pytest.mark.parametrize("family,factory", [("timm", timm_resnet), ("transformers", hf_vit), ("torch", plain_wrn)])
def test_save_and_reload_in_native_format(family, factory, tmp_path):
    cloner = trained_cloner(factory, tmp_path)
    out = tmp_path / "out"
    cloner.save_model()
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    student = cloner.model.eval()
    reloaded = reload(family, str(out), factory()).eval()
    x = pixel_dataset(4, seed=3)[:4]["pixel_values"]
    with torch.no_grad():
        assert torch.allclose(forward_logits(reloaded, x), forward_logits(student, x), atol=1e-5)
    cloner.remove_hooks()


def test_model_card_holds_method_base_model_data_hyperparameters_and_metrics(tmp_path):
    cloner = trained_cloner(plain_wrn, tmp_path)
    cloner.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    for text in ("MEDIC", "CVPR", "org/trojaned-model", "tiny-synthetic", "16", "temperature", "clone_loss_weight"):
        assert text in card, text
    assert "Before cloning" in card and "After cloning" in card
    before = f"{100 * cloner.metrics_before['clean_accuracy']:.2f}"
    after = f"{100 * cloner.metrics_after['attack_success_rate']:.2f}"
    assert before in card and after in card
    assert set(cloner.metrics_before) == {"clean_accuracy", "attack_success_rate"}
    cloner.remove_hooks()


def test_push_to_hub_uploads_the_saved_folder(tmp_path):
    cloner = trained_cloner(plain_wrn, tmp_path, hub_model_id="me/clean-model")
    with mock.patch("medic_hf.hub.HfApi") as api_cls:
        api = api_cls.return_value
        api.create_repo.return_value = mock.Mock(repo_id="me/clean-model")
        api.upload_folder.return_value = mock.Mock(commit_url="https://hub/me/clean-model")
        cloner.push_to_hub()
    api.create_repo.assert_called_once()
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == "me/clean-model"
    assert str(kwargs["folder_path"]) == str(tmp_path / "out")
    cloner.remove_hooks()


def test_failed_push_keeps_the_local_result(tmp_path):
    cloner = trained_cloner(plain_wrn, tmp_path, hub_model_id="me/clean-model")
    with mock.patch("medic_hf.hub.HfApi") as api_cls:
        api_cls.return_value.upload_folder.side_effect = OSError("network down")
        with pytest.raises(RuntimeError, match="intact"):
            cloner.push_to_hub()
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert set(weights) == set(cloner.model.state_dict())
    cloner.remove_hooks()


class Kill(TrainerCallback):
    """Simulates a killed job: raises right after the first checkpoint is written."""

    def on_save(self, args, state, control, **kwargs):
        raise KeyboardInterrupt("killed")


@pytest.mark.parametrize("factory", [plain_wrn, timm_resnet])
def test_a_killed_run_resumes_and_ends_as_if_never_stopped(factory, tmp_path):
    torch.manual_seed(1234)
    data = pixel_dataset(24)
    teacher = calibrate(factory(), data)
    common = dict(num_train_epochs=2, save_strategy="epoch", logging_steps=1)

    reference = MedicCloner(teacher, config(tmp_path / "a", **common), train_dataset=data)
    reference.train()

    killed = MedicCloner(teacher, config(tmp_path / "b", **common), train_dataset=data, callbacks=[Kill()])
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-3"
    assert (checkpoint / "medic_stats.safetensors").is_file()

    resumed = MedicCloner(teacher, config(tmp_path / "b", **common), train_dataset=data)
    with mock.patch.object(MedicCloner, "compute_statistics", side_effect=AssertionError("recomputed")):
        resumed.train(resume_from_checkpoint=True)
    for (name, p), q in zip(reference.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(p.float(), q.float(), atol=1e-6), name
    for cloner in (reference, killed, resumed):
        cloner.remove_hooks()
