"""`ImageClassifier`: one face for every image model kdkit trains or distils from.

Every batch arrives as raw pixels in [0, 1] at the data's stored size; each model resizes and normalises them for
itself. So a teacher that expects 224x224 ImageNet-normalised RGB and a student that expects 28x28 grey images both
see *the same augmented view* of each sample (consistent teaching, Beyer et al. 2022), and the student exported to
`student/` records the preprocessing it was trained with.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from kdkit.data import preprocess


class ImageClassifier(nn.Module):
    """Wraps a Hugging Face image classifier or any `nn.Module` so that `forward(pixels) -> logits (B, C)`."""

    def __init__(self, net: nn.Module, *, image_size: tuple[int, int], mean: list[float], std: list[float],
                 num_classes: int, is_hf: bool, spec: dict[str, Any] | None = None):
        super().__init__()
        self.net = net
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.num_classes = int(num_classes)
        self.is_hf = is_hf
        self.spec = dict(spec or {})  # how to rebuild `net` (factory + kwargs) for kdkit.json

    def forward(self, pixels: Tensor) -> Tensor:
        x = preprocess(pixels, self.image_size, self.mean, self.std)  # (B, C', H', W')
        out = self.net(pixel_values=x) if self.is_hf else self.net(x)
        if hasattr(out, "logits"):
            out = out.logits
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return out  # (B, num_classes)

    def preprocessing(self) -> dict[str, Any]:
        return {"image_size": list(self.image_size), "mean": self.mean, "std": self.std, "num_classes": self.num_classes}
