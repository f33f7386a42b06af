"""Tiny models for tests, loaded through the 'path/file.py:function' factory route."""

from torch import nn


def tiny_mlp(num_classes: int = 10, in_channels: int = 1, size: int = 8, hidden: int = 16, dropout: float = 0.1) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * size * size, hidden), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, num_classes))


def not_a_module():
    return 42


class _Flaky(nn.Module):
    """Returns NaN logits on chosen training forward calls: exercises the non-finite step guard."""

    def __init__(self, net: nn.Module, bad_calls: tuple[int, ...]):
        super().__init__()
        self.net, self.bad_calls, self.calls = net, set(bad_calls), 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls in self.bad_calls:
                return out * float("nan")
        return out


def flaky_mlp(num_classes: int = 10, in_channels: int = 1, size: int = 8, bad_calls: tuple = (2, 3)) -> nn.Module:
    return _Flaky(tiny_mlp(num_classes, in_channels, size, hidden=8, dropout=0.0), tuple(bad_calls))
