"""Image classification: Fashion-MNIST / digits / folders / HF datasets, classifiers of any architecture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from kdkit.data import ImageData, build_image_data, make_loader
from kdkit.distill import ClassificationDistiller, baseline_terms
from kdkit.errors import UserError
from kdkit.evaluate import classification_quality, measure_efficiency
from kdkit.models import FrozenTeacher, build_model, fingerprint_model, load_exported, save_model


class ClassificationTask:
    quality_keys = ("accuracy", "top5")

    def finish(self, run_dir: Path, metrics: dict) -> None:
        """Nothing beyond metrics.json and the report."""
    def build_data(self, cfg) -> ImageData:
        return build_image_data(cfg.data, cfg.seed)

    def describe_data(self, data: ImageData) -> str:
        return (f"data: {len(data.train)} train / {len(data.val) if data.val is not None else 0} val / "
                f"{len(data.test)} test, {data.num_classes} classes, "
                f"{data.channels}x{data.image_size[0]}x{data.image_size[1]}")

    def load_teacher(self, cfg, data: ImageData, device) -> FrozenTeacher | None:
        if cfg.teacher is None:
            return None
        if cfg.teacher.cache is not None:
            return self._cached_teacher(cfg, data)
        set_seed(cfg.seed)

        def build(spec, where: str = "teacher"):
            try:
                return build_model(spec, num_classes=data.num_classes, channels=data.channels,
                                   data_size=data.image_size, role="teacher")
            except UserError as err:  # say which member
                raise UserError(str(err).replace("teacher", where, 1)) from None

        if cfg.teacher.ensemble is not None:
            from kdkit.models.ensemble import build_ensemble

            return build_ensemble(cfg.teacher, build, device)
        return FrozenTeacher(build(cfg.teacher), device)

    def _cached_teacher(self, cfg, data: ImageData):
        """The teacher's stored logits on augmented views (kdkit.teacher_cache.classification), checked against this
        run's data, augmentation and (when the config names it) teacher."""
        from kdkit.teacher_cache import CacheReader
        from kdkit.teacher_cache.build import teacher_spec_hash
        from kdkit.teacher_cache.classification import CachedClassifierTeacher, settings

        reader = CacheReader(cfg.teacher.cache)
        wanted = settings(cfg)
        expected = {"data": data.fingerprint, "num_samples": len(data.train),
                    "settings": {k: wanted[k] for k in ("augment", "view_rule")}}  # any number of views will do
        if any(getattr(cfg.teacher, k) is not None for k in ("pretrained", "hf_config", "factory", "run")):
            expected["teacher_spec"] = teacher_spec_hash(cfg.teacher)
        reader.check("classification", expected)
        teacher = CachedClassifierTeacher(reader)
        print(f"teacher: cache {reader.dir} (logits on {teacher.views} augmented view(s) per image, "
              f"{reader.manifest.get('bytes_per_unit')} bytes per image); the teacher itself is not loaded", flush=True)
        return teacher

    def teacher_fingerprint(self, teacher: FrozenTeacher | None) -> str | None:
        if getattr(teacher, "cached", False):
            return teacher.fingerprint
        return fingerprint_model(teacher.model) if teacher is not None else None

    def make_distiller(self, cfg, data: ImageData, teacher, *, baseline: bool) -> ClassificationDistiller:
        set_seed(cfg.seed)  # baseline and distilled students start from the same weights
        student = build_model(cfg.student, num_classes=data.num_classes, channels=data.channels,
                              data_size=data.image_size, role="student", teacher=cfg.teacher, loaded_teacher=teacher)
        terms = baseline_terms(cfg.distill) if baseline else cfg.distill.terms
        inner = None
        if any(t.kind in ("features", "attention") for t in terms):  # plan printed; projectors drawn after the student
            from kdkit.distill.features import build_inner_terms

            inner = build_inner_terms(terms, student, teacher, channels=data.channels, image_size=data.image_size,
                                      lr=cfg.train.lr, projector_lr=cfg.distill.projector_lr)
        return ClassificationDistiller(student, None if baseline else teacher, terms, cfg.distill.temperature,
                                       cfg.data.augment, inner=inner, projector_lr=cfg.distill.projector_lr)

    def export(self, cfg, student, data: ImageData, out_dir: Path) -> Path:
        return save_model(student, out_dir, class_names=data.class_names)

    def evaluate(self, cfg, run_dir: Path, data: ImageData, teacher: FrozenTeacher | None, device,
                 students: dict[str, Path]) -> dict[str, dict[str, Any]]:
        """{"teacher"?, "student", "baseline"?: quality (+ efficiency)} on the test split."""
        loader = make_loader(data.test, batch_size=cfg.eval.batch_size, shuffle=False, seed=cfg.seed)

        def describe(model, reference):
            model = model.to(device).eval()
            out = classification_quality(model, loader, device, reference=reference)
            if cfg.eval.efficiency:
                example = torch.rand(1, data.channels, *data.image_size)
                out.update(measure_efficiency(model, example, batch_size=cfg.eval.batch_size,
                                              repeats=cfg.eval.latency_repeats, warmup=cfg.eval.warmup, device=device))
            return out

        cached = getattr(teacher, "cached", False)

        def reference():
            if not cached:
                return teacher
            stored = teacher.reader.manifest.get("teacher_test_predictions")  # in test order; None for older caches
            if stored is None or len(stored) != len(data.test):
                return None
            from kdkit.teacher_cache.classification import StoredPredictions

            return StoredPredictions(stored, data.num_classes)

        parts = {name: describe(load_exported(run, f"{run}/student"), reference()) for name, run in students.items()}
        if cached:  # measured by `kdkit cache`, which had it loaded
            parts["teacher"] = dict(teacher.reader.manifest.get("teacher_metrics") or {})
        elif teacher is not None:
            parts["teacher"] = describe(teacher.model, None)
            if hasattr(teacher, "member"):  # an ensemble: each member's own test figures too
                parts["teacher"]["members"] = {
                    name: classification_quality(teacher.member(name).model, loader, device)
                    for name in teacher.names}
                print("teacher members (test accuracy): " + ", ".join(
                    f"{n} {v['accuracy']:.2f}%" for n, v in parts["teacher"]["members"].items()), flush=True)
        return parts
