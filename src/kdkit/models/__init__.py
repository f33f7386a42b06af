"""Teachers and students: build from config, wrap, freeze, save and load."""

from kdkit.models.build import build_model, fingerprint_model, load_exported, resolve_factory, save_model
from kdkit.models.classifier import ImageClassifier
from kdkit.models.teacher import FrozenTeacher

__all__ = ["FrozenTeacher", "ImageClassifier", "build_model", "fingerprint_model",
           "load_exported", "resolve_factory", "save_model"]
