"""Token-level divergences between teacher and student next-token distributions.

References:
    * Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network":
      forward KL on temperature-softened distributions, scaled by T^2 (``kd_loss``).
    * Agarwal et al. (ICLR 2024), "On-Policy Distillation of Language Models: Learning
      from Self-Generated Mistakes" (GKD), eq. 1: generalized Jensen-Shannon divergence.
      The ``beta`` convention follows TRL's ``GKDTrainer.generalized_jsd_loss``.
    * Ko et al. (ICML 2024), "DistiLLM: Towards Streamlined Distillation for Large
      Language Models": skew KL / skew reverse KL (skew coefficient = ``beta``).

All functions are pure tensor functions. Logits have shape (..., V) and labels (...).
Everything is computed in float32 (float64 inputs stay float64) and in log space, so
vocabulary entries set to -inf in both teacher and student (e.g. padded vocab rows)
give finite values and finite gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIVERGENCE_KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "uld")

def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """At least float32 (half / bf16 softmaxes over a large vocab lose too much); float64 kept."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) over the last dim, with 0 log 0 = 0.

    Entries where p_v = 0 (log p_v = -inf) contribute exactly 0. Both operands are
    replaced by 0 there *before* the arithmetic, so neither the forward (-inf - -inf)
    nor the backward (0 * nan) ever sees a NaN.
    """
    p_zero = torch.isneginf(log_p)  # (..., V)
    safe_log_p = log_p.masked_fill(p_zero, 0.0)
    safe_log_q = log_q.masked_fill(p_zero, 0.0)
    terms = safe_log_p.exp() * (safe_log_p - safe_log_q)  # (..., V)
    return terms.masked_fill(p_zero, 0.0).sum(-1)  # (...)


def log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w * a + (1 - w) * b), computed from log-probs with logaddexp.

    Taking the log of a sum of probabilities underflows to -inf; logaddexp does not.
    Entries that are -inf in both operands are excluded from the logaddexp (its backward
    is exp(x - out) = exp(nan) there) and put back as -inf afterwards.
    """
    if weight_a == 1.0:
        return log_a
    if weight_a == 0.0:
        return log_b
    both_zero = torch.isneginf(log_a) & torch.isneginf(log_b)  # (..., V)
    mixed = torch.logaddexp(
        log_a.masked_fill(both_zero, 0.0) + math.log(weight_a),
        log_b.masked_fill(both_zero, 0.0) + math.log1p(-weight_a),
    )
    return mixed.masked_fill(both_zero, float("-inf"))


def _per_position(kind: str, log_s: torch.Tensor, log_t: torch.Tensor, beta: float) -> torch.Tensor:
    """Divergence at every position: student / teacher log-probs (..., V) -> (...)."""
    if kind == "forward_kl":
        return kl_from_log_probs(log_t, log_s)
    if kind == "reverse_kl":
        return kl_from_log_probs(log_s, log_t)
    if kind == "jsd":
        # TRL / GKD: M = beta * P_T + (1 - beta) * P_S and
        # JSD(beta) = beta * KL(P_T || M) + (1 - beta) * KL(P_S || M).
        # JSD(beta) / beta -> KL(P_T || P_S) as beta -> 0 and JSD / (1 - beta) ->
        # KL(P_S || P_T) as beta -> 1 (JSD itself -> 0), so TRL special-cases the
        # endpoints as those unscaled KLs. We reproduce that exactly.
        if beta == 0.0:
            return kl_from_log_probs(log_t, log_s)
        if beta == 1.0:
            return kl_from_log_probs(log_s, log_t)
        log_m = log_mixture(log_t, log_s, beta)
        return beta * kl_from_log_probs(log_t, log_m) + (1.0 - beta) * kl_from_log_probs(log_s, log_m)
    if kind == "skew_forward_kl":
        # DistiLLM alpha-SKL: KL(p || alpha p + (1 - alpha) q_theta), alpha = beta.
        return kl_from_log_probs(log_t, log_mixture(log_t, log_s, beta))
    if kind == "skew_reverse_kl":
        # DistiLLM alpha-SRKL: KL(q_theta || alpha q_theta + (1 - alpha) p), alpha = beta.
        return kl_from_log_probs(log_s, log_mixture(log_s, log_t, beta))
    if kind == "uld":
        return uld_distance(log_s, log_t)
    # "tvd" (kind is validated by the caller).
    return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)


