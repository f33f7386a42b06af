"""Causal-LM distillation on hidden states: the student's and teacher's heads are applied a chunk of positions at a
time inside the fused losses, so no step ever holds (positions x vocabulary) logits.

`LMDistiller.step(batch)` returns `{"loss", "<term>", ...}` like the image distiller. Labels follow Hugging Face
(-100 on prompt and padding, not shifted); the next-token targets are built here once per batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from kdkit.config.schema import LossTerm
from kdkit.losses import fused_cross_entropy, fused_divergence
from kdkit.losses.fused import fused_terms
from kdkit.models.vocab import VocabAlignment


def next_token_targets(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """labels (B, L) -> the token each position must predict: labels shifted left, ignore_index at the end."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)], dim=1)


class LMDistiller:
    """Holds the student (a CausalLMStudent: forward -> hidden states; .head_weight) and, apart, the teacher."""

    best_metric = ("perplexity", "min")

    def __init__(self, student: nn.Module, teacher: Callable | None, terms: list[LossTerm], temperature: float,
                 *, alignment: VocabAlignment | None = None, vocab_rows: int | None = None,
                 chunk_size: int | None = None, features: nn.Module | None = None, projector_lr: float | None = None):
        """alignment: how the heads line up (models.vocab); "different" tokenizers make the teacher read the batch's
        teacher_input_ids / teacher_attention_mask / teacher_labels and every KD term a ULD term."""
        needs_teacher = [t.label for t in terms if t.kind == "kd"]
        if needs_teacher and teacher is None:
            raise ValueError(f"loss terms {needs_teacher} need a teacher")
        self.cross = alignment is not None and alignment.kind == "different"
        if self.cross and any(t.kind == "kd" and t.divergence != "uld" for t in terms):
            raise ValueError("different tokenizers: every kd term must use divergence 'uld'")
        self.student, self.teacher, self.terms = student, teacher, list(terms)
        self.temperature, self.alignment, self.chunk_size = temperature, alignment, chunk_size
        self.vocab_rows = alignment.student_size if alignment is not None else vocab_rows
        self.cached = getattr(teacher, "cached", False)  # a kdkit.teacher_cache.lm.CachedLMTeacher: sparse teacher rows
        # features terms (kdkit.distill.lm_features): the student with its projectors is what the trainer prepares
        self.with_features = features
        self.trainable: nn.Module = features if features is not None else student
        self.projector_lr = projector_lr

    def param_groups(self, lr: float) -> list[dict]:
        """The student's trainable parameters at `lr`, then the feature projectors' at `projector_lr` (default lr)."""
        groups = [{"params": [p for p in self.student.parameters() if p.requires_grad], "lr": lr}]
        projectors = [p for p in self.with_features.projectors.parameters()] if self.with_features is not None else []
        if projectors:
            groups.append({"params": projectors, "lr": self.projector_lr or lr, "name": "projectors"})
        return groups

    def prepare_batch(self, batch: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        return batch

    @staticmethod
    def loss_units(batch: dict[str, Tensor]) -> int:
        """Tokens the losses average over: the trainer weights micro-batches by them, so the step's loss is the mean
        over every token of the global batch however it is split."""
        return int((next_token_targets(batch["labels"]) != -100).sum())

    def _term(self, term: LossTerm) -> dict:
        if term.kind == "ce":
            return {"name": term.label, "kind": "ce", "weight": term.weight, "label_smoothing": term.label_smoothing}
        t = term.temperature or self.temperature
        return {"name": term.label, "kind": term.divergence, "weight": term.weight, "temperature": t, "beta": term.beta,
                "scale": t * t}  # Hinton's T^2

    def step(self, batch: dict[str, Tensor], student: Callable | None = None) -> dict[str, Tensor]:
        """Every term in one chunked pass over the student's logits (fused_terms): the head is applied once."""
        student = self.trainable if student is None or student is self.student else student
        target = next_token_targets(batch["labels"])  # (B, L)
        teacher = self.teacher_outputs(batch, target) if self.uses_teacher() else {}
        feature_parts = {}
        if self.with_features is not None:  # inside the prepared module's forward, so DDP sees the projectors
            hidden, feature_parts = student(batch["input_ids"], batch["attention_mask"],
                                            teacher_hidden=teacher["teacher_hidden"], keep=target != -100)
        else:
            hidden = self.forward(student, batch)  # (B, L, H): the base model's last hidden state, no logits
        fused = [self._term(t) for t in self.terms if t.kind in ("ce", "kd")]
        if not any(t.kind == "kd" for t in self.terms):
            teacher = {}
        total, parts = fused_terms(hidden, self.student.head_weight, target, fused, vocab_rows=self.vocab_rows,
                                   chunk_size=self.chunk_size, **teacher)
        for t in self.terms:
            if t.label in feature_parts:
                total = total + t.weight * feature_parts[t.label]
                parts[t.label] = feature_parts[t.label].detach()
        return {"loss": total, **parts}

    def forward(self, model: Callable, batch: dict[str, Tensor], prefix: str = "") -> Tensor:
        """`model` (student or teacher) on the batch's tensors (the teacher's own with prefix "teacher_")."""
        return model(batch[prefix + "input_ids"], batch[prefix + "attention_mask"])

    def uses_teacher(self) -> bool:
        return self.teacher is not None and any(t.kind in ("kd", "features") for t in self.terms)

    def teacher_outputs(self, batch: dict[str, Tensor], target: Tensor) -> dict:
        """fused_terms' teacher arguments for the batch: stored rows (a cache), or the teacher's hidden states."""
        if self.cached:  # the batch's samples' stored rows, in the order the losses keep labelled positions
            return {"teacher_topk": self.teacher.rows(batch["index"].cpu(), (target != -100).sum(1).cpu())}
        if self.cross:  # the teacher reads its own tokenization of the same samples
            t_hidden, t_weight = self.forward(self.teacher, batch, "teacher_")
            return {"teacher_hidden": t_hidden, "teacher_weight": t_weight[:self.alignment.teacher_size],
                    "teacher_labels": next_token_targets(batch["teacher_labels"])}
        t_hidden, t_weight = self.forward(self.teacher, batch)
        return {"teacher_hidden": t_hidden, "teacher_weight": t_weight}

    @torch.no_grad()
    def validate(self, model: nn.Module, loader, device, reduce: Callable[[Tensor], Tensor]) -> dict:
        """Token-level cross-entropy and perplexity of `model` (a CausalLMStudent) over `loader`."""
        return lm_quality(lambda ids, mask: (model(ids, mask), model.head_weight), loader, device, reduce=reduce,
                          chunk_size=self.chunk_size)


@torch.no_grad()
def lm_quality(hidden_fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], loader, device, *,
               reference: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None, vocab_rows: int | None = None,
               reduce: Callable[[Tensor], Tensor] | None = None, chunk_size: int | None = None) -> dict:
    """{"perplexity", "loss" (mean next-token CE), "tokens"} and, with a `reference` (the teacher), "kl_from_teacher":
    the mean per-token KL(teacher || model) at T=1. `hidden_fn(ids, mask) -> (hidden (B, L, H), head (V, H))`."""
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # CE sum, KL sum, tokens
    for batch in loader:
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        target = next_token_targets(batch["labels"].to(device))
        count = int((target != -100).sum())
        if count == 0:
            continue
        hidden, head = hidden_fn(ids, mask)
        totals[0] += fused_cross_entropy(hidden, head, target, chunk_size=chunk_size).double() * count
        if reference is not None:
            t_hidden, t_head = reference(ids, mask)
            n = vocab_rows or head.shape[0]
            totals[1] += fused_divergence(hidden, head[:n], t_hidden, t_head[:n], kind="forward_kl", labels=target,
                                          chunk_size=chunk_size).double() * count
        totals[2] += count
    if reduce is not None:
        totals = reduce(totals)
    ce_sum, kl_sum, tokens = totals.tolist()
    if tokens == 0:
        from kdkit.errors import DataError

        raise DataError("the evaluation data has no labelled tokens (check the split sizes and data.limit_eval)")
    loss = ce_sum / tokens
    out = {"perplexity": round(math.exp(min(loss, 700.0)), 4), "loss": round(loss, 6), "tokens": int(tokens)}
    if reference is not None:
        out["kl_from_teacher"] = round(kl_sum / tokens, 6)
    return out
