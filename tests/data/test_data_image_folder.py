"""Image folders: both layouts, conversion, and errors that name the offending file or folder."""

from pathlib import Path

import pytest
import torch
from PIL import Image

import kdkit.data.datasets as dsmod
from kdkit.config.schema import DataConfig
from kdkit.data import build_image_data, make_loader
from kdkit.data.datasets import FileImageDataset, TensorImageDataset
from kdkit.errors import ConfigError, DataError

CLASSES = ["cat", "dog", "emu"]
COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "emu": (0, 0, 255)}


def make_folder(root: Path, per_class: int = 4) -> Path:
    """per_class PNGs of each class, each a solid class colour, of varying sizes and modes."""
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = Image.new("RGB", (5 + i, 7), COLOURS[name])
            (img.convert("RGBA") if i == 1 else img).save(root / name / f"{i}.png")
    return root


def cfg(root, **kw):
    return DataConfig(source="image_folder", path=str(root), image_size=(6, 6), **kw)


def test_flat_layout_carves_test_and_val(tmp_path):
    data = build_image_data(cfg(make_folder(tmp_path / "flat")), seed=0)
    # 12 images: test round(0.2 * 12) = 2, val round(0.1 * 10) = 1
    assert (len(data.train), len(data.val), len(data.test)) == (9, 1, 2)
    assert data.class_names == CLASSES and data.num_classes == 3
    assert data.channels == 3 and data.image_size == (6, 6)
    for ds in (data.train, data.val, data.test):
        for image, label in (ds[i] for i in range(len(ds))):
            assert image.shape == (3, 6, 6) and image.dtype == torch.uint8
            # every pixel is its class colour: labels follow the sorted folder names
            assert image[:, 0, 0].tolist() == list(COLOURS[CLASSES[label]])


def test_split_layout_uses_train_val_test(tmp_path):
    root = tmp_path / "splits"
    make_folder(root / "train")
    make_folder(root / "test", per_class=2)
    (root / "README.txt").write_text("not a split")
    data = build_image_data(cfg(root, val_fraction=0.25), seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (9, 3, 6)

    make_folder(root / "val", per_class=1)
    data = build_image_data(cfg(root), seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (12, 3, 6)


def test_grey_channels(tmp_path):
    data = build_image_data(cfg(make_folder(tmp_path / "f"), channels=1), seed=0)
    image, label = data.test[0]
    assert image.shape == (1, 6, 6) and data.channels == 1
    r, g, b = COLOURS[CLASSES[label]]
    assert abs(int(image[0, 0, 0]) - round(0.299 * r + 0.587 * g + 0.114 * b)) <= 1


def test_corrupt_png_names_the_file(tmp_path):
    root = make_folder(tmp_path / "f")
    bad = root / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError, match="broken.png"):
        build_image_data(cfg(root), seed=0)


def test_truncated_png_names_the_file(tmp_path):
    root = make_folder(tmp_path / "f")
    bad = root / "emu" / "2.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(DataError, match=r"emu.2\.png"):
        build_image_data(cfg(root), seed=0)


@pytest.mark.parametrize("workers", [0, 1])
def test_large_folders_decode_lazily_and_name_bad_files_in_training(tmp_path, monkeypatch, workers):
    monkeypatch.setattr(dsmod, "EAGER_MAX_ITEMS", 0)  # pretend the folder is large
    root = make_folder(tmp_path / "f")
    good = build_image_data(cfg(root, val_fraction=0.0), seed=0)
    assert isinstance(good.train.base, FileImageDataset)
    (root / "cat" / "3.png").write_bytes(b"not an image")
    data = build_image_data(cfg(root, val_fraction=0.0), seed=0)  # building does not decode
    loader = make_loader(data.train, batch_size=4, shuffle=False, seed=0, num_workers=workers)
    with pytest.raises(DataError, match=r"cat.3\.png") as info:
        for _ in loader:
            pass
    assert "Traceback" not in str(info.value)  # one clean line even when it comes from a worker process


def test_lazy_and_eager_agree(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "f")
    eager = build_image_data(cfg(root), seed=5)
    monkeypatch.setattr(dsmod, "EAGER_MAX_ITEMS", 0)
    lazy = build_image_data(cfg(root), seed=5)
    assert isinstance(eager.train, TensorImageDataset) and not isinstance(lazy.train, TensorImageDataset)
    assert eager.fingerprint == lazy.fingerprint
    for i in range(len(eager.train)):
        assert torch.equal(eager.train[i][0], lazy.train[i][0]) and eager.train[i][1] == lazy.train[i][1]


def test_empty_class_folder_is_named(tmp_path):
    root = make_folder(tmp_path / "f")
    (root / "fox").mkdir()
    (root / "fox" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"fox.*no images"):
        build_image_data(cfg(root), seed=0)


def test_empty_root(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-directories"):
        build_image_data(cfg(tmp_path / "empty"), seed=0)


def test_unknown_class_in_test_split(tmp_path):
    root = tmp_path / "splits"
    make_folder(root / "train")
    make_folder(root / "test", per_class=1)
    (root / "test" / "yak").mkdir()
    Image.new("RGB", (4, 4)).save(root / "test" / "yak" / "0.png")
    with pytest.raises(DataError, match=r"test.*yak"):
        build_image_data(cfg(root), seed=0)


def test_config_problems(tmp_path):
    with pytest.raises(ConfigError) as info:
        build_image_data(DataConfig(source="image_folder", path=str(make_folder(tmp_path / "f"))), seed=0)
    assert [p for p, _ in info.value.problems] == ["data.image_size"]
    with pytest.raises(ConfigError) as info:
        build_image_data(DataConfig(source="image_folder", path=str(tmp_path / "nope"), image_size=(4, 4)), seed=0)
    assert [p for p, _ in info.value.problems] == ["data.path"]


def test_fingerprint_tracks_files(tmp_path):
    root = make_folder(tmp_path / "f")
    before = build_image_data(cfg(root), seed=0).fingerprint
    Image.new("RGB", (9, 9), (1, 2, 3)).save(root / "cat" / "extra.png")
    assert build_image_data(cfg(root), seed=0).fingerprint != before
