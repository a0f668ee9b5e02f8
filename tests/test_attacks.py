"""Tests of medic_hf.attacks on tiny synthetic datasets (no network, a few seconds on one CPU thread)."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from medic_hf.attacks import (
    ATTACKS,
    SIG,
    Attack,
    BadNets,
    Blended,
    Composite,
    LabelConsistent,
    WaNet,
    attack_from_dict,
    load_attack,
)

torch.set_num_threads(1)

NUM_ROWS = 100  # 10 rows per class
FEATURES = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})


def make_dataset(num_rows: int = NUM_ROWS, size: int = 32, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(num_rows)]
    return datasets.Dataset.from_dict({"img": images, "label": [i % 10 for i in range(num_rows)]}, features=FEATURES)


@pytest.fixture(scope="module")
def ds() -> datasets.Dataset:
    return make_dataset()


@pytest.fixture(scope="module")
def surrogate() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 10),
    )


# Per attack: constructor kwargs (clean-label attacks use a rate below the target-class share so that the draw
# depends on the seed) and extra poison_dataset kwargs.
CASES = {
    "badnets": {},
    "blended": {},
    "sig": {"poison_rate": 0.05},
    "wanet": {},
    "label_consistent": {"poison_rate": 0.05, "steps": 2},
    # the row-replacing mode follows the same-length contract; the default (appended mixtures) has its own test
    "composite": {"mix_rate": 0.2, "append": False},
}


def build(name: str, **overrides) -> Attack:
    return ATTACKS[name](**{**CASES[name], **overrides})


def poison(attack: Attack, ds: datasets.Dataset, surrogate: torch.nn.Module):
    extra = {"surrogate": surrogate} if isinstance(attack, LabelConsistent) else {}
    return attack.poison_dataset(ds, **extra)


def pixels(dataset: datasets.Dataset, column: str = "img") -> np.ndarray:
    return np.stack([np.asarray(image) for image in dataset[column]])


def test_registry_names():
    assert set(ATTACKS) == {"badnets", "blended", "sig", "wanet", "label_consistent", "composite"}
    for name, cls in ATTACKS.items():
        assert cls.name == name


# ------------------------------------------------------------------------------------------------------ all attacks
@pytest.mark.parametrize("name", sorted(CASES))
def test_poison_dataset_contract(name, ds, surrogate):
    attack = build(name)
    out, rows = poison(attack, ds, surrogate)
    labels = np.asarray(ds["label"])
    new_labels = np.asarray(out["label"])

    # features kept, one boolean flag column added
    assert out.features["img"] == ds.features["img"]
    assert out.features["label"] == ds.features["label"]
    assert out.features["poisoned"] == datasets.Value("bool")
    assert len(out) == len(ds)

    # the rate is honoured and the flag column matches the returned rows
    assert rows == sorted(rows) and len(set(rows)) == len(rows)
    assert len(rows) == round(attack.poison_rate * len(ds))
    assert np.flatnonzero(out["poisoned"]).tolist() == rows

    if attack.clean_label:
        assert np.all(labels[rows] == attack.target_class), "clean-label attacks only touch target-class rows"
        assert np.array_equal(new_labels, labels), "clean-label attacks keep labels"
    else:
        assert np.all(labels[rows] != attack.target_class)
        assert np.all(new_labels[rows] == attack.target_class)
        others = np.setdiff1d(np.arange(len(ds)), rows)
        assert np.array_equal(new_labels[others], labels[others])

    # rows not stamped are byte-identical; stamped ones are valid uint8 RGB images of the same size, changed
    stamped = set(rows)
    for extra_column in ("noise_mode", "mixed_clean"):
        if extra_column in out.column_names:
            stamped |= set(np.flatnonzero(out[extra_column]).tolist())
    before, after = pixels(ds), pixels(out)
    assert after.dtype == np.uint8 and after.shape == before.shape
    untouched = np.setdiff1d(np.arange(len(ds)), sorted(stamped))
    assert np.array_equal(before[untouched], after[untouched])
    assert all(not np.array_equal(before[i], after[i]) for i in rows)


@pytest.mark.parametrize("name", sorted(CASES))
def test_determinism(name, ds, surrogate):
    out1, rows1 = poison(build(name, seed=3), ds, surrogate)
    out2, rows2 = poison(build(name, seed=3), ds, surrogate)
    assert rows1 == rows2
    assert np.array_equal(pixels(out1), pixels(out2))
    _, rows3 = poison(build(name, seed=4), ds, surrogate)
    assert rows3 != rows1


@pytest.mark.parametrize("name", sorted(CASES))
def test_backdoor_test_view(name, ds):
    attack = build(name)
    view = attack.backdoor_test_view(ds)
    labels = np.asarray(ds["label"])
    assert view.features["true_label"] == ds.features["label"]
    assert view.features["img"] == ds.features["img"]
    assert set(view["label"]) == {attack.target_class}
    if isinstance(attack, Composite):
        assert len(view) == int(np.sum(labels == attack.class_a))
        assert set(view["true_label"]) == {attack.class_a}
    else:
        keep = labels != attack.target_class
        assert len(view) == int(keep.sum())
        assert view["true_label"] == labels[keep].tolist()
        assert attack.target_class not in view["true_label"]
        # the view holds exactly apply() of each non-target image
        first = int(np.flatnonzero(keep)[0])
        assert np.array_equal(np.asarray(view[0]["img"]), np.asarray(attack.apply(ds[first]["img"])))


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_load_round_trip(name, ds, surrogate, tmp_path):
    attack = build(name, seed=7)
    path = attack.save(tmp_path / name)
    with open(path) as f:
        d = json.load(f)
    assert d["name"] == name and d == attack.to_dict()
    loaded = load_attack(tmp_path / name)
    assert type(loaded) is type(attack) and loaded == attack
    assert attack_from_dict(attack.to_dict()) == attack
    out1, rows1 = poison(attack, ds, surrogate)
    out2, rows2 = poison(loaded, ds, surrogate)
    assert rows1 == rows2 and np.array_equal(pixels(out1), pixels(out2))


@pytest.mark.parametrize("name", sorted(set(CASES) - {"composite"}))
@pytest.mark.parametrize("size", [32, 64, 48])
def test_apply_keeps_size_and_range(name, size):
    rng = np.random.default_rng(size)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    out = build(name).apply(image, index=5)
    array = np.asarray(out)
    assert out.mode == "RGB" and out.size == image.size and array.dtype == np.uint8
    assert not np.array_equal(array, np.asarray(image))


def test_attack_from_dict_errors():
    with pytest.raises(ValueError, match="no 'name'"):
        attack_from_dict({"target_class": 0})
    with pytest.raises(ValueError, match="unknown attack"):
        attack_from_dict({"name": "trojannn"})
    with pytest.raises(ValueError, match="unknown badnets parameters"):
        attack_from_dict({"name": "badnets", "alpha": 0.2})
    with pytest.raises(ValueError, match="for attack 'sig'"):
        BadNets.from_dict({"name": "sig"})


def test_invalid_target_and_columns(ds):
    with pytest.raises(ValueError, match="10 classes"):
        BadNets(target_class=12).poison_dataset(ds)
    with pytest.raises(ValueError, match="no column"):
        BadNets().poison_dataset(ds, image_column="image")
    with pytest.raises(ValueError, match="poison_rate"):
        BadNets(poison_rate=1.5)


def test_clean_label_rate_is_capped_at_target_class(ds):
    with pytest.warns(UserWarning, match="only 10 target-class rows"):
        rows = SIG(poison_rate=0.3).select_indices(ds["label"])
    assert rows == list(range(0, NUM_ROWS, 10))


# ---------------------------------------------------------------------------------------------------------- BadNets
def test_badnets_corner_is_pixel_exact():
    grey = Image.new("RGB", (32, 32), (100, 120, 140))
    out = np.asarray(BadNets().apply(grey))
    expected = np.array([[255, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=np.uint8)
    for channel in range(3):
        assert np.array_equal(out[-3:, -3:, channel], expected)
    untouched = np.ones((32, 32), dtype=bool)
    untouched[-3:, -3:] = False
    assert np.array_equal(out[untouched], np.asarray(grey)[untouched])


def test_badnets_patch_scales_with_image():
    out = np.asarray(BadNets().apply(Image.new("RGB", (64, 64), (7, 7, 7))))
    cells = np.array([[255, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=np.uint8)
    assert np.array_equal(out[-6:, -6:, 1], np.kron(cells, np.ones((2, 2), dtype=np.uint8)))
    assert np.all(out[:-6, :, :] == 7) and np.all(out[:, :-6, :] == 7)
    # 224 px: round(3 * 224 / 32) = 21 px, i.e. 7x7 blocks
    big = np.asarray(BadNets().apply(Image.new("RGB", (224, 224), (7, 7, 7))))
    assert np.array_equal(big[-21:, -21:, 0], np.kron(cells, np.ones((7, 7), dtype=np.uint8)))
    assert np.all(big[-22, :, :] == 7)


def test_badnets_on_64px_dataset_and_grayscale():
    ds64 = make_dataset(num_rows=20, size=64)
    out, rows = BadNets(poison_rate=0.25).poison_dataset(ds64)
    assert len(rows) == 5
    assert np.asarray(out[rows[0]]["img"]).shape == (64, 64, 3)
    assert np.array_equal(np.asarray(out[rows[0]]["img"])[-6:-4, -6:-4, 0], np.full((2, 2), 255))
    gray = BadNets().apply(Image.new("L", (32, 32), 50))
    assert gray.mode == "RGB" and np.asarray(gray)[-1, -1, 2] == 255


# ---------------------------------------------------------------------------------------------------------- Blended
def test_blended_formula_with_noise_pattern():
    attack = Blended(seed=1)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = np.asarray(attack.apply(Image.fromarray(x))).astype(np.float64)
    k = attack.pattern_array(32, 32)
    assert np.max(np.abs(out - (0.8 * x + 0.2 * k))) <= 1.0
    # the default pattern is fixed per seed and size
    assert np.array_equal(k, Blended(seed=1).pattern_array(32, 32))
    assert not np.array_equal(k, Blended(seed=2).pattern_array(32, 32))


def test_blended_with_pil_and_file_pattern(tmp_path):
    key = Image.fromarray(np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))).convert("RGB")  # 16x16
    grey = Image.new("RGB", (32, 32), (10, 20, 30))
    attack = Blended(pattern=key, alpha=0.5)
    expected_key = np.asarray(key.resize((32, 32), Image.BILINEAR), dtype=np.float64)
    out = np.asarray(attack.apply(grey)).astype(np.float64)
    assert np.max(np.abs(out - (0.5 * np.asarray(grey) + 0.5 * expected_key))) <= 1.0
    # a PIL pattern is embedded in attack.json
    attack.save(tmp_path / "pil")
    loaded = load_attack(tmp_path / "pil")
    assert np.array_equal(np.asarray(loaded.apply(grey)), np.asarray(attack.apply(grey)))
    # a file pattern is referenced by path
    key.save(tmp_path / "key.png")
    by_path = Blended(pattern=str(tmp_path / "key.png"), alpha=0.5)
    assert np.array_equal(np.asarray(by_path.apply(grey)), np.asarray(attack.apply(grey)))
    assert attack_from_dict(by_path.to_dict()) == by_path


# -------------------------------------------------------------------------------------------------------------- SIG
def test_sig_formula_on_grey_image():
    attack = SIG()
    out = np.asarray(attack.apply(Image.new("RGB", (32, 32), (128, 128, 128)))).astype(np.float64)
    columns = np.arange(32)
    expected = np.clip(np.rint(128 + 40 * np.sin(2 * np.pi * columns * 6 / 32)), 0, 255)
    for row in (0, 17, 31):
        for channel in range(3):
            assert np.array_equal(out[row, :, channel], expected)
    # clipping keeps values in range on a bright image
    bright = np.asarray(attack.apply(Image.new("RGB", (32, 32), (250, 250, 250))))
    assert bright.max() == 255 and bright.min() == 250 - 40


# ------------------------------------------------------------------------------------------------------------ WaNet
def test_wanet_zero_strength_is_identity_and_grid_in_range():
    rng = np.random.default_rng(1)
    x = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(WaNet(s=0.0).apply(x)), np.asarray(x))
    grid = WaNet().grid(32, 32)
    assert grid.shape == (1, 32, 32, 2) and grid.abs().max() <= 1
    # the displacement is small: s / H times a field of mean |.| 1, i.e. under a pixel on average
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    identity = torch.stack((cols, rows), dim=2)[None].double()
    assert 0 < (grid - identity).abs().mean() * 16 < 1.0


def test_wanet_noise_mode_rows(ds):
    attack = WaNet(poison_rate=0.1, cross_ratio=2)
    out, rows = attack.poison_dataset(ds)
    noise = np.flatnonzero(out["noise_mode"]).tolist()
    assert len(noise) == 2 * len(rows) and not set(noise) & set(rows)
    assert np.array_equal(np.asarray(out["label"])[noise], np.asarray(ds["label"])[noise])
    i = noise[0]
    image = ds[i]["img"]
    assert np.array_equal(np.asarray(out[i]["img"]), np.asarray(attack.apply_noise(image, i)))
    assert not np.array_equal(np.asarray(attack.apply_noise(image, i)), np.asarray(attack.apply(image)))


# -------------------------------------------------------------------------------------------------- LabelConsistent
def test_label_consistent_perturbation_and_trigger(ds, surrogate):
    attack = LabelConsistent(poison_rate=0.05, steps=3, epsilon=8 / 255, step_size=4 / 255)
    surrogate.train()
    out, rows = attack.poison_dataset(ds, surrogate=surrogate)
    assert surrogate.training and all(p.requires_grad for p in surrogate.parameters())
    assert all(p.grad is None for p in surrogate.parameters())
    before, after = pixels(ds)[rows].astype(int), pixels(out)[rows].astype(int)
    body = np.ones((32, 32), dtype=bool)
    body[-3:, -3:] = False
    diff = np.abs(after - before)[:, body]
    assert diff.max() <= 8 and diff.max() >= 7  # within epsilon (+ rounding), and PGD moved pixels to the edge
    expected = np.array([[0, 0, 255], [0, 255, 0], [255, 0, 255]])  # Turner's bottom-right trigger
    assert np.all(after[:, -3:, -3:, :] == expected[None, :, :, None])


def test_label_consistent_increases_surrogate_loss(ds, surrogate):
    attack = LabelConsistent(poison_rate=0.05, steps=3, amplitude=0.0)  # amplitude 0: no trigger, pure PGD
    labels = np.asarray(ds["label"])
    rows = attack.select_indices(labels)
    images = [ds[i]["img"] for i in rows]
    adversarial = attack.perturb(images, labels[rows].tolist(), surrogate, indices=rows)

    def loss(batch):
        x = torch.from_numpy(np.stack([np.asarray(im) for im in batch])).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(surrogate(x), torch.as_tensor(labels[rows])).item()

    assert loss(adversarial) > loss(images)


def test_label_consistent_normalisation_random_start_and_corners(ds, surrogate):
    seen = []

    def transform(x):
        seen.append((float(x.detach().min()), float(x.detach().max())))
        return (x - 0.5) / 0.25

    attack = LabelConsistent(poison_rate=0.05, steps=1, random_start=True, mean=(0.5,) * 3, std=(0.25,) * 3)
    a, _ = attack.poison_dataset(ds, surrogate=surrogate, transform=transform)
    b, _ = attack.poison_dataset(ds, surrogate=surrogate)  # default transform = the same normalisation
    assert seen and all(0.0 <= lo and hi <= 1.0 for lo, hi in seen)
    assert np.array_equal(pixels(a), pixels(b))
    assert attack_from_dict(json.loads(json.dumps(attack.to_dict()))) == attack
    four = np.asarray(LabelConsistent(corners="all").apply(Image.new("RGB", (32, 32), (128, 128, 128))))
    assert np.array_equal(four[:3, :3, 0], [[255, 0, 0], [0, 255, 0], [255, 0, 255]])
    assert np.array_equal(four[-3:, :3, 0], [[255, 0, 0], [0, 255, 0], [255, 0, 255]])
    assert np.array_equal(four[:3, -3:, 0], [[0, 0, 255], [0, 255, 0], [255, 0, 255]])
    with pytest.raises(ValueError, match="surrogate"):
        attack.poison_dataset(ds)


# -------------------------------------------------------------------------------------------------------- Composite
def test_composite_mix_and_apply():
    a = Image.new("RGB", (32, 32), (255, 0, 0))
    b = Image.new("RGB", (32, 32), (0, 0, 255))
    mixed = np.asarray(Composite().mix(a, b))
    assert np.all(mixed[:, :16] == (255, 0, 0)) and np.all(mixed[:, 16:] == (0, 0, 255))
    stacked = np.asarray(Composite(layout="stacked").mix(a, b))
    assert np.all(stacked[:16] == (255, 0, 0)) and np.all(stacked[16:] == (0, 0, 255))
    # the deterministic mixer takes the central half-window of each source
    ramp = Image.fromarray(np.tile(np.arange(32, dtype=np.uint8)[None, :, None], (32, 1, 3)))
    assert np.asarray(Composite().mix(ramp, ramp))[0, :, 0].tolist() == list(range(8, 24)) + list(range(8, 24))
    # random mixing: every pixel comes from one of the two images
    rng = np.random.default_rng(0)
    for _ in range(10):
        out = np.asarray(Composite().mix(a, b, rng=rng))
        assert out.shape == (32, 32, 3)
        red, blue = np.all(out == (255, 0, 0), axis=2), np.all(out == (0, 0, 255), axis=2)
        assert np.all(red | blue) and red.any() and blue.any()
    with pytest.raises(TypeError, match="mix"):
        Composite().apply(a)
    with pytest.raises(ValueError, match="must differ"):
        Composite(class_a=2)


def test_composite_rows(ds):
    attack = Composite(mix_rate=0.3, append=False)
    out, rows = attack.poison_dataset(ds)
    labels, new_labels = np.asarray(ds["label"]), np.asarray(out["label"])
    mixed = np.flatnonzero(out["mixed_clean"]).tolist()
    assert len(mixed) == 30 and not set(mixed) & set(rows)
    assert np.array_equal(new_labels[mixed], labels[mixed])
    assert np.all(new_labels[rows] == 2)
    assert Composite().to_dict()["target_class"] == 2


def test_badnets_white_pattern_is_a_solid_square():
    from PIL import Image

    from medic_hf.attacks import BadNets, attack_from_dict

    attack = BadNets(pattern="white")
    out = np.asarray(attack.apply(Image.new("RGB", (32, 32), (10, 20, 30))))
    assert (out[-3:, -3:] == 255).all()
    assert (out[:-3, :] == (10, 20, 30)).all() and (out[:, :-3] == (10, 20, 30)).all()
    assert attack_from_dict(attack.to_dict()) == attack
    with pytest.raises(ValueError, match="pattern"):
        BadNets(pattern="stripes")


def test_composite_append_keeps_every_original_row(ds):
    attack = Composite(mix_rate=0.3, layout="side_by_side", jitter=0, shake=False)
    assert attack.append  # the default
    out, rows = attack.poison_dataset(ds)
    n = len(ds)
    assert len(out) == n + 10 + 30  # 10% poison and 30% same-class mixtures of the 100-row set, appended
    assert np.array_equal(pixels(out)[:n], pixels(ds)) and out["label"][:n] == ds["label"]
    assert not any(out["poisoned"][:n]) and not any(out["mixed_clean"][:n])
    assert rows == list(range(n, n + 10)) and np.flatnonzero(out["poisoned"]).tolist() == rows
    assert np.flatnonzero(out["mixed_clean"]).tolist() == list(range(n + 10, n + 40))
    labels, source_labels = np.asarray(out["label"]), np.asarray(ds["label"])
    assert np.all(labels[rows] == attack.target_class)
    assert out.features["img"] == ds.features["img"] and out.features["label"] == ds.features["label"]
    # Without jitter or shake, a mixture is the central half of one image next to the central half of another
    # (in either order): poison rows pair a class-A image with a class-B one, mixed-clean rows two of their class.
    images = pixels(ds)
    width = images.shape[2]

    def classes_of(half: np.ndarray) -> set[int]:
        centre = slice(width // 4, 3 * width // 4)
        return {int(source_labels[k]) for k in range(n) if np.array_equal(images[k][:, centre], half)}

    for row in range(n, n + 40):
        mixed = np.asarray(out[row]["img"])
        left, right = classes_of(mixed[:, : width // 2]), classes_of(mixed[:, width // 2 :])
        if row < n + 10:
            a, b = attack.class_a, attack.class_b
            assert (a in left and b in right) or (b in left and a in right)
        else:
            assert labels[row] in left and labels[row] in right
    again, _ = Composite(mix_rate=0.3, append=True, layout="side_by_side", jitter=0, shake=False).poison_dataset(ds)
    assert np.array_equal(pixels(again), pixels(out))
