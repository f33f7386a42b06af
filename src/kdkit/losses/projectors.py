"""Learned projectors from a student's inner features to a teacher's (FitNets-style regressors).

One `FeatureProjector` per (student layer, teacher layer) pair, built from the two per-sample shapes seen on a dry
forward: (C, H, W) feature maps, (N, C) tokens or (C,) vectors. `forward(student)` brings the student's features
into the teacher's layout; `target(teacher)` brings the teacher's into the same layout (no parameters); the two then
have equal shapes and a distance (kdkit.losses.features.feature_distance) compares them along `channel_dim`.

Layouts (`layout`):
  map     maps on both sides, or maps on one and a token grid on the other (the tokens are read as their patch
          grid, CLS/prefix tokens dropped): the student map is resized to the teacher's H x W (adaptive average
          pooling when it shrinks, bilinear when it grows), then a 1x1 convolution maps C -> D channels.
  tokens  tokens on both sides: a linear layer maps C -> D per token. With different token counts both are read as
          prefix + square grid; the student's grid is resized to the teacher's, and the prefix tokens are matched
          one to one when both have as many, else left out on both sides.
  vector  `tokens: cls` (the CLS token, i.e. token 0, of each side) or (B, C) vectors: a linear layer C -> D.
The projection is the identity when the channel counts agree.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdkit.losses.features import map_to_tokens, resize_map, token_grid, tokens_to_map


def _grid(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(prefix, side) of a token shape (N, C) with at least one patch token, else None."""
    prefix, side = token_grid(shape[0])
    return (prefix, side) if side >= 1 else None


class FeatureProjector(nn.Module):
    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], tokens: str = "all"):
        super().__init__()
        s, t = tuple(student_shape), tuple(teacher_shape)
        self.student_shape, self.teacher_shape = s, t
        kinds = {1: "vector", 2: "tokens", 3: "map"}
        if len(s) not in kinds or len(t) not in kinds:
            raise ValueError(f"features must be (C, H, W) maps, (N, C) tokens or (C,) vectors per sample; got "
                             f"student {s}, teacher {t}")
        ks, kt = kinds[len(s)], kinds[len(t)]
        self.s_prefix = self.t_prefix = 0
        self.notes: list[str] = []
        if tokens == "cls" or "vector" in (ks, kt):
            if "map" in (ks, kt):
                raise ValueError(f"a {ks} and a {kt} cannot be matched as vectors ({'tokens: cls' if tokens == 'cls' else 'a vector side'}"
                                 " needs tokens or vectors on both sides)")
            if tokens != "cls" and "tokens" in (ks, kt):
                raise ValueError(f"student {ks} {s} and teacher {kt} {t}: a vector matches tokens only with tokens: cls")
            self.layout, cs, ct = "vector", s[-1], t[-1]
            if tokens == "cls":
                self.notes.append("CLS token")
        elif ks == "tokens" and kt == "tokens":
            self.layout, cs, ct = "tokens", s[1], t[1]
            if s[0] != t[0]:
                gs, gt = _grid(s), _grid(t)
                self.s_prefix, self.t_prefix = gs[0], gt[0]
                self.s_side, self.t_side = gs[1], gt[1]
                self.keep_prefix = gs[0] == gt[0]
                self.notes.append(f"token grid {gs[1]}x{gs[1]} -> {gt[1]}x{gt[1]}"
                                  + ("" if self.keep_prefix or not (gs[0] or gt[0]) else ", prefix tokens left out"))
        else:  # at least one map: compare as maps
            if ks == "tokens":
                prefix, side = _grid(s)
                self.s_prefix, s = prefix, (s[1], side, side)
                self.notes.append(f"student tokens as a {side}x{side} map" + (f" ({prefix} prefix dropped)" if prefix else ""))
            if kt == "tokens":
                prefix, side = _grid(t)
                self.t_prefix, t = prefix, (t[1], side, side)
                self.notes.append(f"teacher tokens as a {side}x{side} map" + (f" ({prefix} prefix dropped)" if prefix else ""))
            self.s_tokens, self.t_tokens = ks == "tokens", kt == "tokens"
            self.layout, cs, ct = "map", s[0], t[0]
            self.size = (t[1], t[2])
            if (s[1], s[2]) != self.size:
                how = "pooled" if s[1] >= t[1] and s[2] >= t[2] else "bilinear"
                self.notes.append(f"{how} {s[1]}x{s[2]} -> {t[1]}x{t[2]}")
        self.in_channels, self.out_channels = cs, ct
        if cs == ct:
            self.proj: nn.Module = nn.Identity()
        elif self.layout == "map":
            self.proj = nn.Conv2d(cs, ct, kernel_size=1)
        else:
            self.proj = nn.Linear(cs, ct)
        self.channel_dim = 1 if self.layout == "map" else -1

    def describe(self) -> str:
        name = {"map": "conv1x1", "tokens": "linear", "vector": "linear"}[self.layout]
        proj = "identity" if isinstance(self.proj, nn.Identity) else f"{name} {self.in_channels}->{self.out_channels}"
        return ", ".join([proj, *self.notes])

    def forward(self, x: Tensor) -> Tensor:
        if self.layout == "vector":
            return self.proj(x[:, 0] if x.dim() == 3 else x)
        if self.layout == "map":
            if self.s_tokens:
                x = tokens_to_map(x, self.s_prefix)
            return self.proj(resize_map(x, self.size))
        if x.shape[1] != self.teacher_shape[0]:  # token grids of different sizes
            grid = map_to_tokens(resize_map(tokens_to_map(x, self.s_prefix), (self.t_side, self.t_side)))
            x = torch.cat([x[:, :self.s_prefix], grid], dim=1) if self.keep_prefix else grid
        return self.proj(x)

    def target(self, t: Tensor) -> Tensor:
        """The teacher's features in the layout `forward` produces (no gradient flows into the teacher anyway)."""
        if self.layout == "vector":
            return t[:, 0] if t.dim() == 3 else t
        if self.layout == "map":
            return tokens_to_map(t, self.t_prefix) if self.t_tokens else t
        if self.student_shape[0] != self.teacher_shape[0] and not self.keep_prefix:
            return t[:, self.t_prefix:]
        return t

