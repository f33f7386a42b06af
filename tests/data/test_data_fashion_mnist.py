"""Fashion-MNIST: IDX parsing, search order, download checks, and the real Debian files."""

import gzip
import hashlib
import io
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import kdkit.data.fashion_mnist as fm
from kdkit.config.schema import DataConfig
from kdkit.data import build_image_data
from kdkit.errors import ConfigError, DataError

NAMES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


def idx_bytes(a: np.ndarray) -> bytes:
    a = np.ascontiguousarray(a, dtype=np.uint8)
    return bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def synthetic(n_train=12, n_test=6, h=4, w=5, seed=0):
    rng = np.random.default_rng(seed)
    return {"train_images": rng.integers(0, 256, (n_train, h, w), dtype=np.uint8),
            "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
            "test_images": rng.integers(0, 256, (n_test, h, w), dtype=np.uint8),
            "test_labels": (np.arange(n_test) % 10).astype(np.uint8)}


def write_set(directory: Path, arrays: dict, gz: bool) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for role, a in arrays.items():
        data = idx_bytes(a)
        path = directory / (NAMES[role] + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(data) if gz else data)
        paths[role] = path
    return paths


@pytest.fixture
def no_system(monkeypatch, tmp_path):
    """Hide the Debian copy and point the cache into tmp_path, so the search order is under test control."""
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "no-system")
    monkeypatch.setenv("KDKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "fashion-mnist"


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    arrays = synthetic()
    write_set(tmp_path, arrays, gz)
    src = fm.load_fashion_mnist(str(tmp_path), download=False, channels=None, image_size=None)
    assert torch.equal(src.train.images[:, 0], torch.from_numpy(arrays["train_images"]))
    assert torch.equal(src.test.labels, torch.from_numpy(arrays["test_labels"]).long())
    assert src.channels == 1 and src.image_size == (4, 5)
    # the identity is the hash of the decompressed content, so plain and gzip copies are the same data
    expected = hashlib.sha256(idx_bytes(arrays["train_images"])).hexdigest()
    assert src.identity["sha256"]["train-images-idx3-ubyte"] == expected

    data = build_image_data(DataConfig(source="fashion_mnist", path=str(tmp_path), val_fraction=0.25), seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (9, 3, 6)
    assert data.num_classes == 10 and data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot"
    assert data.train[0][0].dtype == torch.uint8 and data.train[0][0].shape == (1, 4, 5)


def test_plain_and_gz_give_the_same_fingerprint(tmp_path):
    arrays = synthetic()
    write_set(tmp_path / "plain", arrays, gz=False)
    write_set(tmp_path / "gz", arrays, gz=True)
    fps = [build_image_data(DataConfig(path=str(tmp_path / d)), seed=1).fingerprint for d in ("plain", "gz")]
    assert fps[0] == fps[1]


def test_channels_and_size_conversion(tmp_path):
    write_set(tmp_path, synthetic(), gz=False)
    data = build_image_data(DataConfig(path=str(tmp_path), channels=3, image_size=(8, 10)), seed=0)
    image, _ = data.test[0]
    assert data.channels == 3 and data.image_size == (8, 10) and image.shape == (3, 8, 10)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])  # grey repeated


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx_names_the_file(tmp_path, gz):
    paths = write_set(tmp_path, synthetic(), gz)
    bad = paths["train_images"]
    bad.write_bytes(bad.read_bytes()[:-7])
    with pytest.raises(DataError, match=bad.name):
        fm.load_fashion_mnist(str(tmp_path), download=False, channels=None, image_size=None)


def test_bad_magic_names_the_file(tmp_path):
    paths = write_set(tmp_path, synthetic(), gz=False)
    paths["test_labels"].write_bytes(b"\x12\x34" + paths["test_labels"].read_bytes()[2:])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.*magic"):
        fm.load_fashion_mnist(str(tmp_path), download=False, channels=None, image_size=None)


def test_wrong_rank_is_rejected(tmp_path):
    arrays = synthetic()
    arrays["train_labels"] = arrays["train_labels"].reshape(12, 1)  # rank 2 where rank 1 is expected
    write_set(tmp_path, arrays, gz=False)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.*rank 2"):
        fm.load_fashion_mnist(str(tmp_path), download=False, channels=None, image_size=None)


