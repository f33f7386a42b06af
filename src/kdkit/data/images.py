"""Image conversion shared by every source and by the model-side preprocessing.

Images are stored as uint8 (C, H, W) and only become float in [0, 1] in the loader batch, so an in-memory
dataset costs one byte per pixel.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from kdkit.errors import DataError

# ITU-R 601-2 luma, the weights PIL uses for "RGB" -> "L": converting in memory or when loading a file agrees.
LUMA = (0.299, 0.587, 0.114)
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def adapt_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(..., C, H, W) float -> (..., channels, H, W): 1 -> 3 repeats, 3 -> 1 is the luma-weighted mean."""
    c = x.shape[-3]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        # repeat, not expand: callers may write into the result in place
        return x.repeat_interleave(3, dim=-3)
    if c == 3 and channels == 1:
        w = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(3, 1, 1)
        return (x * w).sum(dim=-3, keepdim=True)
    raise DataError(f"cannot convert {c}-channel images to {channels} channels (only 1 <-> 3 is supported)")


def resize(x: torch.Tensor, size: tuple[int, int] | list[int]) -> torch.Tensor:
    """(B, C, H, W) float -> (B, C, *size), bilinear; antialiased when shrinking so small targets don't alias."""
    h, w = int(size[0]), int(size[1])
    if tuple(x.shape[-2:]) == (h, w):
        return x
    shrink = h < x.shape[-2] or w < x.shape[-1]
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)


def convert_images(images: torch.Tensor, channels: int | None, size: tuple[int, int] | None,
                   chunk: int = 4096) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, channels, *size); a no-op when nothing changes. Chunked to bound memory."""
    n, c, h, w = images.shape
    channels = channels or c
    size = tuple(size) if size else (h, w)
    if channels == c and size == (h, w):
        return images
    out = torch.empty((n, channels, *size), dtype=torch.uint8)
    for start in range(0, n, chunk):
        x = images[start:start + chunk].float()  # (b, C, H, W) in 0..255
        x = resize(adapt_channels(x, channels), size)
        out[start:start + chunk] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out


def pil_channels(img: Image.Image) -> int:
    """1 for grey-level PIL modes, else 3 (the source's own channel count)."""
    return 1 if img.mode in GREY_MODES else 3


def pil_to_tensor(img: Image.Image, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """PIL image -> uint8 (channels, H, W) at size (H, W)."""
    img = img.convert("L" if channels == 1 else "RGB")
    h, w = int(size[0]), int(size[1])
    if img.size != (w, h):
        # PIL's bilinear widens its support when shrinking, i.e. it is antialiased like `resize` above
        img = img.resize((w, h), Image.BILINEAR)
    a = np.array(img, dtype=np.uint8)  # (H, W) or (H, W, 3); a writable copy for torch
    t = torch.from_numpy(a)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def load_image_file(path: str | Path, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """Read one image file -> uint8 (channels, H, W); any decoding failure is a DataError naming the file."""
    try:
        with Image.open(path) as img:
            img.load()  # PIL decodes lazily: force it here so a truncated file fails inside this try
            return pil_to_tensor(img, channels, size)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def to_pil(value: Any) -> Image.Image:
    """A Hugging Face image cell (PIL image, {'bytes', 'path'} dict, or array (H, W[, C]) / (C, H, W)) -> PIL."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            img = Image.open(io.BytesIO(value["bytes"]))
        else:
            img = Image.open(value["path"])
        img.load()
        return img
    if isinstance(value, torch.Tensor):
        value = value.cpu().numpy()
    a = np.asarray(value)
    if a.dtype == object or a.ndim not in (2, 3):
        raise ValueError(f"not an image: {type(value).__name__} with shape {getattr(a, 'shape', None)}")
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3, 4):
        a = a.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype.kind == "f":
        # float images are taken to be in [0, 1] (the usual convention), integer ones in 0..255
        a = a * 255.0 if a.size and float(a.max()) <= 1.0 else a
        a = np.clip(np.rint(a), 0, 255)
    return Image.fromarray(a.astype(np.uint8))
