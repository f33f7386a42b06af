"""`build_image_data`: a source, split into train / val / test by the seed, with a fingerprint of it all."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from kdkit.config.schema import DataConfig
from kdkit.data.datasets import SourceData, TensorImageDataset, subset
from kdkit.data.images import convert_images
from kdkit.errors import DataError

FINGERPRINT_VERSION = 1  # bump when the split procedure changes, so old runs are not resumed on new splits


@dataclass
class ImageData:
    """The three splits and what the model side needs to know about them."""

    train: Dataset
    val: Dataset | None
    test: Dataset
    num_classes: int
    class_names: list[str]
    channels: int
    image_size: tuple[int, int]
    fingerprint: str  # sha256 hex of the source's content identity, the split indices and the limits


def load_digits_source(channels: int | None, image_size: tuple[int, int] | None) -> SourceData:
    """scikit-learn's 1797 8x8 digits (offline); values 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
    images = torch.from_numpy(pixels).unsqueeze(1)  # (N, 1, 8, 8)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    identity = {"sha256": hashlib.sha256(pixels.tobytes() + bunch.target.astype("<i8").tobytes()).hexdigest()}
    images = convert_images(images, channels, image_size)
    return SourceData(train=TensorImageDataset(images, labels), test=None, val=None,
                      class_names=[str(i) for i in range(10)], channels=images.shape[1],
                      image_size=(images.shape[2], images.shape[3]), identity=identity)


def _load_source(cfg: DataConfig) -> SourceData:
    size = tuple(cfg.image_size) if cfg.image_size else None
    if cfg.source == "fashion_mnist":
        from kdkit.data.fashion_mnist import load_fashion_mnist
        return load_fashion_mnist(cfg.path, cfg.download, cfg.channels, size)
    if cfg.source == "digits":
        return load_digits_source(cfg.channels, size)
    if cfg.source == "image_folder":
        from kdkit.data.folder import load_image_folder
        return load_image_folder(cfg.path, cfg.channels, size)
    if cfg.source == "hf":
        from kdkit.data.hf import load_hf
        return load_hf(cfg)
    if cfg.source == "jsonl":
        from kdkit.data.manifest import load_jsonl_images
        return load_jsonl_images(cfg.path, cfg.channels, size, cfg.image_column, cfg.label_column)
    raise DataError(f"unknown data source {cfg.source!r}")  # unreachable: the schema restricts it


def seeded_permutation(n: int, seed: int, purpose: str) -> torch.Tensor:
    """A permutation of range(n) from (seed, purpose): the test carve does not move when val_fraction changes."""
    s = int.from_bytes(hashlib.sha256(f"kdkit/{purpose}/{seed}".encode()).digest()[:8], "little") >> 1
    return torch.randperm(n, generator=torch.Generator().manual_seed(s))


def _carve_count(n: int, fraction: float, what: str, key: str) -> int:
    """round(n * fraction), at least 1, leaving at least 1 behind."""
    if n < 2:
        raise DataError(f"{n} training sample(s) are too few to carve a {what} split from ({key}={fraction})")
    return min(max(int(round(n * fraction)), 1), n - 1)


def _digest(index: torch.Tensor) -> str:
    return hashlib.sha256(index.numpy().astype("<i8").tobytes()).hexdigest()


def build_image_data(cfg: DataConfig, seed: int) -> ImageData:
    """Load cfg.source and split it.

    test: the source's own test split, else a seeded cfg.test_fraction of the train split. val: the source's own
    (image folders with val/), else a seeded cfg.val_fraction of what remains (none when 0). train: the rest, in
    a seeded order of which cfg.limit_train keeps the first N. cfg.limit_eval keeps the first N of val and test.
    Every split's indices are sorted, so a dataset read in order reads its files in order.
    """
    src = _load_source(cfg)
    n = len(src.train)
    if n == 0:
        raise DataError(f"the training split of {cfg.source} {cfg.path or ''} is empty")
    rest = torch.arange(n)
    if src.test is None:
        perm = seeded_permutation(n, seed, "test")
        k = _carve_count(n, cfg.test_fraction, "test", "data.test_fraction")
        test_base, test_order, rest = src.train, perm[:k], perm[k:]
    else:
        test_base, test_order = src.test, torch.arange(len(src.test))

    if src.val is not None:
        val_base, val_order = src.val, torch.arange(len(src.val))
        train_order = rest[seeded_permutation(len(rest), seed, "train")]
    elif cfg.val_fraction > 0:
        shuffled = rest[seeded_permutation(len(rest), seed, "val")]
        k = _carve_count(len(shuffled), cfg.val_fraction, "validation", "data.val_fraction")
        val_base, val_order, train_order = src.train, shuffled[:k], shuffled[k:]
    else:
        val_base, val_order = None, None
        train_order = rest[seeded_permutation(len(rest), seed, "train")]

    if cfg.limit_train:
        train_order = train_order[:cfg.limit_train]
    if cfg.limit_eval:
        test_order = test_order[:cfg.limit_eval]
        val_order = val_order[:cfg.limit_eval] if val_order is not None else None
    picks = {"train": (src.train, train_order), "val": (val_base, val_order), "test": (test_base, test_order)}
    splits, described = {}, {}
    for name, (base, order) in picks.items():
        if order is None:
            splits[name], described[name] = None, None
            continue
        index = torch.sort(order).values
        splits[name] = subset(base, index)
        # which pool a split was drawn from matters as much as its indices
        of = "train" if base is src.train else name
        described[name] = {"of": of, "n": len(index), "index_sha256": _digest(index)}
    if len(splits["test"]) == 0:
        raise DataError(f"the test split of {cfg.source} {cfg.path or ''} is empty")

    payload = {
        "version": FINGERPRINT_VERSION, "source": cfg.source, "identity": src.identity,
        "channels": src.channels, "image_size": list(src.image_size), "class_names": src.class_names,
        "splits": described, "limit_train": cfg.limit_train, "limit_eval": cfg.limit_eval,
    }
    fingerprint = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return ImageData(train=splits["train"], val=splits["val"], test=splits["test"],
                     num_classes=len(src.class_names), class_names=list(src.class_names), channels=src.channels,
                     image_size=tuple(src.image_size), fingerprint=fingerprint)
