"""Model zoo (draft, being tuned)."""
from __future__ import annotations
import torch
from torch import nn


def _cbr(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Res(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(x + self.body(x))


def fmnist_cnn(width: int = 32, num_classes: int = 10, in_channels: int = 1, depth: int = 2,
               dropout: float = 0.1, residual: bool = False) -> nn.Module:
    layers: list[nn.Module] = []
    cin = in_channels
    for i, c in enumerate((width, 2 * width, 4 * width)):
        layers.append(_cbr(cin, c))
        for _ in range(depth - 1):
            layers.append(_Res(c) if residual else _cbr(c, c))
        if i < 2:
            layers.append(nn.MaxPool2d(2))
        cin = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)
