"""Vision-language distillation: LMDistiller's fused losses on answer tokens, with images in the batch.

The student and teacher read pixel_values / image_grid_thw / mm_token_type_ids beside the tokens. A teacher with
its own processor reads the batch's teacher_* tensors: with the student's vocabulary (another image processing,
hence other image-token counts), its answer-position hidden states are moved onto the student's answer positions
(the i-th answer token of one sequence is the i-th of the other) and every divergence applies as usual; with another
tokenizer the KD terms are ULD, as for language models. `vision_weight` > 0 adds the part `vision`: MSE between the
teacher's vision-tower tokens and the student's, mapped to the teacher's width by the student's projector.
A cached teacher (kdkit.teacher_cache.lm, `teacher.cache`) gives its stored top-k rows on the answer positions through
LMDistiller's own code; it has no processor of its own and no vision features.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.distill.lm import LMDistiller, next_token_targets
from kdkit.errors import UserError
from kdkit.losses import fused_cross_entropy
from kdkit.losses.fused import answer_pairs

VISION_INPUTS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")


def vision_inputs(batch: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    return {k: batch[prefix + k] for k in VISION_INPUTS if prefix + k in batch}


def realign(t_hidden: Tensor, t_target: Tensor, s_target: Tensor) -> Tensor:
    """Teacher hidden states (B, L_t, H) at its answer positions moved onto the student's (B, L_s, H): the i-th
    position predicting an answer token in one sequence goes to the i-th in the other; other positions get zeros."""
    s_idx, t_idx = answer_pairs(s_target, t_target)
    b, length = s_target.shape
    out = t_hidden.new_zeros(b * length, t_hidden.shape[-1])
    out[s_idx] = t_hidden.reshape(-1, t_hidden.shape[-1]).index_select(0, t_idx)
    return out.view(b, length, -1)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP


class VLMDistiller(LMDistiller):
    """LMDistiller whose student is a VLMStudent and whose teacher is a FrozenVLMTeacher (see the module docstring)."""

    def __init__(self, student: nn.Module, teacher: Optional[Callable], terms: list, temperature: float, *,
                 alignment=None, teacher_view: bool = False, vision_weight: float = 0.0,
                 vocab_rows: Optional[int] = None, chunk_size: Optional[int] = None):
        """vocab_rows: the head rows the losses use when there is no alignment (a cached teacher's)."""
        super().__init__(student, teacher, terms, temperature, alignment=alignment, vocab_rows=vocab_rows,
                         chunk_size=chunk_size)
        self.teacher_view = teacher_view
        self.vision_weight = vision_weight if teacher is not None else 0.0
        if self.cached and (teacher_view or self.vision_weight):
            raise ValueError("a cached teacher has no processor of its own and no vision features")

    def step(self, batch: dict[str, Tensor], student: Optional[Callable] = None) -> dict[str, Tensor]:
        """LMDistiller.step with the images (a cached teacher's stored rows the same way), plus the part `vision`."""
        student = student or self.student
        out = super().step(batch, student)
        if self.vision_weight:
            value = self._vision_loss(_unwrap(student))
            out["loss"] = out["loss"] + self.vision_weight * value
            out["vision"] = value.detach()
        return out

    def forward(self, model: Callable, batch: dict[str, Tensor], prefix: str = "") -> Tensor:
        return model(batch[prefix + "input_ids"], batch[prefix + "attention_mask"], **vision_inputs(batch, prefix))

    def uses_teacher(self) -> bool:
        return self.teacher is not None and (bool(self.vision_weight) or super().uses_teacher())

    def teacher_outputs(self, batch: dict[str, Tensor], target: Tensor) -> dict:
        if self.teacher_view and not self.cross and not self.cached:  # one vocabulary, another image processing
            t_hidden, t_weight = self.forward(self.teacher, batch, "teacher_")
            own = next_token_targets(batch["teacher_labels"])
            return {"teacher_hidden": realign(t_hidden, own, target), "teacher_weight": t_weight}
        return super().teacher_outputs(batch, target)

    def _vision_loss(self, student: nn.Module) -> Tensor:
        s, t = student.vision_features, self.teacher.vision_features
        if s is None or t is None:  # a batch without images
            return student.projector.weight.sum() * 0.0
        if s.shape[0] != t.shape[0]:
            raise UserError(f"vlm.vision_feature_weight: the student's vision tower gives {s.shape[0]} image tokens "
                            f"and the teacher's {t.shape[0]}; feature matching needs the same image processing "
                            "(patch and merge sizes, min/max pixels) for both")
        return F.mse_loss(student.projector(s.to(student.projector.weight.dtype)).float(), t.float())

    @torch.no_grad()
    def validate(self, model: nn.Module, loader, device, reduce: Callable[[Tensor], Tensor]) -> dict:
        return vlm_quality(lambda b: (model(b["input_ids"], b["attention_mask"], **vision_inputs(b)), model.head_weight),
                           loader, device, reduce=reduce, chunk_size=self.chunk_size)


@torch.no_grad()
def vlm_quality(hidden_fn: Callable[[dict], tuple[Tensor, Tensor]], loader, device, *, prefix: str = "",
                reduce: Optional[Callable[[Tensor], Tensor]] = None, chunk_size: Optional[int] = None) -> dict:
    """{"perplexity", "loss", "tokens"} on answer tokens: hidden_fn(batch) -> (hidden (B, L, H), head (V, H));
    prefix "teacher_" reads the teacher's own tensors of the batch."""
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # CE sum, tokens
    for batch in loader:
        batch = {k[len(prefix):]: v.to(device) for k, v in batch.items() if k.startswith(prefix)}
        target = next_token_targets(batch["labels"])
        count = int((target != -100).sum())
        if count == 0:
            continue
        hidden, head = hidden_fn(batch)
        totals[0] += fused_cross_entropy(hidden, head, target, chunk_size=chunk_size).double() * count
        totals[1] += count
    if reduce is not None:
        totals = reduce(totals)
    ce_sum, tokens = totals.tolist()
    if tokens == 0:
        from kdkit.errors import DataError

        raise DataError("the evaluation data has no answer tokens (check the split sizes and data.limit_eval)")
    loss = ce_sum / tokens
    return {"perplexity": round(math.exp(min(loss, 700.0)), 4), "loss": round(loss, 6), "tokens": int(tokens)}
