"""Divergences against a teacher stored sparsely: its top-k log-probabilities, their token ids, and the log of the
probability mass left over (kdkit.teacher_cache keeps these per position instead of a whole vocabulary).

The estimator. Both distributions are coarsened to the same k + 1 buckets: the teacher's k tokens, then "every other
token" as one bucket (the teacher's remaining mass; for the student, the mass it puts outside those k tokens). Any
divergence of DIVERGENCE_KINDS is then taken between the two (k + 1)-bucket distributions.
- It is exact when k equals the vocabulary (the rest bucket is empty on both sides).
- For the KL family it never exceeds the dense value: merging outcomes cannot increase an f-divergence (the data
  processing inequality). The bias is how differently the two distributions spread the rest bucket's mass over its
  tokens. With k = 64 of a peaked language-model teacher that mass is typically a few percent.
- The student's gradient still reaches every logit: a token outside the top-k is pushed as part of the rest bucket,
  towards the teacher's total mass there rather than towards a per-token target.

The sampled tail (forward KL). The KL's chain rule splits it exactly into the k + 1 bucket KL plus the rest mass r times
the KL between the two distributions *within* the rest bucket:
    KL(q || p) = KL_buckets + r * KL(q_tail || p_tail),  q_tail = q / r, p_tail = p / p_rest over the tokens outside.
A cache can store s token ids drawn with replacement from q_tail, and the tail's negative entropy sum q_tail log q_tail;
then r * (negentropy - mean_j log p_tail(id_j)) is an unbiased estimate of the second term, and its gradient an
unbiased estimate of the dense forward KL's gradient: the bias above is gone, for 2 s + 4 more bytes per token
(`tail_correction`). The other kinds have no such chain rule; they keep the bucket estimate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkit.losses.divergence import DIVERGENCE_KINDS, _per_position, compute_dtype


def topk_log_probs(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, ...]:
    """(ids (..., k) int64, log-probs (..., k), log of the remaining mass (...)) of softmax(teacher_logits / T), in
    descending order of probability; the remaining mass is -inf when k covers the whole vocabulary."""
    return topk_of(F.log_softmax(teacher_logits.to(compute_dtype(teacher_logits)) / temperature, -1), k)


def topk_of(log_p: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """`topk_log_probs` of log-probabilities already taken (e.g. shared with `sample_tail`)."""
    values, ids = log_p.topk(min(k, log_p.shape[-1]), dim=-1)  # (..., k)
    return ids, values, _log_rest(log_p, ids)


def _log_rest(log_p: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the mass of log_p (..., V) outside `ids` (..., k), with finite gradients; -inf (a constant) when the
    ids cover every token of positive probability."""
    outside = log_p.scatter(-1, ids, float("-inf"))  # (..., V)
    top = outside.amax(-1, keepdim=True)  # (..., 1)
    empty = torch.isneginf(top).squeeze(-1)
    shift = top.masked_fill(torch.isneginf(top), 0.0).detach()
    mass = (outside - shift).exp().sum(-1)  # (...), 0 where empty
    rest = shift.squeeze(-1) + mass.clamp_min(torch.finfo(mass.dtype).tiny).log()
    return torch.where(empty, torch.full_like(rest, float("-inf")), rest)


