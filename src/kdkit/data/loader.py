"""Deterministic, resumable, shardable batches: the order is a pure function of (seed, epoch, rank, world_size).

A batch sampler yields lists of dataset indices; the DataLoader hands each list to a batch-level fetch, so an
in-memory dataset fetches a whole batch with one tensor index, and num_workers > 0 works for decoded data.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from kdkit.errors import DataError


def num_batches(n_samples: int, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
    """Batches one rank sees per epoch (the per-rank share is padded up to ceil(n / world_size))."""
    per_rank = -(-n_samples // world_size)
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)


def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int = 0, rank: int = 0,
                world_size: int = 1) -> torch.Tensor:
    """This rank's dataset indices for the epoch, int64 (ceil(n / world_size),).

    randperm(n) from a generator seeded with seed + epoch (arange when not shuffling); with world_size > 1 the
    order is padded by wrapping around to a multiple of world_size (as DistributedSampler) and strided by rank.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    else:
        order = torch.arange(n)
    if world_size > 1 and n:
        pad = -(-n // world_size) * world_size - n
        if pad:
            order = torch.cat([order, order.repeat(-(-pad // n))[:pad]])
        order = order[rank::world_size]
    return order


class EpochBatchSampler(Sampler[list[int]]):
    """Consecutive batch_size slices of `epoch_order`, minus the first skip_batches (never loaded)."""

    def __init__(self, n: int, *, batch_size: int, shuffle: bool, seed: int, epoch: int = 0, rank: int = 0,
                 world_size: int = 1, skip_batches: int = 0, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.order = epoch_order(n, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world_size=world_size)
        self.batch_size = batch_size
        self.total = num_batches(n, batch_size, world_size, drop_last)
        self.skip = min(max(skip_batches, 0), self.total)

    def __len__(self) -> int:
        return self.total - self.skip

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(self.skip, self.total):
            yield self.order[i * self.batch_size:(i + 1) * self.batch_size].tolist()


def collate(samples: Sequence[tuple]) -> dict[str, torch.Tensor]:
    """[(image uint8 (C, H, W), label[, index]), ...] -> {"pixels": float32 (B, C, H, W) in [0, 1], "labels"
    int64 (B,)[, "index" int64 (B,)]}."""
    images = torch.stack([s[0] for s in samples])  # (B, C, H, W)
    pixels = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    batch = {"pixels": pixels, "labels": torch.tensor([int(s[1]) for s in samples], dtype=torch.int64)}
    if samples and len(samples[0]) > 2:
        batch["index"] = torch.tensor([int(s[2]) for s in samples], dtype=torch.int64)
    return batch


class WorkerDataError(DataError):
    """A DataError raised in a loader worker. The DataLoader re-raises it in the main process as
    `type(e)(text with the worker's whole traceback)`; this class recovers the original message from that
    text, so the CLI still prints one line naming the file."""

    def __init__(self, message: str):
        marker = f"{type(self).__module__}.{type(self).__qualname__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class _BatchFetch(Dataset):
    """Indexed by a whole list of indices: one call (in a worker or not) builds one batch."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = torch.tensor(indices, dtype=torch.int64)
        get_batch = getattr(self.dataset, "get_batch", None)
        try:
            if get_batch is not None:
                batch = get_batch(index)
            else:
                batch = collate([self.dataset[i] for i in indices])
        except DataError as e:
            if get_worker_info() is None or isinstance(e, WorkerDataError):
                raise
            raise WorkerDataError(str(e)) from e
        batch["index"] = index
        return batch


def _as_is(batch: Any) -> Any:
    return batch  # module level so worker processes can pickle it


def make_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int, epoch: int = 0, rank: int = 0,
                world_size: int = 1, skip_batches: int = 0, drop_last: bool = False,
                num_workers: int = 0) -> DataLoader:
    """One epoch of {"pixels": float32 (B, C, H, W), "labels": int64 (B,), "index": int64 (B,)} for this rank.

    `len()` of the result is the number of batches still to come (after skip_batches).
    """
    sampler = EpochBatchSampler(len(dataset), batch_size=batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                                rank=rank, world_size=world_size, skip_batches=skip_batches, drop_last=drop_last)
    # batch_size=None: the sampler's lists go to _BatchFetch whole, not element by element
    # A private generator: creating a DataLoader iterator draws a worker base seed, and drawing it from the
    # global RNG would shift dropout masks after a resume (or after an evaluation) and break exact resume.
    generator = torch.Generator().manual_seed(seed + epoch)
    return DataLoader(_BatchFetch(dataset), batch_size=None, sampler=sampler, collate_fn=_as_is,
                      num_workers=num_workers, generator=generator)
