"""Unlabeled images in the clone loss (`MedicCloner(unlabeled_dataset=...)`, docs/transfer.md)."""

import datasets
import pytest
import torch
import torch.nn.functional as F

from medic_hf import MedicCloner, MedicConfig
from medic_hf.data import DeviceImageSet
from tests.conftest import calibrate, pixel_dataset
from tests.test_cloner import make_config
from tests.test_device_data import PREPROCESSING, image_dataset
from tests.tiny_models import ALL_TINY_MODELS, timm_resnet


def unlabeled_images(n=12, seed=5) -> datasets.Dataset:
    """Images without a label column."""
    return image_dataset(n, seed=seed).remove_columns("label")


def test_decoded_unlabeled_set_has_no_labels():
    device_set = DeviceImageSet.from_dataset(unlabeled_images(), "img", None, PREPROCESSING)
    assert device_set.images.shape == (12, 3, 32, 32) and device_set.labels.tolist() == [-1] * 12


def test_unlabeled_rows_take_the_teachers_class_for_importance(tmp_path):
    data = pixel_dataset(8)
    teacher = calibrate(ALL_TINY_MODELS["plain_wrn"](), data)
    cloner = MedicCloner(teacher, make_config(tmp_path), train_dataset=data)
    cloner.stats = cloner.compute_statistics()
    x = data[:8]["pixel_values"]
    predicted = teacher(x).argmax(-1)
    marked = cloner._teacher_targets(x, torch.full((8,), -1))
    explicit = cloner._teacher_targets(x, predicted)
    other = cloner._teacher_targets(x, (predicted + 1) % 10)
    for name in explicit:
        assert torch.equal(marked[name][0], explicit[name][0]) and torch.equal(marked[name][1], explicit[name][1])
    assert any(not torch.equal(marked[n][1], other[n][1]) for n in other)  # the label does change the weights
    cloner.remove_hooks()


def test_loss_is_cross_entropy_on_labelled_rows_plus_clone_loss_on_all(tmp_path):
    """By hand: the same loss computed without the option on the concatenated batch, with the teacher's classes as
    the unlabeled rows' labels, has the same clone term; the cross-entropy covers the labelled rows only."""
    data, extra = pixel_dataset(8), pixel_dataset(6, seed=3)
    teacher = calibrate(ALL_TINY_MODELS["plain_wrn"](), data)
    config = make_config(tmp_path, unlabeled_batch_size=6, clone_loss_weight=3.0)
    cloner = MedicCloner(teacher, config, train_dataset=data)
    cloner.stats = cloner.compute_statistics()
    x, y, x_extra = data[:8]["pixel_values"], data[:8]["labels"], extra[:6]["pixel_values"]
    cloner.unlabeled_images = x_extra  # ready float images: what _unlabeled_batch returns, fixed here
    cloner._unlabeled_batch = lambda: x_extra
    student = cloner.model.train()
    loss, outputs = cloner.compute_loss(student, {"pixel_values": x, "labels": y}, return_outputs=True)
    ce, clone = cloner._running["ce"][-1], cloner._running["clone"][-1]
    assert outputs["logits"].shape == (8, 10)
    assert ce.item() == pytest.approx(F.cross_entropy(outputs["logits"].float(), y).item(), rel=1e-6)
    assert loss.item() == pytest.approx(ce.item() + 3.0 * clone.item(), rel=1e-6)

    cloner.unlabeled_images = None
    pseudo = teacher(x_extra).argmax(-1)
    both = {"pixel_values": torch.cat([x, x_extra]), "labels": torch.cat([y, pseudo])}
    _, reference = cloner.compute_loss(student, both, return_outputs=True)
    assert cloner._running["clone"][-1].item() == pytest.approx(clone.item(), rel=1e-6)
    assert torch.allclose(reference["logits"][:8], outputs["logits"], atol=1e-6)  # the same forward pass
    cloner.remove_hooks()


