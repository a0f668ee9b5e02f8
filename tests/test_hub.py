"""Tests for medic_hf.hub: model cards and pushing folders (HfApi is mocked; the Hub is never contacted)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the Hub is never reachable in tests

from pathlib import Path
from unittest import mock

import huggingface_hub
import pytest
from huggingface_hub import ModelCard, RepoUrl

from medic_hf.hub import build_model_card, push_folder_to_hub

HYPERPARAMETERS = {"epochs": 20, "learning_rate": 0.01, "importance": "grad-x-act", "betas": (0.9, 0.999)}
BEFORE = {"clean_accuracy": 0.9312, "attack_success_rate": 0.998}
AFTER = {"clean_accuracy": 0.9107, "attack_success_rate": 0.0213}


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def full_card(**overrides) -> ModelCard:
    args = dict(
        base_model="some-org/trojaned-resnet18",
        family="timm",
        dataset="uoft-cs/cifar10",
        clean_samples=2500,
        hyperparameters=HYPERPARAMETERS,
        metrics_before=BEFORE,
        metrics_after=AFTER,
    )
    return build_model_card(**{**args, **overrides})


def test_model_card_contents():
    card = full_card(repo_id="me/sanitized-resnet18", extra="Trigger: 3x3 white patch.")
    text = card.text

    assert text.lstrip().startswith("# MEDIC-sanitized trojaned-resnet18")
    assert "importance-driven cloning" in text
    assert "MEDIC: Remove Model Backdoors via Importance Driven Cloning" in text
    assert "Qiuling Xu, Guanhong Tao, Jean Honorio, Yingqi Liu, Shengwei An, Guangyu Shen, Siyuan Cheng" in text
    assert "Xiangyu Zhang" in text and "CVPR" in text and "2023" in text
    assert "[`some-org/trojaned-resnet18`](https://huggingface.co/some-org/trojaned-resnet18)" in text
    assert "uoft-cs/cifar10" in text and "2500" in text
    # Hyperparameter table
    assert "| Hyperparameter | Value |" in text
    assert "| epochs | 20 |" in text
    assert "| learning_rate | 0.01 |" in text
    assert "| betas | 0.9, 0.999 |" in text
    # Before/after metrics table
    assert "| Metric | Before cloning (teacher) | After cloning (this model) | Evaluation images |" in text
    assert "| Clean accuracy | 93.12% | 91.07% | — |" in text
    assert "| Attack success rate (ASR) | 99.80% | 2.13% | — |" in text
    # Loading snippet and warning
    assert 'timm.create_model("hf-hub:me/sanitized-resnet18", pretrained=True)' in text
    assert "cannot prove that every backdoor is gone" in text
    assert "Trigger: 3x3 white patch." in text


def test_model_card_metadata():
    data = full_card().data
    assert data.library_name == "timm"
    assert data.tags == ["medic", "backdoor-removal", "image-classification", "timm"]
    assert data.base_model == "some-org/trojaned-resnet18"
    assert data.datasets == ["uoft-cs/cifar10"]
    assert data.license == "unknown"  # the teacher's license applies; not given here
    assert data.pipeline_tag == "image-classification"
    # The Hub's model-index: every metric after MEDIC, and the teacher's before it
    results = {r.metric_name: r for r in data.eval_results}
    assert results["Clean accuracy"].metric_value == pytest.approx(0.9107)
    assert results["Attack success rate (ASR)"].metric_value == pytest.approx(0.0213)
    assert results["Clean accuracy of the trojaned teacher (before MEDIC)"].metric_value == pytest.approx(0.9312)
    assert all(r.dataset_type == "uoft-cs/cifar10" and r.task_type == "image-classification" for r in results.values())


def test_model_card_license_sizes_and_warnings():
    card = full_card(
        license="apache-2.0",
        eval_sizes={"clean_accuracy": 10000, "attack_success_rate": 9000},
        warnings=["The clean accuracy fell 20 points."],
    )
    assert card.data.license == "apache-2.0"
    assert "| Clean accuracy | 93.12% | 91.07% | 10,000 |" in card.text
    assert "| Attack success rate (ASR) | 99.80% | 2.13% | 9,000 |" in card.text
    assert "## ⚠ Warning" in card.text and "- The clean accuracy fell 20 points." in card.text
    assert "Warning" not in full_card().text.split("## Method")[0]


def test_model_card_renders_without_metrics_or_optional_fields():
    card = build_model_card(
        base_model=None,
        family="torch",
        dataset=None,
        clean_samples=None,
        hyperparameters={},
        metrics_before=None,
        metrics_after=None,
    )
    text = card.text
    assert "# MEDIC-sanitized model" in text
    assert "No evaluation metrics were provided" in text
    assert "Before cloning" not in text
    assert "No hyperparameters were recorded." in text
    assert "not recorded" in text
    assert "{{" not in text and "{%" not in text
    assert card.data.library_name == "pytorch"
    assert card.data.base_model is None and card.data.datasets is None
    assert 'load_model(model, hf_hub_download("<namespace>/<repo-name>", "model.safetensors"))' in text


def test_model_card_with_metrics_only_after_cloning():
    text = full_card(metrics_before=None, metrics_after={"clean_accuracy": 0.9}).text
    assert "| Clean accuracy | — | 90.00% | — |" in text


def test_model_card_keeps_local_paths_out_of_metadata(tmp_path):
    (tmp_path / "teacher").mkdir()
    card = full_card(base_model=str(tmp_path / "teacher"), dataset=str(tmp_path / "cifar10"))
    assert card.data.base_model is None  # the Hub only accepts repo ids here
    assert card.data.datasets is None
    assert str(tmp_path) not in card.text and str(tmp_path) not in str(card.data)  # no local paths published
    assert "`teacher`" in card.text and "`cifar10`" in card.text
    assert full_card(base_model="org/teacher", base_model_id=None).data.base_model is None


@pytest.mark.parametrize(
    ("family", "library", "snippet"),
    [
        ("timm", "timm", 'timm.create_model("hf-hub:me/m", pretrained=True)'),
        ("transformers", "transformers", 'AutoModelForImageClassification.from_pretrained("me/m")'),
        ("torch", "pytorch", 'hf_hub_download("me/m", "model.safetensors")'),
    ],
)
def test_model_card_family_specific_loading(family, library, snippet):
    card = full_card(family=family, repo_id="me/m")
    assert card.data.library_name == library
    assert family in card.data.tags
    assert snippet in card.text


def test_model_card_saves_and_reloads(tmp_path):
    full_card().save(tmp_path / "README.md")
    reloaded = ModelCard.load(tmp_path / "README.md")
    assert reloaded.data.base_model == "some-org/trojaned-resnet18"
    assert "| Clean accuracy | 93.12% | 91.07% | — |" in reloaded.text
    assert len(reloaded.data.eval_results) == 4


# --------------------------------------------------------------------------------------------------------------------
# push_folder_to_hub
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def saved_folder(tmp_path) -> Path:
    folder = tmp_path / "sanitized"
    folder.mkdir()
    (folder / "config.json").write_text('{"architecture": "resnet10t"}')
    (folder / "model.safetensors").write_bytes(b"\x00weights\x01")
    (folder / "README.md").write_text("# card\n")
    return folder


def folder_snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_push_folder_to_hub_creates_repo_and_uploads(saved_folder):
    with mock.patch("medic_hf.hub.HfApi") as hf_api:
        api = hf_api.return_value
        api.create_repo.return_value = RepoUrl("https://huggingface.co/me/sanitized")
        url = push_folder_to_hub(saved_folder, "me/sanitized", token="hf_xxx", private=True)

    hf_api.assert_called_once_with(token="hf_xxx")
    api.create_repo.assert_called_once_with("me/sanitized", exist_ok=True, private=True, repo_type="model")
    api.upload_folder.assert_called_once_with(
        repo_id="me/sanitized",
        folder_path=str(saved_folder),
        commit_message="Upload MEDIC-sanitized model",
        revision=None,
        repo_type="model",
        ignore_patterns=["checkpoint-*"],
    )
    api.create_branch.assert_not_called()
    assert url == "https://huggingface.co/me/sanitized"


def test_push_folder_to_hub_with_revision_creates_branch(saved_folder):
    with mock.patch("medic_hf.hub.HfApi") as hf_api:
        api = hf_api.return_value
        api.create_repo.return_value = RepoUrl("https://huggingface.co/me/sanitized")
        push_folder_to_hub(saved_folder, "me/sanitized", revision="medic-v1", commit_message="msg")
    api.create_branch.assert_called_once_with("me/sanitized", branch="medic-v1", exist_ok=True)
    assert api.upload_folder.call_args.kwargs["revision"] == "medic-v1"
    assert api.upload_folder.call_args.kwargs["commit_message"] == "msg"


@pytest.mark.parametrize("failing_call", ["create_repo", "upload_folder"])
def test_push_folder_to_hub_failure_keeps_folder_and_explains_retry(saved_folder, failing_call):
    before = folder_snapshot(saved_folder)
    with mock.patch("medic_hf.hub.HfApi") as hf_api:
        api = hf_api.return_value
        api.create_repo.return_value = RepoUrl("https://huggingface.co/me/sanitized")
        getattr(api, failing_call).side_effect = OSError("401 Unauthorized")
        with pytest.raises(RuntimeError) as excinfo:
            push_folder_to_hub(saved_folder, "me/sanitized")

    message = str(excinfo.value)
    assert "failed" in message and "401 Unauthorized" in message
    assert f"intact at {saved_folder.resolve()}" in message
    assert "hf auth login" in message and f"hf upload me/sanitized {saved_folder.resolve()}" in message
    assert folder_snapshot(saved_folder) == before


def test_push_folder_to_hub_requires_existing_folder(tmp_path):
    with mock.patch("medic_hf.hub.HfApi") as hf_api, pytest.raises(FileNotFoundError):
        push_folder_to_hub(tmp_path / "missing", "me/sanitized")
    hf_api.assert_not_called()


def test_checkpoint_pattern_leaves_out_every_checkpoint_file():
    from huggingface_hub.utils import filter_repo_objects

    from medic_hf.hub import CHECKPOINT_PATTERNS

    files = ["model.safetensors", "README.md", "checkpoint-1320/optimizer.pt", "checkpoint-7/trainer_state.json"]
    assert list(filter_repo_objects(files, ignore_patterns=CHECKPOINT_PATTERNS)) == ["model.safetensors", "README.md"]
