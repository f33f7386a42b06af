"""Dataset types: every item is (image uint8 (C, H, W), label int).

In-memory data is a `TensorImageDataset`, which fetches a whole batch with one tensor index (`get_batch`);
file- or Hugging-Face-backed data decodes one image per item and is batched by `collate`.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from kdkit.data.images import load_image_file

# Sources with at most this many images (and at most EAGER_MAX_BYTES decoded) are decoded into memory when
# built: every file is checked up front, and training never decodes again. Larger ones decode per item.
EAGER_MAX_ITEMS = 20_000
EAGER_MAX_BYTES = 1 << 30


def fits_in_memory(n: int, channels: int, size: Sequence[int]) -> bool:
    """Whether n images of this shape are decoded eagerly (see EAGER_MAX_ITEMS / EAGER_MAX_BYTES)."""
    return n <= EAGER_MAX_ITEMS and n * channels * int(size[0]) * int(size[1]) <= EAGER_MAX_BYTES


class TensorImageDataset(Dataset):
    """images uint8 (N, C, H, W), labels int64 (N,), all in memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def get_batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """One tensor index for the whole batch: pixels float32 (B, C, H, W) in [0, 1], labels int64 (B,)."""
        return {"pixels": self.images[index].float().div_(255.0), "labels": self.labels[index]}

    def subset(self, index: torch.Tensor) -> "TensorImageDataset":
        # materialised (a copy) so batches of the subset stay a single contiguous index
        return TensorImageDataset(self.images[index], self.labels[index])


class SubsetDataset(Dataset):
    """The items `indices` of a lazily decoded dataset, in that order."""

    def __init__(self, base: Dataset, indices: torch.Tensor):
        self.base = base
        self.indices = indices.tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.base[self.indices[i]]

    def __getattr__(self, name: str) -> Any:
        # a whole-batch fetch of the base (padded token batches, in-memory images) keeps working on the subset
        if name == "get_batch" and hasattr(self.__dict__.get("base"), "get_batch"):
            indices = torch.tensor(self.indices, dtype=torch.int64)
            return lambda index: self.base.get_batch(indices[torch.as_tensor(index, dtype=torch.int64)])
        raise AttributeError(name)


def subset(ds: Dataset, index: torch.Tensor) -> Dataset:
    """ds restricted to `index` (int64 (K,)); in-memory datasets stay in-memory."""
    if isinstance(ds, TensorImageDataset):
        return ds.subset(index)
    if isinstance(ds, SubsetDataset):  # flatten, so nested carving stays one hop from the files
        return SubsetDataset(ds.base, torch.as_tensor(ds.indices, dtype=torch.int64)[index])
    return SubsetDataset(ds, index)


class FileImageDataset(Dataset):
    """Image files decoded on access; a bad file raises DataError naming it (also inside loader workers)."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], channels: int, size: tuple[int, int]):
        self.paths = [str(p) for p in paths]
        self.labels = [int(x) for x in labels]
        self.channels = channels
        self.size = (int(size[0]), int(size[1]))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return load_image_file(self.paths[i], self.channels, self.size), self.labels[i]


def decode_files(paths: Sequence[Path], channels: int, size: tuple[int, int]) -> torch.Tensor:
    """Decode every file -> uint8 (N, C, H, W); the first unreadable one raises DataError naming it."""
    out = torch.empty((len(paths), channels, *size), dtype=torch.uint8)

    def load(i: int) -> None:
        out[i] = load_image_file(paths[i], channels, size)

    # PIL releases the GIL while decoding, so threads give a real speed-up on many small files
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for _ in pool.map(load, range(len(paths))):
            pass
    return out


def file_datasets(splits: dict[str, tuple[list[Path], list[int]]], channels: int,
                  size: tuple[int, int]) -> dict[str, Dataset]:
    """split -> (image files, labels) as datasets: all decoded now when they fit in memory (every file checked up
    front), else each decoded when read (a bad file raises DataError naming it when the loader reaches it)."""
    eager = fits_in_memory(sum(len(p) for p, _ in splits.values()), channels, size)
    if eager:
        return {s: TensorImageDataset(decode_files(p, channels, size), torch.tensor(y, dtype=torch.int64))
                for s, (p, y) in splits.items()}
    return {s: FileImageDataset(p, y, channels, size) for s, (p, y) in splits.items()}


@dataclass
class SourceData:
    """What a source yields before splitting: the training pool and the splits the source itself defines."""

    train: Dataset                 # the pool validation (and test, when `test` is None) are carved from
    test: Dataset | None           # the source's own test split; None: carve cfg.test_fraction from train
    val: Dataset | None            # the source's own validation split; None: carve cfg.val_fraction from train
    class_names: list[str]
    channels: int
    image_size: tuple[int, int]
    identity: dict[str, Any] = field(default_factory=dict)  # what defines the raw data, for the fingerprint