@pytest.mark.parametrize("unlabeled_loss", ["logits", "both"])
def test_unlabeled_rows_can_teach_through_the_teachers_logits(tmp_path, unlabeled_loss):
    """By hand: 'logits' = CE + λ·(clone loss of the labelled rows) + T²·KL(teacher ‖ student) on the unlabeled
    rows; 'both' keeps the clone loss over every row and adds the same KL."""
    data, extra = pixel_dataset(8), pixel_dataset(6, seed=3)
    teacher = calibrate(ALL_TINY_MODELS["plain_wrn"](), data)
    config = make_config(tmp_path, unlabeled_batch_size=6, clone_loss_weight=3.0, unlabeled_loss=unlabeled_loss)
    cloner = MedicCloner(teacher, config, train_dataset=data)
    cloner.stats = cloner.compute_statistics()
    x, y, x_extra = data[:8]["pixel_values"], data[:8]["labels"], extra[:6]["pixel_values"]
    cloner.unlabeled_images = x_extra
    cloner._unlabeled_batch = lambda: x_extra
    student = cloner.model.train()
    loss = cloner.compute_loss(student, {"pixel_values": x, "labels": y})
    ce, clone = cloner._running["ce"][-1], cloner._running["clone"][-1]
    with torch.no_grad():
        t = config.distillation_temperature
        p_teacher = F.softmax(teacher(x_extra) / t, dim=-1)
        log_p_student = F.log_softmax(student(torch.cat([x, x_extra]))[8:] / t, dim=-1)  # one batch, as trained
        kl = t * t * (p_teacher * (p_teacher.log() - log_p_student)).sum(-1).mean()
    assert kl.item() > 1e-4  # a term that can be told apart
    assert loss.item() == pytest.approx(ce.item() + 3.0 * clone.item() + kl.item(), rel=1e-5)

    # The clone term, by rows: the option-free loss on the same 14 rows (the teacher's classes as the unlabeled rows'
    # labels), each row's sum over layers recorded; 'logits' averages the labelled rows', 'both' every row's.
    cloner.unlabeled_images, layer_terms = None, []
    layer_clone_loss = cloner.layer_clone_loss
    cloner.layer_clone_loss = lambda *tensors: layer_terms.append(layer_clone_loss(*tensors)) or layer_terms[-1]
    pseudo = teacher(x_extra).argmax(-1)
    cloner.compute_loss(student, {"pixel_values": torch.cat([x, x_extra]), "labels": torch.cat([y, pseudo])})
    by_row = torch.stack(layer_terms).sum(0)
    expected = by_row[:8].mean() if unlabeled_loss == "logits" else by_row.mean()
    assert by_row.shape == (14,) and not torch.allclose(by_row[:8].mean(), by_row.mean())
    assert clone.item() == pytest.approx(expected.item(), rel=1e-5)
    cloner.remove_hooks()


def test_unlabeled_loss_must_be_known(tmp_path):
    with pytest.raises(ValueError, match="unlabeled_loss='kl'"):
        MedicConfig(output_dir=str(tmp_path), unlabeled_loss="kl")


def test_training_draws_unlabeled_batches_and_records_them(tmp_path):
    seen = []
    sizes = dict(max_steps=2, per_device_train_batch_size=4, unlabeled_batch_size=5, image_size=[32])
    args = make_config(tmp_path, save_strategy="steps", save_steps=1, max_accuracy_drop=None, **sizes)
    unlabeled = unlabeled_images()
    cloner = MedicCloner(timm_resnet(), args, train_dataset=image_dataset(), unlabeled_dataset=unlabeled)
    assert cloner.unlabeled_images.dtype == torch.uint8 and cloner.unlabeled_images.shape == (12, 3, 32, 32)
    handle = cloner.model.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0].shape[0]))
    cloner.train()
    handle.remove()
    assert seen == [9, 9]  # 4 clean + 5 unlabeled images per step
    assert cloner.hyperparameters()["unlabeled images"] == 12
    assert cloner.hyperparameters()["unlabeled_batch_size"] == 5
    assert cloner.fingerprint()["unlabeled"] is not None
    cloner.save_model()
    assert "unlabeled images" in (tmp_path / "out" / "README.md").read_text()
    checkpoint = str(tmp_path / "out" / "checkpoint-1")
    cloner.remove_hooks()

    other = MedicCloner(timm_resnet(), args, train_dataset=image_dataset(), unlabeled_dataset=unlabeled_images(seed=9))
    with pytest.raises(ValueError, match="the unlabeled differ"):
        other.train(resume_from_checkpoint=checkpoint)
    other.remove_hooks()


@pytest.mark.parametrize(
    "unlabeled, overrides, error, message",
    [
        ([1, 2], {}, TypeError, "datasets.Dataset"),
        (unlabeled_images().select([]), {}, ValueError, "empty"),
        (unlabeled_images(), {"mix_inputs": "mixup"}, ValueError, "mix_inputs='mixup'"),
        (unlabeled_images(), {"device_data_max_mb": 0.01}, ValueError, "select fewer images"),
    ],
)
def test_unusable_unlabeled_data_is_refused_before_training(tmp_path, unlabeled, overrides, error, message):
    args = MedicConfig(output_dir=str(tmp_path), image_size=[32], disable_tqdm=True, **overrides)
    with pytest.raises(error, match=message):
        MedicCloner(timm_resnet(), args, train_dataset=pixel_dataset(8), unlabeled_dataset=unlabeled)


def test_unlabeled_batch_size_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="unlabeled_batch_size=0"):
        MedicConfig(output_dir=str(tmp_path), unlabeled_batch_size=0)
