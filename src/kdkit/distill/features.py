"""`features` and `attention` loss terms at training time: the student with its projectors, and the teacher's side.

The trainer prepares (DDP, device, optimizer) a `StudentWithProjectors`, not the bare student, so the projectors
train with the student, sit in its checkpoints (a resume is exact) and DDP synchronises their gradients: the feature
losses are computed inside its `forward`, so DDP sees every parameter used in the forward it wraps. The exported
`student/` is the bare student (`.student`), with the same keys as without these terms.

Per step: the teacher runs once with hooks on its chosen layers (the same forward that gives the kd logits), its
features are cloned out of inference mode as targets; then the wrapper runs the student with hooks on its layers,
and returns `(student_logits, {term name: loss})`. The hooks exist only during these two forwards.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor, nn

from kdkit.config.schema import LossTerm
from kdkit.distill.feature_plan import INNER_KINDS, InnerTerm, build_plan, describe_plan
from kdkit.errors import UserError
from kdkit.losses.features import attention_kl, attention_transfer, feature_distance, token_grid, tokens_to_map
from kdkit.models.hooks import FeatureCapture, attention_weights, display, first_tensor, net_of, use_eager_attention


def feature_teacher(teacher, term: LossTerm) -> nn.Module:
    """The teacher module whose inner layers `term` learns from (an ImageClassifier).

    With an ensemble (kdkit.models.ensemble), the member `term.teacher` names, else its first."""
    if hasattr(teacher, "member"):
        return teacher.member(term.teacher).model
    return teacher.model


def _capture_spec(pairs_of: list[tuple[str, str]]) -> tuple[dict[str, Callable], list[str]]:
    """({path: select}, eager attention paths) for (path, mode) items."""
    paths: dict[str, Callable] = {}
    eager: list[str] = []
    for path, mode in pairs_of:
        if mode == "kl":
            paths[path] = attention_weights
            if path not in eager:
                eager.append(path)
        else:
            paths[path] = first_tensor
    return paths, eager


def _as_map(x: Tensor) -> Tensor:
    """A feature map (B, C, H, W) as is; ViT tokens (B, N, C) as their patch grid."""
    return tokens_to_map(x, token_grid(x.shape[1])[0]) if x.dim() == 3 else x


class StudentWithProjectors(nn.Module):
    """The student and the feature projectors as one trainable module.

    `forward(pixels)` is the student's; `forward(pixels, targets)` (targets: {term name: [teacher tensor per pair]})
    also captures the student's layers and returns `(logits, {term name: loss})`."""

    def __init__(self, student: nn.Module, projectors: nn.ModuleDict, plans: list[InnerTerm]):
        super().__init__()
        self.student = student
        self.projectors = projectors
        self.plans = list(plans)
        self._paths, eager = _capture_spec([(pair.student, p.mode) for p in self.plans for pair in p.pairs])
        self._copies = {pair.student for p in self.plans for pair in p.pairs if pair.copy}
        named = dict(net_of(student).named_modules())
        use_eager_attention([named[p] for p in eager])  # for good: a checkpointed layer recomputes in the backward

    def forward(self, pixels: Tensor, targets: dict[str, list[Tensor]] | None = None):
        if targets is None:
            return self.student(pixels)
        with FeatureCapture(self.student, self._paths, where="distill.terms", clone=self._copies) as cap:
            logits = self.student(pixels)
            feats = cap.take()
        return logits, {p.label: self.term_loss(p, feats, targets[p.label]) for p in self.plans}

    def term_loss(self, plan: InnerTerm, feats: dict[str, Tensor | None], targets: list[Tensor]) -> Tensor:
        """The mean over the term's pairs of each pair's loss."""
        losses = []
        for pair, target in zip(plan.pairs, targets):
            s = feats.get(pair.student)
            where = f"distill.terms.{plan.label}.layers: the student's {display(self.student, pair.student)}"
            if s is None:
                raise UserError(f"{where} did not run in this forward pass (or returned no "
                                f"{'attention probabilities' if plan.mode == 'kl' else 'tensor'})")
            if self.training and torch.is_grad_enabled() and not s.requires_grad:
                raise UserError(f"{where} carries no gradient (a frozen part of the student, or reentrant gradient "
                                "checkpointing): this term could not train it")
            if plan.mode == "features":
                proj = self.projectors[pair.projector]
                losses.append(feature_distance(proj(s), proj.target(target), plan.term.distance, proj.channel_dim))
            elif plan.mode == "kl":
                losses.append(attention_kl(s, target, per_head=plan.term.per_head))
            else:
                losses.append(attention_transfer(_as_map(s), _as_map(target)))
        return torch.stack(losses).mean()


