"""Training on Accelerate: the loop, checkpoints, logging."""

from kdkit.train.loop import Trainer, TrainResult

__all__ = ["TrainResult", "Trainer"]
