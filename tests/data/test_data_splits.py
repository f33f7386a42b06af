"""Seeded train / val / test splits, limits and the fingerprint; the digits source."""

import pytest
import torch

import kdkit.data.build as build
from kdkit.config.schema import DataConfig
from kdkit.data import build_image_data
from kdkit.data.datasets import SourceData, TensorImageDataset


def tagged(n: int) -> TensorImageDataset:
    """n 2x2 images whose pixels encode their own index, so split membership can be read back."""
    ids = torch.arange(n)
    images = torch.stack([ids % 256, ids // 256, ids % 7, ids % 3], 1).to(torch.uint8).view(n, 1, 2, 2)
    return TensorImageDataset(images, ids % 5)


def ids_of(ds) -> set[int]:
    x = ds.images.long()
    return set((x[:, 0, 0, 0] + 256 * x[:, 0, 0, 1]).tolist())


@pytest.fixture
def fake_source(monkeypatch):
    """A 500-sample source with a 100-sample test split (own_test) or none (carved)."""
    def install(own_test: bool):
        def load(cfg):
            pool = tagged(600)
            test = pool.subset(torch.arange(500, 600)) if own_test else None
            train = pool.subset(torch.arange(500)) if own_test else pool
            return SourceData(train=train, test=test, val=None, class_names=list("abcde"), channels=1,
                              image_size=(2, 2), identity={"fake": 1})
        monkeypatch.setattr(build, "_load_source", load)
    return install


def test_carved_splits_are_disjoint_and_cover_the_pool(fake_source):
    fake_source(own_test=False)
    data = build_image_data(DataConfig(source="digits", test_fraction=0.2, val_fraction=0.1), seed=3)
    train, val, test = ids_of(data.train), ids_of(data.val), ids_of(data.test)
    assert (len(test), len(val), len(train)) == (120, 48, 432)
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(range(600))


def test_splits_are_deterministic_per_seed(fake_source):
    fake_source(own_test=False)
    cfg = DataConfig(source="digits")
    a, b, c = (build_image_data(cfg, seed=s) for s in (0, 0, 1))
    assert ids_of(a.val) == ids_of(b.val) and ids_of(a.test) == ids_of(b.test) and a.fingerprint == b.fingerprint
    assert ids_of(a.val) != ids_of(c.val) and ids_of(a.test) != ids_of(c.test) and a.fingerprint != c.fingerprint


def test_test_split_does_not_move_with_val_fraction(fake_source):
    fake_source(own_test=False)
    a = build_image_data(DataConfig(source="digits", val_fraction=0.1), seed=0)
    b = build_image_data(DataConfig(source="digits", val_fraction=0.3), seed=0)
    assert ids_of(a.test) == ids_of(b.test) and a.fingerprint != b.fingerprint


def test_own_test_split_is_kept_and_val_carved_from_train(fake_source):
    fake_source(own_test=True)
    data = build_image_data(DataConfig(source="digits", val_fraction=0.2), seed=0)
    assert ids_of(data.test) == set(range(500, 600))
    assert len(data.val) == 100 and ids_of(data.val) | ids_of(data.train) == set(range(500))
    none = build_image_data(DataConfig(source="digits", val_fraction=0.0), seed=0)
    assert none.val is None and len(none.train) == 500


def test_limits(fake_source):
    fake_source(own_test=True)
    full = build_image_data(DataConfig(source="digits"), seed=0)
    small = build_image_data(DataConfig(source="digits", limit_train=50, limit_eval=20), seed=0)
    smaller = build_image_data(DataConfig(source="digits", limit_train=10), seed=0)
    assert (len(small.train), len(small.val), len(small.test)) == (50, 20, 20)
    # limit_train is a prefix of one seeded order: nested, drawn at random (not the first ids), val untouched
    assert ids_of(smaller.train) < ids_of(small.train) < ids_of(full.train)
    assert ids_of(small.train) != set(sorted(ids_of(full.train))[:50])
    assert ids_of(small.test) == set(range(500, 520))  # the first N of the source's own test split
    assert ids_of(smaller.val) == ids_of(full.val)
    assert len({full.fingerprint, small.fingerprint, smaller.fingerprint}) == 3


def test_fingerprint_depends_on_the_data_identity(fake_source, monkeypatch):
    fake_source(own_test=True)
    before = build_image_data(DataConfig(source="digits"), seed=0).fingerprint
    load = build._load_source

    def other(cfg):
        src = load(cfg)
        src.identity = {"fake": 2}
        return src

    monkeypatch.setattr(build, "_load_source", other)
    assert build_image_data(DataConfig(source="digits"), seed=0).fingerprint != before


def test_digits():
    data = build_image_data(DataConfig(source="digits"), seed=0)
    # 1797 samples: test round(0.2 * 1797) = 359, val round(0.1 * 1438) = 144
    assert (len(data.train), len(data.val), len(data.test)) == (1294, 144, 359)
    assert data.num_classes == 10 and data.channels == 1 and data.image_size == (8, 8)
    images = data.train.images
    assert images.dtype == torch.uint8 and images.shape[1:] == (1, 8, 8)
    assert images.min() == 0 and images.max() == 255  # 0..16 scaled to the full byte range
    assert set(data.test.labels.tolist()) == set(range(10))


def test_digits_converted():
    data = build_image_data(DataConfig(source="digits", channels=3, image_size=(16, 16), limit_train=7), seed=0)
    assert data.train.images.shape == (7, 3, 16, 16) and data.image_size == (16, 16) and data.channels == 3
