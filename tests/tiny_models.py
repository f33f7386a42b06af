"""Tiny models for tests, loaded through the 'path/file.py:function' factory route."""

import torch
from torch import nn


def tiny_mlp(num_classes: int = 10, in_channels: int = 1, size: int = 8, hidden: int = 16, dropout: float = 0.1) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * size * size, hidden), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, num_classes))


def not_a_module():
    return 42


class _Flaky(nn.Module):
    """Applies `fault` to the output of chosen training forward calls: exercises the non-finite step guard."""

    def __init__(self, net: nn.Module, bad_calls: tuple[int, ...], fault=lambda out: out * float("nan")):
        super().__init__()
        self.net, self.bad_calls, self.calls, self.fault = net, set(bad_calls), 0, fault

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls in self.bad_calls:
                return self.fault(out)
        return out


def flaky_mlp(num_classes: int = 10, in_channels: int = 1, size: int = 8, bad_calls: tuple = (2, 3)) -> nn.Module:
    return _Flaky(tiny_mlp(num_classes, in_channels, size, hidden=8, dropout=0.0), tuple(bad_calls))


class _MemoryLimited(nn.Module):
    """Raises the out-of-memory error a GPU would for training batches above `max_batch`: exercises batch_size auto."""

    def __init__(self, net: nn.Module, max_batch: int):
        super().__init__()
        self.net, self.max_batch = net, max_batch

    def forward(self, x):
        if self.training and x.shape[0] > self.max_batch:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: batch {x.shape[0]} > {self.max_batch})")
        return self.net(x)


def memory_limited_mlp(num_classes: int = 10, in_channels: int = 1, size: int = 8, max_batch: int = 20,
                       dropout: float = 0.3) -> nn.Module:
    return _MemoryLimited(tiny_mlp(num_classes, in_channels, size, hidden=8, dropout=dropout), max_batch)


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def nan_grad_mlp(num_classes: int = 10, in_channels: int = 1, size: int = 8, bad_calls: tuple = (2,)) -> nn.Module:
    """Finite outputs whose gradient is NaN on chosen calls: a non-finite gradient with a finite loss."""
    return _Flaky(tiny_mlp(num_classes, in_channels, size, hidden=8, dropout=0.0), tuple(bad_calls), _NanGrad.apply)
