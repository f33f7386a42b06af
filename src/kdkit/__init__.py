"""kdkit: knowledge distillation as a config file and one command."""

__version__ = "0.1.0"