def uld_distance(log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    """Universal Logit Distillation (Boizard et al. 2024, eq. 5): sum_i |p_s(i) - p_t(i)| where p(i) is the i-th
    largest probability, the shorter vocabulary padded with zeros. With every token at unit transport cost from
    every other, this is the closed form of the Wasserstein-1 distance between the two distributions, so it compares
    vocabularies of different tokenizers (and sizes) without any id mapping. (..., V_s), (..., V_t) -> (...)."""
    p_s = log_s.exp().sort(-1, descending=True).values  # (..., V_s)
    p_t = log_t.exp().sort(-1, descending=True).values  # (..., V_t)
    width = max(p_s.shape[-1], p_t.shape[-1])
    p_s = F.pad(p_s, (0, width - p_s.shape[-1]))
    p_t = F.pad(p_t, (0, width - p_t.shape[-1]))
    return (p_s - p_t).abs().sum(-1)


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean divergence between softmax(teacher / T) and softmax(student / T).

    The mean runs over positions whose label is not ``ignore_index`` (all positions when
    ``labels`` is None); 0 (with zero gradients) when every position is masked. No T^2
    factor is applied here; see :func:`kd_loss`.

    Kinds (P_T = teacher, P_S = student distribution):
        * ``forward_kl``: KL(P_T || P_S).
        * ``reverse_kl``: KL(P_S || P_T).
        * ``jsd``: generalized JSD of GKD (Agarwal et al. 2024, eq. 1) with TRL's
          convention M = beta P_T + (1 - beta) P_S, value
          beta KL(P_T || M) + (1 - beta) KL(P_S || M); beta = 0 is exactly forward KL and
          beta = 1 exactly reverse KL (TRL special cases, not the continuous limit, which is 0).
        * ``skew_forward_kl``: KL(P_T || beta P_T + (1 - beta) P_S) (DistiLLM alpha-SKL,
          alpha = beta; the paper's default is 0.1). DistiLLM's code computes the
          cross-entropy form -sum P_T log(mix), which differs from this by the teacher
          entropy: same gradients, but ours is 0 at P_S = P_T.
        * ``skew_reverse_kl``: KL(P_S || beta P_S + (1 - beta) P_T) (DistiLLM alpha-SRKL).
        * ``tvd``: total variation 0.5 sum_v |P_T - P_S|.
        * ``uld``: Universal Logit Distillation (Boizard et al. 2024): sum_i |P_S(i) - P_T(i)| over the sorted
          probabilities (see :func:`uld_distance`); the only kind whose vocabularies may differ in size.

    Returns a float32 scalar (float64 for float64 inputs).
    """
    if kind not in DIVERGENCE_KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {DIVERGENCE_KINDS}")
    if student_logits.shape != teacher_logits.shape and (
            kind != "uld" or student_logits.shape[:-1] != teacher_logits.shape[:-1]):
        raise ValueError(f"student/teacher logits shapes differ: "
                         f"{tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    dtype = compute_dtype(student_logits, teacher_logits)
    student = student_logits.to(dtype) / temperature  # (..., V)
    teacher = teacher_logits.to(dtype) / temperature  # (..., V)

    if labels is None:
        keep = torch.ones(student.shape[:-1], dtype=torch.bool, device=student.device)  # (...)
    else:
        if labels.shape != student.shape[:-1]:
            raise ValueError(f"labels shape {tuple(labels.shape)} must be logits shape "
                             f"without the vocab dim, {tuple(student.shape[:-1])}")
        keep = labels != ignore_index  # (...)
        # Zero the logits of masked positions instead of indexing them out: no
        # host-device sync, and whatever they held (even all -inf rows) can neither
        # change the value nor leak NaN into the gradients (masked_fill's backward
        # passes exactly 0 there).
        student = student.masked_fill(~keep[..., None], 0.0)
        teacher = teacher.masked_fill(~keep[..., None], 0.0)

    log_s, log_t = F.log_softmax(student, -1), F.log_softmax(teacher, -1)  # (..., V)
    per_pos = _per_position(kind, log_s, log_t, beta)  # (...)
    total = per_pos.masked_fill(~keep, 0.0).sum()
    return total / keep.sum().clamp(min=1).to(dtype)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float,
    kind: str = "forward_kl",
    beta: float = 0.5,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """T^2 * :func:`divergence` (Hinton et al. 2015 KD for ``kind="forward_kl"``).

    The T^2 factor keeps gradient magnitudes roughly independent of T, since soft-target
    gradients scale as 1/T^2.
    """
    return temperature**2 * divergence(
        student_logits, teacher_logits, kind=kind, temperature=temperature,
        beta=beta, labels=labels, ignore_index=ignore_index,
    )


def cross_entropy(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Hard-label cross-entropy, mean over positions whose label is not ``ignore_index``.

    Logits (..., V), labels (...). Computed in float32 (float64 kept); returns 0 with
    zero gradients when every position is masked (F.cross_entropy's "mean" gives NaN).
    As in F.cross_entropy, label smoothing puts mass on every entry, so -inf logits
    (padded vocab) make it infinite: slice padded entries off first.
    """
    dtype = compute_dtype(student_logits)
    logits = student_logits.to(dtype).reshape(-1, student_logits.shape[-1])  # (N, V)
    flat_labels = labels.reshape(-1)  # (N,)
    total = F.cross_entropy(logits, flat_labels, ignore_index=ignore_index,
                            label_smoothing=label_smoothing, reduction="sum")
    count = (flat_labels != ignore_index).sum().clamp(min=1).to(dtype)
    return total / count
