"""Decoupled Knowledge Distillation (DKD).

Zhao, Cui, Song, Qiu & Liang (CVPR 2022), "Decoupled Knowledge Distillation".
Classical KD splits as KD = TCKD + (1 - p_t^T) * NCKD, where
    * TCKD = KL(b^T || b^S) over the binary distribution b = [p_t, 1 - p_t]
      (target class vs. all others), and
    * NCKD = KL(p_hat^T || p_hat^S) over the non-target classes renormalised among
      themselves, p_hat_i = p_i / (1 - p_t) for i != t.
DKD decouples the weights: DKD = alpha * TCKD + beta * NCKD. As in the official
implementation (megvii-research/mdistiller, mdistiller/distillers/DKD.py) both terms use
temperature-softened distributions, are multiplied by T^2 and averaged over the batch.

Differences from mdistiller (values agree up to float rounding):
    * everything is in log space: log b_t = z_t - logsumexp(z) and
      log b_other = logsumexp(z_{-t}) - logsumexp(z), instead of log(sum of probs),
      which underflows to -inf (and NaN gradients) for confident models;
    * the target class is removed from the NCKD softmax by setting its logit to -inf,
      which is exact, instead of subtracting 1000 from it (which is only approximate:
      the target keeps weight exp(-1000) relative to its true logit, and regains real
      mass once its scaled logit leads the others by ~1000).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkit.losses.divergence import compute_dtype, kl_from_log_probs

_NEG_INF = float("-inf")


def _decoupled_log_probs(
    logits: torch.Tensor, target_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log binary [target, other] probs (B, 2) and log non-target probs (B, C).

    The non-target distribution keeps the target column at -inf (probability 0), which
    :func:`kl_from_log_probs` treats as a 0 log 0 = 0 term.
    """
    log_z = torch.logsumexp(logits, dim=-1)  # (B,)
    non_target_logits = logits.masked_fill(target_mask, _NEG_INF)  # (B, C)
    target_logit = logits.masked_fill(~target_mask, 0.0).sum(-1)  # (B,) one True per row
    log_target = target_logit - log_z  # (B,)
    log_other = torch.logsumexp(non_target_logits, dim=-1) - log_z  # (B,)
    log_binary = torch.stack([log_target, log_other], dim=-1)  # (B, 2)
    log_non_target = F.log_softmax(non_target_logits, dim=-1)  # (B, C), -inf at target
    return log_binary, log_non_target


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> torch.Tensor:
    """DKD loss alpha * TCKD + beta * NCKD (each times T^2, mean over the batch).

    Args:
        student_logits: (B, C) class logits.
        teacher_logits: (B, C) class logits.
        labels: (B,) integer ground-truth classes in [0, C).
        alpha: weight of the target-class term (TCKD).
        beta: weight of the non-target-class term (NCKD).
        temperature: softmax temperature T.

    Returns a float32 scalar (float64 for float64 inputs).
    """
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"expected matching (B, C) logits, got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")
    batch, num_classes = student_logits.shape
    if num_classes < 2:
        raise ValueError("DKD needs at least 2 classes (NCKD is undefined otherwise)")
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    dtype = compute_dtype(student_logits, teacher_logits)
    student = student_logits.to(dtype) / temperature  # (B, C)
    teacher = teacher_logits.to(dtype) / temperature  # (B, C)
    # Boolean one-hot mask, used both to pick the target logit and to hide it from the
    # non-target softmax (masked_fill, never a multiply: -inf * 0 would give NaN).
    target_mask = F.one_hot(labels.long(), num_classes).bool()  # (B, C)

    log_b_s, log_nt_s = _decoupled_log_probs(student, target_mask)
    log_b_t, log_nt_t = _decoupled_log_probs(teacher, target_mask)
    tckd = kl_from_log_probs(log_b_t, log_b_s).mean()  # KL(b^T || b^S)
    nckd = kl_from_log_probs(log_nt_t, log_nt_s).mean()  # KL(p_hat^T || p_hat^S)
    return temperature**2 * (alpha * tckd + beta * nckd)
