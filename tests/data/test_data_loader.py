"""make_loader: order from seed + epoch, exact resume by skip_batches, rank sharding, drop_last, workers."""

from collections import Counter

import pytest
import torch
from torch.utils.data import Dataset

from kdkit.data import TensorImageDataset, collate, make_loader, num_batches


def numbered(n: int) -> TensorImageDataset:
    """Item i is a 1x2x2 image filled with i and label i % 3."""
    images = torch.arange(n).view(n, 1, 1, 1).expand(n, 1, 2, 2).to(torch.uint8).contiguous()
    return TensorImageDataset(images, torch.arange(n) % 3)


class Counting(Dataset):
    """The same items through __getitem__ only (no get_batch), counting what gets loaded."""

    def __init__(self, n):
        self.inner, self.loaded = numbered(n), []

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.loaded.append(i)
        return self.inner[i]


def order(loader):
    return torch.cat([b["index"] for b in loader]).tolist()


def test_batch_format():
    batches = list(make_loader(numbered(10), batch_size=4, shuffle=True, seed=0))
    assert [len(b["labels"]) for b in batches] == [4, 4, 2]
    b = batches[0]
    assert set(b) == {"pixels", "labels", "index"}
    assert b["pixels"].dtype == torch.float32 and b["pixels"].shape == (4, 1, 2, 2)
    assert b["labels"].dtype == torch.int64 and b["index"].dtype == torch.int64
    # pixels and labels belong to the indices reported
    assert torch.allclose(b["pixels"][:, 0, 0, 0], b["index"].float() / 255)
    assert torch.equal(b["labels"], b["index"] % 3)


@pytest.mark.parametrize("epoch", [0, 3])
def test_shuffled_order_is_randperm_of_seed_plus_epoch(epoch):
    expected = torch.randperm(23, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
    assert order(make_loader(numbered(23), batch_size=5, shuffle=True, seed=7, epoch=epoch)) == expected
    assert order(make_loader(numbered(23), batch_size=5, shuffle=False, seed=7, epoch=epoch)) == list(range(23))


def test_epochs_differ():
    a = order(make_loader(numbered(50), batch_size=8, shuffle=True, seed=0, epoch=0))
    b = order(make_loader(numbered(50), batch_size=8, shuffle=True, seed=0, epoch=1))
    assert a != b and sorted(a) == sorted(b) == list(range(50))


@pytest.mark.parametrize("skip", [0, 1, 3, 5, 9])
def test_skip_batches_is_the_exact_tail_and_loads_nothing_skipped(skip):
    full = [b["index"].tolist() for b in make_loader(numbered(23), batch_size=5, shuffle=True, seed=1, epoch=2)]
    ds = Counting(23)
    loader = make_loader(ds, batch_size=5, shuffle=True, seed=1, epoch=2, skip_batches=skip)
    assert len(loader) == max(0, 5 - skip)
    rest = [b["index"].tolist() for b in loader]
    assert rest == full[skip:]
    assert sorted(ds.loaded) == sorted(i for batch in full[skip:] for i in batch)


@pytest.mark.parametrize("n,world", [(24, 2), (23, 2), (10, 3), (2, 4)])
def test_ranks_cover_every_sample_once_per_epoch(n, world):
    shards = [order(make_loader(numbered(n), batch_size=4, shuffle=True, seed=5, rank=r, world_size=world))
              for r in range(world)]
    per_rank = -(-n // world)
    assert all(len(s) == per_rank for s in shards)  # padded so all ranks take the same number of steps
    counts = Counter(i for s in shards for i in s)
    assert set(counts) == set(range(n))
    assert sum(counts.values()) - n == per_rank * world - n  # exactly the padding is repeated
    # like DistributedSampler: pad by wrapping the permutation, then stride by rank
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(5)).tolist()
    padded = (perm * (per_rank * world // n + 1))[:per_rank * world]
    assert shards == [padded[r::world] for r in range(world)]


def test_drop_last():
    sizes = [len(b["index"]) for b in make_loader(numbered(23), batch_size=5, shuffle=True, seed=0, drop_last=True)]
    assert sizes == [5, 5, 5, 5]
    assert num_batches(23, 5, drop_last=True) == 4 and num_batches(23, 5) == 5


def test_num_batches_matches_the_loader():
    for n in (1, 7, 23, 24, 40):
        for bs in (1, 4, 5, 64):
            for world in (1, 2, 3):
                for drop in (False, True):
                    loader = make_loader(numbered(n), batch_size=bs, shuffle=True, seed=0, rank=world - 1,
                                         world_size=world, drop_last=drop)
                    assert len(list(loader)) == len(loader) == num_batches(n, bs, world, drop), (n, bs, world, drop)


def test_generic_dataset_and_workers_give_the_same_batches():
    ref = list(make_loader(numbered(17), batch_size=4, shuffle=True, seed=3))
    for ds, workers in ((Counting(17), 0), (numbered(17), 2), (Counting(17), 1)):
        got = list(make_loader(ds, batch_size=4, shuffle=True, seed=3, num_workers=workers))
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            assert all(torch.equal(a[k], b[k]) for k in ("pixels", "labels", "index"))


def test_collate():
    samples = [(torch.full((3, 2, 2), 255, dtype=torch.uint8), 1), (torch.zeros(3, 2, 2, dtype=torch.uint8), 0)]
    b = collate(samples)
    assert b["pixels"].shape == (2, 3, 2, 2) and b["pixels"].dtype == torch.float32
    assert b["pixels"][0].eq(1).all() and b["pixels"][1].eq(0).all()
    assert b["labels"].tolist() == [1, 0] and "index" not in b
    assert collate([(s[0], s[1], i + 10) for i, s in enumerate(samples)])["index"].tolist() == [10, 11]
