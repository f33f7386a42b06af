"""Feature and attention distillation losses: pure tensor functions (the projectors are in kdkit.losses.projectors).

Shapes: feature maps (B, C, H, W); tokens (B, N, C), where a ViT's N = prefix + side^2 (prefix: the CLS token, and
a distillation token in DeiT) and the rest is the side x side patch grid in row-major order; attention
probabilities (B, heads, N, N). Everything is computed in float32 and returns a scalar mean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DISTANCES = ("mse", "cosine", "smooth_l1")


def token_grid(n: int) -> tuple[int, int]:
    """(prefix tokens, grid side) of a sequence of n tokens read as prefix + side^2 (17 -> (1, 4): CLS + 4x4)."""
    side = math.isqrt(n)
    return n - side * side, side


def tokens_to_map(x: Tensor, prefix: int) -> Tensor:
    """(B, prefix + s*s, C) -> (B, C, s, s): the patch tokens as a map, the prefix tokens dropped."""
    b, n, c = x.shape
    side = math.isqrt(n - prefix)
    if side * side != n - prefix:
        raise ValueError(f"{n} tokens with {prefix} prefix tokens are not a square grid")
    return x[:, prefix:].transpose(1, 2).reshape(b, c, side, side)


def map_to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return x.flatten(2).transpose(1, 2)


def resize_map(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, C, H, W) -> (B, C, *size): adaptive average pooling when no side grows, else bilinear interpolation."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def feature_distance(student: Tensor, teacher: Tensor, kind: str = "mse", channel_dim: int = -1) -> Tensor:
    """Distance between projected student features and teacher features of the same shape, a scalar mean:
    mse: mean squared error over every element; smooth_l1: Huber loss (beta 1) over every element;
    cosine: 1 - cosine similarity of the channel vectors (`channel_dim`), averaged over tokens / positions."""
    if student.shape != teacher.shape:
        raise ValueError(f"student features {tuple(student.shape)} and teacher features {tuple(teacher.shape)} differ")
    s, t = student.float(), teacher.float()
    # mse and smooth_l1 from the difference: autograd keeps one tensor of this size for the backward, not two
    if kind == "mse":
        return (s - t).pow(2).mean()
    if kind == "smooth_l1":
        d = s - t
        return F.smooth_l1_loss(d, d.new_zeros(()).expand_as(d))
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=channel_dim, eps=1e-8)).mean()
    raise ValueError(f"unknown distance {kind!r}; choose one of {', '.join(DISTANCES)}")


def attention_kl(student: Tensor, teacher: Tensor, *, per_head: bool = False, eps: float = 1e-12) -> Tensor:
    """KL(teacher || student) between attention probabilities (B, heads, N, N), summed over the keys (the last
    axis) and averaged over batch, query tokens and (`per_head`) heads. Without `per_head` both are first averaged
    over their heads (the head counts may differ); with it, head h of the student matches head h of the teacher.
    Student probabilities are clamped at `eps` before the log (a softmax can underflow to 0 in float32)."""
    s, t = student.float(), teacher.float()
    if s.shape[-2:] != t.shape[-2:] or s.shape[0] != t.shape[0]:
        raise ValueError(f"attention over different tokens: student {tuple(s.shape)}, teacher {tuple(t.shape)}")
    if per_head:
        if s.shape[1] != t.shape[1]:
            raise ValueError(f"per-head attention KL needs equal head counts: student {s.shape[1]}, teacher {t.shape[1]}")
    else:
        s, t = s.mean(1), t.mean(1)  # (B, N, N): still distributions over the keys
    kl = torch.special.xlogy(t, t) - t * torch.log(s.clamp_min(eps))
    return kl.sum(-1).mean()


def attention_map(features: Tensor, p: float = 2.0) -> Tensor:
    """Zagoruyko & Komodakis (2017) spatial attention of a feature map (B, C, H, W): mean over channels of |F|^p,
    (B, H, W) (not yet normalised)."""
    f = features.float()
    return (f.pow(2) if p == 2 else f.abs().pow(p)).mean(1)  # |F|^2 = F^2, which saves no |F| for the backward


def attention_transfer(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017, "Paying more attention to attention", eq. 2 with p = 2):
    || a_s / ||a_s||_2 - a_t / ||a_t||_2 ||_2 per sample, averaged over the batch, where a = vec(mean_c |F|^p).

    The student's map (B, H, W) is resized to the teacher's (pooled or bilinear) before normalising, so the
    channel counts and spatial sizes of the two feature maps may differ. The value lies in [0, 2] (0: the same
    spatial distribution of activation energy). The paper weights this by beta/2 with beta = 1000 in its code,
    where the squared difference is also averaged over the H*W positions; here the term's `weight` is the only
    factor, so weights of roughly 1-10 are comparable to a CE term."""
    a_s = attention_map(student, p)
    a_t = attention_map(teacher, p)
    a_s = resize_map(a_s[:, None], a_t.shape[-2:])[:, 0]
    a_s = F.normalize(a_s.flatten(1), dim=1, eps=1e-12)
    a_t = F.normalize(a_t.flatten(1), dim=1, eps=1e-12)
    return torch.linalg.vector_norm(a_s - a_t, dim=1).mean()