def test_label_out_of_range_names_file_and_sample(tmp_path):
    arrays = synthetic()
    arrays["test_labels"][3] = 10
    write_set(tmp_path, arrays, gz=True)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.*label 10 at sample 3"):
        fm.load_fashion_mnist(str(tmp_path), download=False, channels=None, image_size=None)


def test_image_label_count_mismatch(tmp_path):
    arrays = synthetic()
    arrays["train_labels"] = arrays["train_labels"][:11]
    write_set(tmp_path, arrays, gz=False)
    with pytest.raises(DataError, match="12 images but .* 11 labels"):
        fm.load_fashion_mnist(str(tmp_path), download=False, channels=None, image_size=None)


def test_missing_files_with_path_is_a_config_error(tmp_path):
    paths = write_set(tmp_path, synthetic(), gz=False)
    paths["test_images"].unlink()
    with pytest.raises(ConfigError) as info:
        build_image_data(DataConfig(path=str(tmp_path)), seed=0)
    assert info.value.problems[0][0] == "data.path"
    assert "t10k-images-idx3-ubyte" in info.value.problems[0][1]


def test_given_path_is_the_only_place_searched(tmp_path, no_system):
    write_set(no_system, synthetic(), gz=False)  # a complete copy in the cache must not be used
    with pytest.raises(ConfigError):
        build_image_data(DataConfig(path=str(tmp_path / "empty")), seed=0)


def test_cache_dir_is_searched_and_env_honoured(tmp_path, no_system, monkeypatch):
    write_set(no_system, synthetic(), gz=True)
    data = build_image_data(DataConfig(download=False), seed=0)
    assert data.image_size == (4, 5)
    monkeypatch.delenv("KDKIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fm.cache_dir() == tmp_path / "xdg" / "kdkit" / "fashion-mnist"


def test_nothing_found_explains_the_fixes(no_system):
    with pytest.raises(DataError) as info:
        build_image_data(DataConfig(download=False), seed=0)
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg and str(no_system) in msg and "data.path" in msg


def _serve(monkeypatch, arrays):
    blobs = {NAMES[r] + ".gz": gzip.compress(idx_bytes(a)) for r, a in arrays.items()}
    requested = []

    class Response(io.BytesIO):
        headers = {}

    def urlopen(url):
        assert url.startswith(fm.MIRROR)
        requested.append(url)
        return Response(blobs[url[len(fm.MIRROR):]])

    monkeypatch.setattr(fm, "_urlopen", urlopen)
    return requested


def test_download_checks_sha256_then_loads(monkeypatch, no_system):
    arrays = synthetic()
    files = {r: (name, rank, hashlib.sha256(idx_bytes(arrays[r])).hexdigest())
             for r, (name, rank, _) in fm.FILES.items()}
    monkeypatch.setattr(fm, "FILES", files)
    requested = _serve(monkeypatch, arrays)
    data = build_image_data(DataConfig(), seed=0)
    assert len(requested) == 4 and len(data.test) == 6
    assert sorted(p.name for p in no_system.iterdir()) == sorted(n + ".gz" for n in NAMES.values())


def test_download_checksum_mismatch_keeps_nothing(monkeypatch, no_system):
    arrays = synthetic()
    _serve(monkeypatch, arrays)  # the real checksums cannot match synthetic files
    with pytest.raises(DataError, match="checksum mismatch"):
        build_image_data(DataConfig(), seed=0)
    assert list(no_system.iterdir()) == []


def test_download_failure_explains_the_fixes(monkeypatch, no_system):
    def urlopen(url):
        raise OSError("network is unreachable")

    monkeypatch.setattr(fm, "_urlopen", urlopen)
    with pytest.raises(DataError, match=r"(?s)network is unreachable.*apt-get install dataset-fashion-mnist"):
        build_image_data(DataConfig(), seed=0)


@pytest.mark.skipif(not fm.SYSTEM_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_debian_files_load():
    src = fm.load_fashion_mnist(None, download=False, channels=None, image_size=None)
    assert src.train.images.shape == (60000, 1, 28, 28) and src.test.images.shape == (10000, 1, 28, 28)
    assert src.train.labels.min() == 0 and src.train.labels.max() == 9
    assert torch.bincount(src.test.labels).tolist() == [1000] * 10
    # the packaged files are byte-identical to the published ones
    assert src.identity["sha256"] == {name: sha for name, _, sha in fm.FILES.values()}