def sample_tail(log_p: torch.Tensor, ids: torch.Tensor, log_rest: torch.Tensor, samples: int,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (..., samples) int64 drawn with replacement from the distribution outside `ids` renormalised, its negative
    entropy (...)) for log_p (..., V) and its top `ids` (..., k); zeros where nothing lies outside."""
    flat = log_p.reshape(-1, log_p.shape[-1])
    rest = log_rest.reshape(-1, 1)
    empty = torch.isneginf(rest)
    log_tail = (flat - rest.masked_fill(empty, 0.0)).scatter(-1, ids.reshape(-1, ids.shape[-1]), float("-inf"))
    tail = log_tail.exp()
    negent = torch.where(tail > 0, tail * log_tail, torch.zeros_like(tail)).sum(-1)
    tail = torch.where(empty, torch.ones_like(tail), tail)  # any valid row; r = 0 drops these in the loss
    drawn = torch.multinomial(tail.float(), samples, replacement=True, generator=generator)
    negent = negent.masked_fill(empty.squeeze(-1), 0.0)
    return drawn.reshape(*log_p.shape[:-1], samples), negent.reshape(log_p.shape[:-1])


def tail_correction(log_s: torch.Tensor, student_log_rest: torch.Tensor, teacher_log_rest: torch.Tensor,
                    tail_ids: torch.Tensor, tail_negent: torch.Tensor) -> torch.Tensor:
    """Per position (...): r * (negentropy - mean_j log p_tail(id_j)), the sampled estimate of r * KL(q_tail || p_tail)
    that completes the bucket forward KL (module docstring). log_s (..., V) the student's log-probs; its log rest
    mass (...) outside the teacher's top-k; the teacher's (...); tail ids (..., s) and negative entropy (...)."""
    r = teacher_log_rest.to(log_s.dtype).exp()  # 0 where the top-k held everything
    none = r == 0
    rest_s = student_log_rest.masked_fill(none | torch.isneginf(student_log_rest), 0.0)
    drawn = log_s.gather(-1, tail_ids.long()).mean(-1)  # (...)
    per = r * (tail_negent.to(log_s.dtype) - (drawn - rest_s))
    return torch.where(none, torch.zeros_like(per), per)


def bucket_log_probs(log_s: torch.Tensor, ids: torch.Tensor, teacher_logp: torch.Tensor,
                     teacher_log_rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Student log-probs (..., V) and the teacher's sparse form -> both as (..., k + 1) bucket log-probs."""
    ids = ids.long()
    dtype = log_s.dtype
    student = torch.cat([log_s.gather(-1, ids), _log_rest(log_s, ids)[..., None]], -1)
    teacher = torch.cat([teacher_logp.to(dtype), teacher_log_rest.to(dtype)[..., None]], -1)
    return student, teacher


def sparse_divergence(student_logits: torch.Tensor, ids: torch.Tensor, teacher_logp: torch.Tensor,
                      teacher_log_rest: torch.Tensor, *, kind: str = "forward_kl", temperature: float = 1.0,
                      beta: float = 0.5, labels: torch.Tensor | None = None, ignore_index: int = -100,
                      tail: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean over kept positions of `kind` between the teacher's k + 1 buckets and the student's (module docstring).

    student_logits (..., V); ids, teacher_logp (..., k) taken at the same temperature; teacher_log_rest (...).
    Equals `divergence(student_logits, teacher_logits, ...)` when k = V. 0 when every position is masked.
    `tail` = (ids (..., s), negative entropy (...)) from `sample_tail`: forward KL adds `tail_correction`."""
    if kind not in DIVERGENCE_KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {DIVERGENCE_KINDS}")
    if ids.shape != teacher_logp.shape or ids.shape[:-1] != student_logits.shape[:-1] or \
            teacher_log_rest.shape != ids.shape[:-1]:
        raise ValueError(f"shapes: student {tuple(student_logits.shape)}, ids {tuple(ids.shape)}, log-probs "
                         f"{tuple(teacher_logp.shape)}, rest {tuple(teacher_log_rest.shape)}")
    dtype = compute_dtype(student_logits)
    log_s = F.log_softmax(student_logits.to(dtype) / temperature, -1)
    s, t = bucket_log_probs(log_s, ids, teacher_logp, teacher_log_rest)
    per = _per_position(kind, s, t, beta)  # (...)
    if tail is not None and kind == "forward_kl":
        per = per + tail_correction(log_s, s[..., -1], teacher_log_rest, *tail)
    if labels is None:
        return per.mean() if per.numel() else per.sum()
    keep = labels != ignore_index
    return per.masked_fill(~keep, 0.0).sum() / keep.sum().clamp(min=1).to(dtype)
