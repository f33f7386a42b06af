"""Image-classification distillation: the only place that knows the student, the teacher and the loss terms.

`ClassificationDistiller.step(batch)` returns `{"loss": total, "<term>": part, ...}`; every part is logged, so a
user sees which term moves (timm's distillation task does the same).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from kdkit.config.schema import AugmentConfig, DistillConfig, LossTerm
from kdkit.data import augment_batch
from kdkit.data.augment import augment_views
from kdkit.distill.feature_plan import INNER_KINDS
from kdkit.distill.features import InnerTerms
from kdkit.evaluate import classification_quality
from kdkit.losses import cross_entropy, dkd_loss, kd_loss
from kdkit.models.teacher import FrozenTeacher


def baseline_terms(cfg: DistillConfig) -> list[LossTerm]:
    """The loss of the same student trained without a teacher: the config's ce terms (weight 1), else plain CE."""
    ce = [t.model_copy(update={"weight": 1.0}) for t in cfg.terms if t.kind == "ce"][:1]
    return ce or [LossTerm(kind="ce", weight=1.0)]


class ClassificationDistiller:
    """Holds the student (the module the trainer prepares) and, apart from it, the frozen teacher.

    The trainer asks a distiller three things: `prepare_batch` (here: the augmentation both models see), `step`
    (the loss and its logged parts) and `validate` (metrics, with `best_metric` naming the one that picks the best
    checkpoint and whether higher is better); and, where a distiller has it, `set_epoch` at each epoch's start.
    With a cached teacher (kdkit.teacher_cache.classification) `prepare_batch` shows each sample's stored view of
    the epoch and carries the teacher's stored logits on it to `step`; the teacher never runs.

    With `features`/`attention` terms (`inner`, kdkit.distill.features) the module the trainer prepares is
    `trainable`: the student with its feature projectors, which computes those terms in its forward; the optimizer
    takes `param_groups(lr)` (the projectors at `projector_lr`). Without them `trainable` is the student itself.
    """

    best_metric = ("accuracy", "max")

    def __init__(self, student: nn.Module, teacher: FrozenTeacher | None, terms: list[LossTerm], temperature: float,
                 augment: AugmentConfig | None = None, *, inner: InnerTerms | None = None,
                 projector_lr: float | None = None):
        needs_teacher = [t.label for t in terms if t.kind != "ce"]
        if needs_teacher and teacher is None:
            raise ValueError(f"loss terms {needs_teacher} need a teacher")
        self.student = student
        self.teacher = teacher
        self.terms = list(terms)
        self.temperature = temperature
        self.augment = augment or AugmentConfig()
        # a kdkit.teacher_cache.classification.CachedClassifierTeacher: stored logits on stored views
        self.cached = getattr(teacher, "cached", False)
        self.epoch = 0
        missing = [t.label for t in terms if t.kind in INNER_KINDS and (inner is None or t.label not in
                                                                          {p.label for p in inner.plans})]
        if missing:
            raise ValueError(f"loss terms {missing} need their layer plan (kdkit.distill.features.build_inner_terms)")
        self.inner = inner
        self.trainable: nn.Module = inner.module if inner is not None else student
        self.projector_lr = projector_lr

    def param_groups(self, lr: float) -> list[dict]:
        """The optimizer's parameter groups: the student's trainable parameters at `lr`, then the projectors' at
        `projector_lr` (default `lr`), when there are any."""
        groups = [{"params": [p for p in self.student.parameters() if p.requires_grad], "lr": lr}]
        if self.inner is not None:
            projectors = [p for p in self.inner.module.projectors.parameters() if p.requires_grad]
            if projectors:
                groups.append({"params": projectors, "lr": self.projector_lr or lr, "name": "projectors"})
        return groups

    def set_epoch(self, epoch: int) -> None:
        """The trainer's epoch (a cached teacher's view cycles with it)."""
        self.epoch = epoch

    def prepare_batch(self, batch: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        if self.cached:  # the view the teacher scored, from its stored seed, with the teacher's logits on it
            seeds, logits = self.teacher.lookup(batch["index"], self.epoch)
            pixels = augment_views(batch["pixels"], seeds, self.augment)
            return {**batch, "pixels": pixels, "teacher_logits": logits.to(pixels.device)}
        return {**batch, "pixels": augment_batch(batch["pixels"], self.augment, generator)}

    def validate(self, model: nn.Module, loader, device, reduce: Callable[[Tensor], Tensor]) -> dict:
        return classification_quality(model, loader, device, reduce=reduce)

    def _term(self, term: LossTerm, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor) -> Tensor:
        t = term.temperature or self.temperature
        if term.kind == "ce":
            return cross_entropy(student_logits, labels, label_smoothing=term.label_smoothing)
        if isinstance(teacher_logits, dict):  # an ensemble's members: this term's target (kdkit.models.ensemble)
            teacher_logits = self.teacher.soft_target(teacher_logits, term.teacher, t, labels)
        if term.kind == "kd":
            return kd_loss(student_logits, teacher_logits, temperature=t, kind=term.divergence, beta=term.beta)
        return dkd_loss(student_logits, teacher_logits, labels, alpha=term.dkd_alpha, beta=term.dkd_beta, temperature=t)

    def teacher_logits(self, pixels: Tensor) -> Tensor | dict[str, Tensor] | None:
        """The teacher's logits (B, C); an ensemble's are per member, combined per term by `_term`."""
        if self.teacher is None:
            return None
        return self.teacher.member_logits(pixels) if hasattr(self.teacher, "member_logits") else self.teacher(pixels)

    def step(self, batch: dict[str, Tensor], student: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
        """Forward both models on the same (augmented) pixels and combine the weighted terms.

        `student`: the prepared (e.g. DDP-wrapped) `trainable`; None or the bare student mean `trainable`."""
        student = self.trainable if student is None or student is self.student else student
        pixels, labels = batch["pixels"], batch["labels"]
        teacher_logits, inner_parts = None, {}
        needs_logits = any(t.kind in ("kd", "dkd") for t in self.terms)
        if self.inner is not None:  # one teacher forward gives the logits and the inner features
            teacher_logits, targets = self.inner.teacher_targets(pixels, self.teacher_logits if needs_logits else None)
            student_logits, inner_parts = student(pixels, targets)
        else:
            if needs_logits:
                teacher_logits = batch["teacher_logits"] if self.cached else self.teacher_logits(pixels)
            student_logits = student(pixels)
        student_logits = student_logits.float()  # (B, C); losses run in float32
        shapes = {x.shape for x in (teacher_logits.values() if isinstance(teacher_logits, dict) else [teacher_logits])
                  if x is not None}
        if shapes - {student_logits.shape}:
            raise ValueError(f"teacher logits {sorted(tuple(x) for x in shapes)} and student logits "
                             f"{tuple(student_logits.shape)} differ: both must predict the same classes")
        parts = {term.label: inner_parts[term.label] if term.label in inner_parts
                 else self._term(term, student_logits, teacher_logits, labels) for term in self.terms}
        total = torch.zeros((), device=student_logits.device)
        for term in self.terms:
            total = total + term.weight * parts[term.label]
        return {"loss": total, **parts}
