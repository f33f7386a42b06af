"""Batch-level augmentation (runs every step, vectorised) and the model-side preprocessing."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kdkit.config.schema import AugmentConfig
from kdkit.data.images import adapt_channels, resize
from kdkit.errors import ConfigError


def _rand(generator: torch.Generator, *shape: int) -> torch.Tensor:
    # draw on the generator's own device (normally CPU) so the stream depends only on its state, not on pixels
    return torch.rand(*shape, generator=generator, device=generator.device, dtype=torch.float64)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by `padding`, then crop back to (H, W) at a random per-sample offset. (B, C, H, W) -> same."""
    off = torch.randint(0, 2 * padding + 1, (x.shape[0], 2), generator=generator, device=generator.device)
    return _crop_at(x, padding, off)


def _crop_at(x: torch.Tensor, padding: int, off: torch.Tensor) -> torch.Tensor:
    """The padded crop of each sample at its offset off (B, 2) (rows, columns into the padded image)."""
    b, _, h, w = x.shape
    off = off.to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding))  # (B, C, H+2p, W+2p)
    wp = w + 2 * padding
    rows = off[:, :1] + torch.arange(h, device=x.device)  # (B, H) rows of the padded image
    cols = off[:, 1:] + torch.arange(w, device=x.device)  # (B, W)
    flat = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w)  # (B, 1, H*W) into the flattened padded
    # one gather over flattened pixels: measured fastest on CPU (vs. two gathers, index_select, a Python loop)
    c = x.shape[1]
    return padded.flatten(2).gather(2, flat.expand(b, c, h * w)).view(b, c, h, w)


def hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each sample left-right with probability 0.5. (B, C, H, W) -> same."""
    return _flip_where(x, _rand(generator, x.shape[0]) < 0.5)


def _flip_where(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    flip = flip.to(x.device)  # (B,) bool
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_resized_crop(x: torch.Tensor, scale: Sequence[float], generator: torch.Generator) -> torch.Tensor:
    """Per sample: a crop of area fraction U(scale) and aspect ratio log-U(3/4, 4/3), resized back to (H, W).

    Sides longer than the image are clamped to it (torchvision instead retries, then falls back to a centre crop).
    """
    lo, hi = float(scale[0]), float(scale[1])
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError([("data.augment.random_resized_crop", f"need 0 < min <= max <= 1, got [{lo}, {hi}]")])
    return _resized_crop_at(x, lo, hi, _rand(generator, x.shape[0], 4))


def _resized_crop_at(x: torch.Tensor, lo: float, hi: float, u: torch.Tensor) -> torch.Tensor:
    """The random-resized crop of each sample given its uniforms u (B, 4) float64: scale, log-aspect, centre x, y."""
    b, _, h, w = x.shape
    area = lo + (hi - lo) * u[:, 0]
    aspect = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1])  # crop width / height
    fw = torch.sqrt(area * aspect * h / w).clamp(max=1.0)  # crop width as a fraction of W
    fh = torch.sqrt(area / aspect * w / h).clamp(max=1.0)
    cx = (1 - fw) * (2 * u[:, 2] - 1)  # centre in [-1, 1] grid coordinates, keeping the crop inside the image
    cy = (1 - fh) * (2 * u[:, 3] - 1)
    zero = torch.zeros_like(fw)
    theta = torch.stack([torch.stack([fw, zero, cx], -1), torch.stack([zero, fh, cy], -1)], 1)  # (B, 2, 3)
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    grid = F.affine_grid(theta.to(xf), list(xf.shape), align_corners=False)  # (B, H, W, 2)
    out = F.grid_sample(xf, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.to(x.dtype)


def augment_batch(pixels: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """(B, C, H, W) float in [0, 1] -> same shape; random-resized crop, then padded crop, then flip, as enabled.

    All randomness comes from `generator` (usually CPU; pixels may live on any device), so the same generator
    state gives the same batch. With everything off the input is returned unchanged.
    """
    x = pixels
    if cfg.random_resized_crop is not None:
        x = random_resized_crop(x, cfg.random_resized_crop, generator)
    if cfg.random_crop_padding > 0:
        x = random_crop(x, cfg.random_crop_padding, generator)
    if cfg.hflip:
        x = hflip(x, generator)
    return x


def augment_enabled(cfg: AugmentConfig) -> bool:
    return cfg.random_resized_crop is not None or cfg.random_crop_padding > 0 or cfg.hflip


def view_uniforms(seeds: torch.Tensor, n: int) -> torch.Tensor:
    """(B,) int64 seeds -> (B, n) float64 uniforms in [0, 1): draw j of sample i is splitmix64(seeds[i], j).

    Counter-based, so a sample's draws are a pure function of its seed (no generator state, no batch), computed
    for a whole batch at once in unsigned 64-bit arithmetic (numpy's wraps by definition).
    """
    s = seeds.detach().cpu().numpy().astype(np.int64).view(np.uint64)[:, None]
    with np.errstate(over="ignore"):
        z = s + _GOLDEN * np.arange(1, n + 1, dtype=np.uint64)[None, :]
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53)


_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def augment_views(pixels: torch.Tensor, seeds: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] and one seed per sample (B,) int64 -> each sample augmented by its own seed.

    The same operations as `augment_batch` (random-resized crop, padded crop, flip, as enabled), but each sample's
    random numbers come from its seed alone (`view_uniforms`: draws 0-3 the resized crop, 4-5 the crop offset,
    6 the flip), so its view never depends on the batch it is in. A teacher cache
    (kdkit.teacher_cache.classification) stores the seed of every view the teacher scored; training from it shows
    the student the same view, in whatever batch. With everything off the input is returned unchanged.
    """
    if not augment_enabled(cfg):
        return pixels
    u = view_uniforms(seeds, 7)  # (B, 7)
    x = pixels
    if cfg.random_resized_crop is not None:
        x = _resized_crop_at(x, float(cfg.random_resized_crop[0]), float(cfg.random_resized_crop[1]), u[:, :4])
    pad = cfg.random_crop_padding
    if pad > 0:
        x = _crop_at(x, pad, (u[:, 4:6] * (2 * pad + 1)).long().clamp(max=2 * pad))
    if cfg.hflip:
        x = _flip_where(x, u[:, 6] < 0.5)
    return x


def preprocess(pixels: torch.Tensor, size: tuple[int, int] | Sequence[int], mean: Sequence[float],
               std: Sequence[float]) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (B, len(mean), *size) normalised: what a model gets.

    Resizes bilinearly (antialiased when shrinking) if the size differs, adapts channels (1 -> 3 repeats, 3 -> 1
    luma) to len(mean), then (x - mean) / std per channel.
    """
    if len(mean) != len(std):
        raise ValueError(f"mean has {len(mean)} entries but std has {len(std)}")
    x = pixels if pixels.is_floating_point() else pixels.float()
    if len(mean) < x.shape[1]:  # both steps are linear, so order only changes the cost: work on fewer channels
        x = resize(adapt_channels(x, len(mean)), size)
    else:
        x = adapt_channels(resize(x, size), len(mean))
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
