"""Tiny models for tests, loaded through the 'path/file.py:function' factory route."""

from torch import nn


def tiny_mlp(num_classes: int = 10, in_channels: int = 1, size: int = 8, hidden: int = 16, dropout: float = 0.1) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * size * size, hidden), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, num_classes))


def not_a_module():
    return 42
