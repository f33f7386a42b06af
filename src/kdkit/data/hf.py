"""Hugging Face `datasets` sources: a save_to_disk directory, a local data directory, or a hub ID.

Labels are read (and range-checked) for every row up front, which is cheap; images of small splits are decoded
into memory at build time, those of large splits per item (a bad image -> DataError naming split and row).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kdkit.data.datasets import SourceData, TensorImageDataset, fits_in_memory
from kdkit.data.images import pil_channels, pil_to_tensor, to_pil
from kdkit.errors import ConfigError, DataError


def open_hf_dataset(path: str, key: str = "data.path", *, streaming: bool = False) -> dict[str, Any]:
    """split name -> datasets.Dataset, from a save_to_disk directory, a local data directory or a hub ID; problems
    are ConfigErrors at `key` (the config path naming the dataset). streaming: local data directories and hub IDs
    give datasets.IterableDataset splits, read lazily (a save_to_disk directory is memory-mapped anyway)."""
    try:
        import datasets
    except ImportError as e:
        raise DataError("source hf needs the `datasets` package: pip install 'kdkit[hf]'") from e
    local = Path(path).expanduser()
    try:
        if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
            obj = datasets.load_from_disk(str(local))
        else:
            obj = datasets.load_dataset(str(local) if local.exists() else path, streaming=streaming)
    except Exception as e:  # not found, no network, bad format: all mean the path does not name a usable dataset
        raise ConfigError([(key, f"cannot load Hugging Face dataset {path!r}: {type(e).__name__}: {e}")]) from e
    if isinstance(obj, (datasets.Dataset, datasets.IterableDataset)):  # a single saved split
        return {"train": obj}
    if not isinstance(obj, (datasets.DatasetDict, datasets.IterableDatasetDict)):  # the latter when streaming
        raise ConfigError([(key, f"{path!r} loads as {type(obj).__name__}; a map-style DatasetDict is needed")])
    return dict(obj)


def _labels(split: Any, name: str, column: str) -> np.ndarray:
    """The label column as int64 (N,); non-integer values -> DataError naming split and row."""
    values = split.select_columns([column]).with_format("numpy")[:][column]
    values = np.asarray(values)
    if values.dtype.kind in "iub":
        return values.astype(np.int64)
    if values.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
    else:
        bad = np.flatnonzero([not isinstance(v, (int, np.integer)) for v in values])
    if bad.size:
        i = int(bad[0])
        raise DataError(f"hf split {name!r} row {i}: label {values[i]!r} in column {column!r} is not an integer "
                        "class id (cast the column to a ClassLabel)")
    return values.astype(np.int64)


def _decode(value: Any, name: str, row: int, channels: int, size: tuple[int, int]) -> torch.Tensor:
    try:
        return pil_to_tensor(to_pil(value), channels, size)
    except Exception as e:
        raise DataError(f"hf split {name!r} row {row}: cannot read the image: {type(e).__name__}: {e}") from e


def _cell(images: Any, name: str, row: int, column: str) -> Any:
    try:
        return images[row][column]  # decoding happens here for datasets.Image columns
    except Exception as e:
        raise DataError(f"hf split {name!r} row {row}: cannot read the image: {type(e).__name__}: {e}") from e


class HFImageDataset(Dataset):
    """Rows of a Hugging Face split, decoded per item."""

    def __init__(self, split: Any, name: str, column: str, labels: np.ndarray, channels: int, size: tuple[int, int]):
        self.images = split.select_columns([column])  # so a row access decodes only the image
        self.name, self.column, self.labels = name, column, labels
        self.channels, self.size = channels, size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        value = _cell(self.images, self.name, i, self.column)
        return _decode(value, self.name, i, self.channels, self.size), int(self.labels[i])


def _materialise(split: Any, name: str, column: str, labels: np.ndarray, channels: int,
                 size: tuple[int, int]) -> TensorImageDataset:
    images = split.select_columns([column])
    out = torch.empty((len(labels), channels, *size), dtype=torch.uint8)
    step = 256
    for start in range(0, len(labels), step):
        try:
            cells = images[start:start + step][column]  # a slice decodes a whole chunk at once: much faster
        except Exception:
            cells = [_cell(images, name, r, column) for r in range(start, min(start + step, len(labels)))]
        for j, value in enumerate(cells):
            out[start + j] = _decode(value, name, start + j, channels, size)
    return TensorImageDataset(out, torch.from_numpy(labels))


def load_hf(cfg: Any) -> SourceData:
    """cfg: DataConfig. Train and test splits by name; channels default to the first training image's own."""
    problems = []
    if not cfg.path:
        problems.append(("data.path", "source hf needs a dataset: hub ID or local directory"))
    if cfg.image_size is None:
        problems.append(("data.image_size", "source hf needs the size [H, W] images are resized to"))
    if problems:
        raise ConfigError(problems)
    size = (int(cfg.image_size[0]), int(cfg.image_size[1]))
    splits = open_hf_dataset(cfg.path)
    wanted = {"train": (cfg.train_split, "data.train_split")}
    if cfg.test_split is not None:
        wanted["test"] = (cfg.test_split, "data.test_split")
    if getattr(cfg, "val_split", None) is not None:
        wanted["val"] = (cfg.val_split, "data.val_split")
    for split_name, key in wanted.values():
        if split_name not in splits:
            raise ConfigError([(key, f"split {split_name!r} not in {cfg.path!r}; available splits: {sorted(splits)}")])
    for split_name, _ in wanted.values():
        columns = splits[split_name].column_names
        for col, key in ((cfg.image_column, "data.image_column"), (cfg.label_column, "data.label_column")):
            if col not in columns:
                raise ConfigError([(key, f"column {col!r} not in split {split_name!r}; available columns: {columns}")])

    labels = {role: _labels(splits[s], s, cfg.label_column) for role, (s, _) in wanted.items()}
    feature = splits[cfg.train_split].features[cfg.label_column]
    names = getattr(feature, "names", None)  # a ClassLabel knows its classes
    if names:
        class_names = [str(n) for n in names]
    else:
        top = max((int(y.max()) for y in labels.values() if y.size), default=-1)
        class_names = [str(i) for i in range(top + 1)]
    for role, (s, _) in wanted.items():
        bad = np.flatnonzero((labels[role] < 0) | (labels[role] >= len(class_names)))
        if bad.size:
            i = int(bad[0])
            raise DataError(f"hf split {s!r} row {i}: label {int(labels[role][i])} in column {cfg.label_column!r} "
                            f"is out of range 0..{len(class_names) - 1}")
    if len(splits[cfg.train_split]) == 0:
        raise DataError(f"hf split {cfg.train_split!r} of {cfg.path!r} is empty")

    channels = cfg.channels
    if channels is None:  # the source's own: judged from the first training image
        first = _cell(splits[cfg.train_split].select_columns([cfg.image_column]), cfg.train_split, 0, cfg.image_column)
        try:
            channels = pil_channels(to_pil(first))
        except Exception as e:
            raise DataError(f"hf split {cfg.train_split!r} row 0: cannot read the image: {e}") from e
    eager = fits_in_memory(sum(len(y) for y in labels.values()), channels, size)
    build = _materialise if eager else HFImageDataset
    data = {role: build(splits[s], s, cfg.image_column, labels[role], channels, size)
            for role, (s, _) in wanted.items()}
    # datasets' own fingerprint (stored by save_to_disk, derived from the builder for hub data) stands for content
    used = {s: [getattr(splits[s], "_fingerprint", None), len(splits[s])] for s, _ in wanted.values()}
    return SourceData(
        train=data["train"], test=data.get("test"), val=data.get("val"), class_names=class_names, channels=channels,
        image_size=size, identity={"path": cfg.path, "columns": [cfg.image_column, cfg.label_column], "splits": used})
