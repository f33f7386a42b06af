"""The custom-module example: any nn.Module from a factory function is a teacher or a student.

Used by digits_teacher.yaml and digits_mlp_to_tiny_mlp_kd.yaml; point `factory` at your own
'package.module:function' or 'path/to/file.py:function' the same way.
"""

from torch import nn


def mlp(num_classes: int = 10, in_channels: int = 1, size: int = 8, hidden: int = 256, depth: int = 2,
        dropout: float = 0.1) -> nn.Module:
    """A plain MLP over flattened (C, size, size) images; forward(x) -> logits (B, num_classes)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_channels * size * size
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
