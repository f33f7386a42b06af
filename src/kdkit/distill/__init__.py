"""Task objects: one per model kind; step(batch) -> {"loss", "<part>", ...}."""

from kdkit.distill.classification import ClassificationDistiller, baseline_terms

__all__ = ["ClassificationDistiller", "baseline_terms"]
