"""The frozen teacher: eval mode, no gradients, inference mode, never handed to Accelerate's prepare().

It is deliberately *not* an nn.Module attribute of anything the trainer prepares, so DDP/FSDP never wrap it and
optimizers never see it (timm's `DistillationTeacher` follows the same rule).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdkit.models.classifier import ImageClassifier


class FrozenTeacher:
    def __init__(self, model: ImageClassifier, device: torch.device | str = "cpu"):
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)

    def __call__(self, pixels: Tensor) -> Tensor:
        with torch.inference_mode():
            logits = self.model(pixels.to(self.device))  # (B, C)
        # Inference tensors cannot be saved for the student's backward; a clone outside inference mode can.
        return logits.float().clone()

    @property
    def num_classes(self) -> int:
        return self.model.num_classes
