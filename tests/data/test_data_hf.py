"""Hugging Face sources: a tiny DatasetDict saved with save_to_disk and loaded through data.path."""

import numpy as np
import pytest
import torch
from PIL import Image

datasets = pytest.importorskip("datasets")

import kdkit.data.datasets as dsmod  # noqa: E402
from kdkit.config.schema import DataConfig  # noqa: E402
from kdkit.data import build_image_data  # noqa: E402
from kdkit.errors import ConfigError, DataError  # noqa: E402


def split(labels, mode="RGB", label_feature=None):
    images = [Image.new(mode, (6 + i % 3, 5), (40 * y, i, 200) if mode == "RGB" else 40 * y)
              for i, y in enumerate(labels)]
    features = datasets.Features({"img": datasets.Image(),
                                  "y": label_feature or datasets.ClassLabel(names=["a", "b", "c", "d"])})
    return datasets.Dataset.from_dict({"img": images, "y": list(labels)}, features=features)


def save(tmp_path, **splits):
    path = tmp_path / "hfdata"
    datasets.DatasetDict(splits).save_to_disk(str(path))
    return str(path)


def cfg(path, **kw):
    return DataConfig(source="hf", path=path, image_column="img", label_column="y", image_size=(4, 4), **kw)


def test_save_to_disk_round_trip(tmp_path):
    path = save(tmp_path, train=split([0, 1, 2] * 4), test=split([2, 1, 0]))
    data = build_image_data(cfg(path, val_fraction=0.25), seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (9, 3, 3)
    assert data.class_names == ["a", "b", "c", "d"] and data.num_classes == 4  # from the ClassLabel
    assert data.channels == 3 and data.image_size == (4, 4)
    image, label = data.test[0]
    assert image.shape == (3, 4, 4) and image.dtype == torch.uint8 and label == 2
    assert image[0, 0, 0] == 80 and image[2, 0, 0] == 200  # the pixels of test row 0, resized


def test_grey_images_keep_one_channel_and_convert_on_request(tmp_path):
    path = save(tmp_path, train=split([0, 1] * 5, mode="L"), test=split([1, 0], mode="L"))
    assert build_image_data(cfg(path), seed=0).channels == 1
    data = build_image_data(cfg(path, channels=3), seed=0)
    assert data.channels == 3 and data.test[0][0].shape == (3, 4, 4)


def test_plain_int_labels_and_carved_test(tmp_path):
    path = save(tmp_path, train=split([0, 4, 1, 2] * 3, label_feature=datasets.Value("int64")))
    data = build_image_data(cfg(path, test_split=None), seed=0)
    assert data.num_classes == 5 and data.class_names == ["0", "1", "2", "3", "4"]  # max label + 1
    assert (len(data.train), len(data.val), len(data.test)) == (9, 1, 2)


def test_label_out_of_range_names_split_and_row(tmp_path):
    ints = datasets.Value("int64")
    path = save(tmp_path, train=split([0, 1, 2, 1], label_feature=ints), test=split([0, 1, -1], label_feature=ints))
    with pytest.raises(DataError, match=r"split 'test' row 2: label -1"):
        build_image_data(cfg(path), seed=0)


def test_label_beyond_class_label_names(tmp_path):
    ints = datasets.Value("int64")
    train = split([0, 1, 2, 1], label_feature=ints).cast_column("y", datasets.ClassLabel(names=["a", "b", "c"]))
    test = split([0, 3], label_feature=ints)  # test keeps plain ints: 3 is not a class of train's ClassLabel
    with pytest.raises(DataError, match=r"split 'test' row 1: label 3 .* out of range 0\.\.2"):
        build_image_data(cfg(save(tmp_path, train=train, test=test)), seed=0)


def test_missing_column_lists_columns(tmp_path):
    path = save(tmp_path, train=split([0, 1, 2]), test=split([0]))
    with pytest.raises(ConfigError) as info:
        build_image_data(DataConfig(source="hf", path=path, image_column="img", image_size=(4, 4)), seed=0)
    (where, msg), = info.value.problems
    assert where == "data.label_column" and "'label'" in msg and "['img', 'y']" in msg


def test_missing_split_lists_splits(tmp_path):
    path = save(tmp_path, train=split([0, 1, 2]), validation=split([0]))
    with pytest.raises(ConfigError) as info:
        build_image_data(cfg(path), seed=0)
    (where, msg), = info.value.problems
    assert where == "data.test_split" and "['train', 'validation']" in msg


def test_image_size_required(tmp_path):
    path = save(tmp_path, train=split([0, 1, 2]), test=split([0]))
    with pytest.raises(ConfigError) as info:
        build_image_data(DataConfig(source="hf", path=path, image_column="img", label_column="y"), seed=0)
    assert info.value.problems[0][0] == "data.image_size"


def test_lazy_decoding_matches_eager(tmp_path, monkeypatch):
    path = save(tmp_path, train=split([0, 1, 2, 3] * 3), test=split([3, 2]))
    eager = build_image_data(cfg(path), seed=1)
    monkeypatch.setattr(dsmod, "EAGER_MAX_ITEMS", 0)
    lazy = build_image_data(cfg(path), seed=1)
    assert eager.fingerprint == lazy.fingerprint
    for a, b in ((eager.train, lazy.train), (eager.test, lazy.test)):
        assert len(a) == len(b)
        for i in range(len(a)):
            assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]


def test_array_images(tmp_path):
    arrays = [np.full((5, 7), 10 * i, dtype=np.uint8) for i in range(6)]
    ds = datasets.Dataset.from_dict({"img": arrays, "y": [0, 1] * 3})
    path = save(tmp_path, train=ds, test=ds)
    data = build_image_data(cfg(path, val_fraction=0.0), seed=0)
    assert data.channels == 1
    assert sorted(int(data.test[i][0][0, 0, 0]) for i in range(6)) == [0, 10, 20, 30, 40, 50]


def test_own_validation_split(tmp_path):
    path = save(tmp_path, train=split([0, 1, 2] * 4), validation=split([1, 1]), test=split([2, 1, 0]))
    data = build_image_data(cfg(path, val_split="validation"), seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (12, 2, 3)
    with pytest.raises(ConfigError, match="data.val_split"):
        build_image_data(cfg(path, val_split="dev"), seed=0)
