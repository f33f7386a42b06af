"""augment_batch (determinism, crop, flip, random-resized crop) and preprocess."""

import time

import pytest
import torch

from kdkit.config.schema import AugmentConfig
from kdkit.data import augment_batch, preprocess
from kdkit.errors import ConfigError


def gen(seed):
    return torch.Generator().manual_seed(seed)


def batch(b=64, c=1, h=12, w=10, seed=0):
    return torch.rand(b, c, h, w, generator=gen(seed))


def shift(x, dy, dx):
    """x (C, H, W) moved by (dy, dx), zeros entering: what a padded crop at that offset shows."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


ALL = AugmentConfig(random_crop_padding=2, hflip=True, random_resized_crop=(0.5, 1.0))


@pytest.mark.parametrize("cfg", [AugmentConfig(random_crop_padding=3), AugmentConfig(hflip=True),
                                 AugmentConfig(random_resized_crop=(0.3, 0.9)), ALL])
def test_deterministic_given_the_generator(cfg):
    x = batch(c=3)
    a, b, c = augment_batch(x, cfg, gen(1)), augment_batch(x, cfg, gen(1)), augment_batch(x, cfg, gen(2))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_identity_when_off():
    x = batch()
    assert augment_batch(x, AugmentConfig(), gen(0)) is x


def test_crop_shifts_content_with_zero_padding():
    x = batch(b=64, c=2) + 0.01  # strictly positive, so entering zeros are distinguishable
    out = augment_batch(x, AugmentConfig(random_crop_padding=2), gen(3))
    offsets = []
    for i in range(len(x)):
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if torch.equal(out[i], shift(x[i], dy, dx))]
        assert len(found) == 1, f"sample {i} is not a shifted copy of its input"
        offsets.append(found[0])
    assert len(set(offsets)) > 10  # per sample, not one offset for the batch


def test_flip_flips_about_half():
    x = batch(b=200, c=3)
    out = augment_batch(x, AugmentConfig(hflip=True), gen(4))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(out[i], x[i]) for i in range(len(x))]
    assert all(f != k for f, k in zip(flipped, kept))
    assert 70 < sum(flipped) < 130


def test_random_resized_crop():
    x = batch(b=32, c=1, h=16, w=16)
    out = augment_batch(x, AugmentConfig(random_resized_crop=(0.5, 0.5)), gen(5))
    assert out.shape == x.shape and not torch.equal(out, x)
    const = torch.full((4, 3, 9, 7), 0.25)
    assert torch.allclose(augment_batch(const, AugmentConfig(random_resized_crop=(0.2, 1.0)), gen(0)), const)
    # a crop zooms in: each row of a 0..1 ramp then spans only the crop's width, sqrt(0.25 * aspect) of it
    ramp = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(8, 1, 16, 16).contiguous()
    zoomed = augment_batch(ramp, AugmentConfig(random_resized_crop=(0.25, 0.25)), gen(6))
    spans = zoomed[..., -1] - zoomed[..., 0]  # (8, 1, 16)
    assert ((spans > 0.35) & (spans < 0.65)).all()
    assert (zoomed[..., 1:] >= zoomed[..., :-1] - 1e-6).all()  # no flips or shuffles inside the crop


def test_random_resized_crop_rejects_bad_scale():
    # the schema refuses it when the config loads, so a run never starts with it
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="random_resized_crop"):
        AugmentConfig(random_resized_crop=(0.9, 0.5))


def test_fast_enough_for_every_step():
    x = torch.rand(256, 1, 28, 28)
    g = gen(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU time of this thread alone: stable even when other processes load the machine
    try:
        augment_batch(x, ALL, g)
        best = float("inf")
        for _ in range(10):
            t = time.thread_time()
            augment_batch(x, ALL, g)
            best = min(best, time.thread_time() - t)
    finally:
        torch.set_num_threads(threads)
    assert best < 0.02, f"{best * 1e3:.1f} ms"  # ~2 ms single-threaded here; generous for slow CI machines


def test_preprocess_normalises():
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    out = preprocess(x, (4, 4), mean=[0.5, 0.5, 0.0], std=[0.5, 0.25, 2.0])
    assert torch.allclose(out[:, :, 0, 0], torch.tensor([[-1.0, 0.0, 0.5]] * 2))


def test_preprocess_channels():
    grey = torch.rand(2, 1, 5, 5)
    rgb = preprocess(grey, (5, 5), mean=[0, 0, 0], std=[1, 1, 1])
    assert rgb.shape == (2, 3, 5, 5) and torch.equal(rgb[:, 0], grey[:, 0]) and torch.equal(rgb[:, 2], grey[:, 0])
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1.0
    assert torch.allclose(preprocess(red, (2, 2), mean=[0], std=[1]), torch.full((1, 1, 2, 2), 0.299))


def test_preprocess_resize():
    x = torch.full((3, 1, 28, 28), 0.75)
    up = preprocess(x, (56, 40), mean=[0.0], std=[1.0])
    assert up.shape == (3, 1, 56, 40) and torch.allclose(up, torch.full_like(up, 0.75))
    # shrinking is antialiased: a one-pixel line keeps its mean instead of falling between the samples
    line = torch.zeros(1, 1, 32, 32)
    line[..., 15] = 1.0  # plain bilinear would sample columns 13.5 and 17.5 and see nothing of it
    small = preprocess(line, (8, 8), mean=[0.0], std=[1.0])
    assert small.shape == (1, 1, 8, 8) and abs(small.mean().item() - line.mean().item()) < 1e-4
