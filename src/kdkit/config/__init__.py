"""Typed run config: `load_config(path, overrides)` -> Config, every error at once by dotted path."""

from kdkit.config.load import apply_overrides, dump_config, load_config, validate
from kdkit.config.schema import Config, DataConfig, DistillConfig, EvalConfig, LossTerm, ModelConfig, TrainConfig

__all__ = ["Config", "DataConfig", "DistillConfig", "EvalConfig", "LossTerm", "ModelConfig", "TrainConfig",
           "apply_overrides", "dump_config", "load_config", "validate"]