class InnerTerms:
    """A run's features/attention terms: the plan, the trainable `module` (StudentWithProjectors) and the teacher
    side (`teacher_targets`)."""

    def __init__(self, plans: list[InnerTerm], projectors: nn.ModuleDict, student: nn.Module,
                 teachers: dict[str, nn.Module]):
        self.plans = plans
        self.module = StudentWithProjectors(student, projectors, plans)
        # one capture per distinct teacher module: [(module, {path: select}, eager paths)]
        self._teachers: list[tuple[nn.Module, dict[str, Callable], list[str]]] = []
        self._refs: dict[str, list[tuple[int, str]]] = {}  # term -> [(teacher index, path)] per pair
        for p in plans:
            model = teachers[p.label]
            idx = next((i for i, (m, _, _) in enumerate(self._teachers) if m is model), None)
            if idx is None:
                self._teachers.append((model, {}, []))
                idx = len(self._teachers) - 1
            paths, eager = _capture_spec([(pair.teacher, p.mode) for pair in p.pairs])
            self._teachers[idx][1].update(paths)
            self._teachers[idx][2].extend(e for e in eager if e not in self._teachers[idx][2])
            self._refs[p.label] = [(idx, pair.teacher) for pair in p.pairs]

    def teacher_targets(self, pixels: Tensor, teacher_logits: Callable[[Tensor], Tensor] | None
                        ) -> tuple[Tensor | None, dict[str, list[Tensor]]]:
        """(the teacher's logits when `teacher_logits` is given, {term name: [target per pair]}).

        The hooks are in place while `teacher_logits(pixels)` runs the teacher, so the kd logits and the features
        come from one forward; a teacher module that forward did not run (no kd term) runs once more alone."""
        captures = [FeatureCapture(m, paths, where="distill.terms", role="teacher", eager=eager)
                    for m, paths, eager in self._teachers]
        got: list[dict[str, Tensor | None]] = []
        logits = None
        try:
            for c in captures:
                c.__enter__()
            if teacher_logits is not None:
                logits = teacher_logits(pixels)
            for (model, paths, _), c in zip(self._teachers, captures):
                out = c.take()
                if any(out.get(p) is None for p in paths):
                    device = next(model.parameters()).device
                    with torch.inference_mode():
                        model(pixels.to(device))
                    out = c.take()
                got.append(out)
        finally:
            for c in captures:
                c.__exit__(None, None, None)
        targets = {}
        for label, refs in self._refs.items():
            targets[label] = [got[i][path].to(pixels.device) for i, path in refs]
        return logits, targets


def build_inner_terms(terms: list[LossTerm], student: nn.Module, teacher, *, channels: int,
                      image_size: tuple[int, int], lr: float, projector_lr: float | None) -> InnerTerms | None:
    """The features/attention terms of `terms` planned on one dry forward of each model (a 2-sample batch of the
    data's shape); the plan is printed. None when there are no such terms."""
    inner = [t for t in terms if t.kind in INNER_KINDS]
    if not inner:
        return None
    if teacher is None or getattr(teacher, "cached", False):
        raise UserError(f"distill.terms {[t.label for t in inner]}: features and attention terms need a loaded teacher")
    teachers = {t.label: feature_teacher(teacher, t) for t in inner}
    pixels = torch.zeros(2, channels, *image_size)
    plans, projectors = build_plan(terms, student, teachers, pixels)
    if int(os.environ.get("RANK", "0")) == 0:
        for line in describe_plan(plans, student, teachers, pixels.shape, projectors, projector_lr, lr):
            print(line, flush=True)
    return InnerTerms(plans, projectors, student, teachers)
