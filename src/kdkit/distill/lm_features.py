"""`features` terms for causal language models: the student's last hidden states matched to the teacher's.

Both models already produce their last hidden states for the fused losses (no logits), so the term costs one
linear projector (student width -> teacher width; none when the widths agree) and a distance over the labelled
positions. It is the hidden-state loss of DistilBERT (cosine) and MiniLM/TinyBERT-style hint training (mse), on
the final layer. The projector trains with the student inside `LMStudentWithProjector`, the module the trainer
prepares (so DDP syncs its gradients), sits in checkpoints and is left out of `student/`.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdkit.config.schema import LossTerm
from kdkit.errors import UserError
from kdkit.losses.features import feature_distance


def check_lm_feature_terms(terms: list[LossTerm]) -> list[LossTerm]:
    """The features terms of an LM run; explicit layer pairs and attention terms are refused by path."""
    out = []
    for t in terms:
        if t.kind == "attention":
            raise UserError(f"distill.terms.{t.label}: attention terms are for task: classification")
        if t.kind == "features":
            if t.layers != "auto":
                raise UserError(f"distill.terms.{t.label}.layers: for language models a features term matches the "
                                "last hidden states (layers: auto); explicit pairs are for image classifiers")
            out.append(t)
    return out


class LMStudentWithProjector(nn.Module):
    """The student (CausalLMStudent) and one projector per features term. `forward(ids, mask)` is the student's;
    `forward(ids, mask, teacher_hidden=..., keep=...)` returns (hidden, {term name: distance at the kept positions})."""

    def __init__(self, student: nn.Module, terms: list[LossTerm], student_width: int, teacher_width: int):
        super().__init__()
        self.student = student
        self.terms = list(terms)
        self.projectors = nn.ModuleDict({
            t.label: nn.Linear(student_width, teacher_width) if student_width != teacher_width else nn.Identity()
            for t in self.terms})

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, *, teacher_hidden: Tensor | None = None,
                keep: Tensor | None = None):
        hidden = self.student(input_ids, attention_mask)  # (B, L, H_s)
        if teacher_hidden is None:
            return hidden
        s = hidden[keep]  # (K, H_s): the labelled positions
        t = teacher_hidden.detach()[keep.to(teacher_hidden.device)].to(s.device)  # (K, H_t)
        parts = {}
        for term in self.terms:
            proj = self.projectors[term.label]
            projected = proj(s.to(proj.weight.dtype) if isinstance(proj, nn.Linear) else s)
            parts[term.label] = feature_distance(projected, t, term.distance) if len(s) else hidden.sum() * 0.0
        return hidden, parts


def build_lm_features(student: nn.Module, teacher, terms: list[LossTerm], cross: bool, projector_lr: float | None,
                      lr: float) -> LMStudentWithProjector | None:
    """The trainable wrapper, or None without features terms; prints what it matches."""
    feats = check_lm_feature_terms(terms)
    if not feats:
        return None
    if teacher is None or getattr(teacher, "cached", False):
        raise UserError(f"distill.terms {[t.label for t in feats]}: features terms need a loaded teacher")
    if cross:
        raise UserError(f"distill.terms {[t.label for t in feats]}: features terms need one tokenizer for both "
                        "models (their positions must line up); these tokenizers differ")
    s_width, t_width = _width(student), _width(teacher)
    wrapper = LMStudentWithProjector(student, feats, s_width, t_width)
    n = sum(p.numel() for p in wrapper.projectors.parameters())
    for t in feats:
        how = f"linear {s_width}->{t_width}" if s_width != t_width else "no projector (same width)"
        print(f"{t.label}: the student's last hidden states -> the teacher's, {t.distance}, weight {t.weight:g}, {how}",
              flush=True)
    if n:
        print(f"projectors: {n:,} parameters, learning rate {projector_lr or lr:g}"
              f"{'' if projector_lr else ' (train.lr)'}, saved in checkpoints, not in student/", flush=True)
    return wrapper


def _width(model) -> int:
    """The hidden size of a CausalLMStudent or FrozenCausalTeacher: its head's input width."""
    from kdkit.models.causal import _head

    weight = model.head_weight if hasattr(model, "head_weight") else _head(model.model).weight
    return int(weight.shape[1])
