"""Losses on hidden states and the output head, without the logits of all positions at once.

A language model's logits are (positions x vocabulary): 8 x 2048 positions of a 152k vocabulary are 10 GB in
float32, and a naive distillation step holds several such tensors (student and teacher logits, both softmaxes,
their gradients). Here the head is applied a chunk of positions at a time inside a custom autograd function: each
chunk's logits are computed, the loss and its gradient with respect to those logits are taken at once, the
gradients of the hidden states and of the head weight are accumulated, and the chunk's logits are freed. Peak
memory is one chunk's worth; the backward pass only scales the stored gradients by the incoming one.

Positions whose label is `ignore_index` are dropped before any logits are computed (prompt tokens cost nothing).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from kdkit.losses.divergence import DIVERGENCE_KINDS, _per_position, compute_dtype
from kdkit.losses.sparse import bucket_log_probs, tail_correction

# Logit elements per chunk when chunk_size is None: 2^22 floats (16 MB in float32) per logits tensor, at least
# MIN_CHUNK_ROWS positions. Smaller chunks stay in cache on a CPU (at vocabulary 4096, 1024 rows took 0.56 s per
# KD+CE step where 4096 rows took 0.80 s); a GPU may prefer chunk_size set larger.
CHUNK_ELEMENTS = 1 << 22
MIN_CHUNK_ROWS = 32


class _ChunkedHeadLoss(torch.autograd.Function):
    """sum over rows of loss_fn(hidden @ weight.T, *row tensors), a chunk of rows at a time.

    Gradients for `hidden` and `weight` are computed during the forward pass (float32 accumulation for the
    weight) and only scaled in backward; the row tensors (teacher hidden states, labels) get none.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, loss_fn: Callable, chunk: int,
                *rows: torch.Tensor) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=compute_dtype(hidden, weight), device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None  # (N, H)
        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                             device=weight.device) if need_w else None  # (V, H)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]  # (C, H)
            with torch.enable_grad():
                logits = (h @ weight.T).detach().requires_grad_(True)  # (C, V), in the inputs' dtype
                loss = loss_fn(logits, *(r[start:start + chunk] for r in rows))
                (g,) = torch.autograd.grad(loss, logits)  # (C, V)
            g = g.to(hidden.dtype)  # as the unfused graph would hand it to the matmul's backward
            total += loss.detach()
            if need_h:
                grad_h[start:start + chunk] = g @ weight
            if need_w:
                grad_w.addmm_(g.T.to(grad_w.dtype), h.to(grad_w.dtype))
            del logits, g, loss
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype, ctx.num_rows = weight.dtype, len(rows)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out.to(grad_w.dtype)).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, *([None] * ctx.num_rows)


def _kept_rows(hidden: torch.Tensor, labels: torch.Tensor | None, ignore_index: int, *others: torch.Tensor):
    """(hidden rows, [other rows...], count): positions flattened, those labelled ignore_index dropped."""
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    flat = [o.reshape(h.shape[0], *o.shape[hidden.dim() - 1:]) for o in others]
    if labels is None:
        return h, flat, h.shape[0]
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must be the hidden states' shape without the last "
                         f"dim, {tuple(hidden.shape[:-1])}")
    idx = (labels.reshape(-1) != ignore_index).nonzero().squeeze(1)  # (K,)
    return h.index_select(0, idx), [o.index_select(0, idx) for o in flat], idx.numel()


def _chunk_rows(chunk_size: int | None, vocab: int) -> int:
    if chunk_size is None:
        return max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(vocab, 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return chunk_size


def fused_divergence(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                     teacher_weight: torch.Tensor, *, kind: str = "forward_kl", temperature: float = 1.0,
                     beta: float = 0.5, labels: torch.Tensor | None = None, ignore_index: int = -100,
                     chunk_size: int | None = None) -> torch.Tensor:
    """The value of `divergence(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, ...)`, with
    the same gradients for `student_hidden` and `student_weight`, computed `chunk_size` positions at a time.

    Shapes: hidden states (..., H_s) and (..., H_t) with the same leading dims, weights (V, H_s) and (V, H_t),
    labels (...); weights may differ in rows only for kind "uld". The teacher gets no gradient. chunk_size None: about 2^22 logits per chunk, at least 32
    positions (V=32k: 131). Mean over kept positions, float32 inside, no T^2 factor, 0 when all are masked.
    """
    if kind not in DIVERGENCE_KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {DIVERGENCE_KINDS}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"student/teacher hidden states differ in positions: {tuple(student_hidden.shape)} vs "
                         f"{tuple(teacher_hidden.shape)}")
    if student_weight.shape[0] != teacher_weight.shape[0] and kind != "uld":
        raise ValueError(f"student/teacher vocabularies differ: {student_weight.shape[0]} vs "
                         f"{teacher_weight.shape[0]} rows (align them first: kdkit slices or maps vocabularies)")
    dtype = compute_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight)
    t_weight = teacher_weight.detach()

    def loss_fn(s_logits: torch.Tensor, t_hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            log_t = F.log_softmax((t_hidden @ t_weight.T).to(dtype) / temperature, -1)  # (C, V)
        log_s = F.log_softmax(s_logits.to(dtype) / temperature, -1)  # (C, V)
        return _per_position(kind, log_s, log_t, beta).sum()

    h, (t,), count = _kept_rows(student_hidden, labels, ignore_index, teacher_hidden.detach())
    total = _ChunkedHeadLoss.apply(h, student_weight, loss_fn, _chunk_rows(chunk_size, student_weight.shape[0]), t)
    return total / max(count, 1)


def fused_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                        label_smoothing: float = 0.0, ignore_index: int = -100,
                        chunk_size: int | None = None) -> torch.Tensor:
    """The value and gradients of `cross_entropy(hidden @ weight.T, labels, ...)` without full logits.

    hidden (..., H), weight (V, H), labels (...); mean over positions whose label is not ignore_index, float32
    inside, 0 when every position is masked."""
    dtype = compute_dtype(hidden, weight)

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.to(dtype), target, reduction="sum", label_smoothing=label_smoothing)

    h, (y,), count = _kept_rows(hidden, labels, ignore_index, labels)
    total = _ChunkedHeadLoss.apply(h, weight, loss_fn, _chunk_rows(chunk_size, weight.shape[0]), y)
    return total / max(count, 1)


def answer_pairs(labels: torch.Tensor, teacher_labels: torch.Tensor,
                 ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of two tokenizations of the same samples, paired on the answer span (ULD, Boizard et al. 2024):
    in row b, the i-th labelled student position goes with the i-th labelled teacher position, for
    i < min(labelled in each). labels (B, L_s), teacher_labels (B, L_t) -> flat indices into B*L_s and B*L_t
    (equal length, in order)."""
    if labels.shape[0] != teacher_labels.shape[0]:
        raise ValueError(f"student and teacher batches differ: {labels.shape[0]} vs {teacher_labels.shape[0]} rows")
    keep_s, keep_t = labels != ignore_index, teacher_labels != ignore_index
    n = torch.minimum(keep_s.sum(1), keep_t.sum(1))[:, None]  # (B, 1)
    sel_s = keep_s & (keep_s.cumsum(1) <= n)
    sel_t = keep_t & (keep_t.cumsum(1) <= n)
    return sel_s.reshape(-1).nonzero().squeeze(1), sel_t.reshape(-1).nonzero().squeeze(1)


def fused_terms(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, terms: list[dict], *,
                teacher_hidden: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None,
                vocab_rows: int | None = None, teacher_labels: torch.Tensor | None = None,
                teacher_topk: tuple[torch.Tensor, ...] | None = None, ignore_index: int = -100,
                chunk_size: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Several weighted terms in ONE chunked pass over the student's logits: (weighted total, {name: value}).

    Each term is {"name", "weight", "kind": "ce" | a divergence kind, ...}: ce takes `label_smoothing`; a divergence
    takes `temperature`, `beta` and `scale` (T^2 for Hinton KD) and compares the first `vocab_rows` rows of the
    student's head with the teacher's (its first `vocab_rows` too when `teacher_labels` is None). Each value
    equals its own fused_cross_entropy / fused_divergence (times scale); the total's gradient is their weighted
    sum, computed while each chunk's logits exist once. Values are detached.

    Different tokenizers: `teacher_labels` (B, L_t) marks the teacher's own tokenization of the same samples, whose
    hidden states are (B, L_t, H_t); every divergence must then be "uld", over the positions `answer_pairs` pairs
    (its mean runs over those pairs; CE still runs over every labelled student position), with the teacher's whole
    head (slice it beforehand).

    A cached teacher (kdkit.teacher_cache): `teacher_topk` = (ids (K, k), log-probs (K, k), log rest mass (K,)) for the K
    labelled positions in order, taken at each divergence's temperature; divergences are then those of
    kdkit.losses.sparse (the k + 1 buckets), and no teacher hidden states are needed. Two more entries, the sampled
    tail's ids (K, s) and negative entropy (K,), add the unbiased tail term to forward KL (sparse.tail_correction).
    """
    dtype = compute_dtype(hidden, weight)
    n = vocab_rows or weight.shape[0]
    sums = {t["name"]: torch.zeros((), dtype=dtype, device=hidden.device) for t in terms}
    kd = [t for t in terms if t["kind"] != "ce"]
    cached = kd and teacher_topk is not None
    if kd and not cached and (teacher_hidden is None or teacher_weight is None):
        raise ValueError(f"terms {[t['name'] for t in kd]} need the teacher's hidden states and head weight")
    cross = kd and teacher_labels is not None
    if cross and any(t["kind"] != "uld" for t in kd):
        raise ValueError("with the teacher's own tokenization (teacher_labels) every divergence must be 'uld', got "
                         f"{[t['kind'] for t in kd]}")
    t_weight = (teacher_weight.detach() if cross else teacher_weight.detach()[:n]) if kd and not cached else None

    rows = [teacher_hidden.detach()] if kd and not cross and not cached else []
    h, flat, count = _kept_rows(hidden, labels, ignore_index, labels, *rows)
    pairs = count
    if cached:
        if teacher_topk[0].shape[0] != count:
            raise ValueError(f"the cached teacher has {teacher_topk[0].shape[0]} positions for {count} labelled ones")
        flat += [x.to(hidden.device) for x in teacher_topk]
    if kd and cross:  # teacher rows lined up with the kept student rows; unpaired rows get zeros and no KD
        s_idx, t_idx = answer_pairs(labels, teacher_labels, ignore_index)
        kept = (labels.reshape(-1) != ignore_index).nonzero().squeeze(1)
        slot = torch.searchsorted(kept, s_idx)  # where each paired student position sits among the kept rows
        t_flat = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
        t_rows = t_flat.new_zeros(count, t_flat.shape[1])
        t_rows[slot] = t_flat.index_select(0, t_idx)
        paired = torch.zeros(count, dtype=torch.bool, device=hidden.device)
        paired[slot] = True
        flat += [t_rows, paired]
        pairs = s_idx.numel()
    norm = {t["name"]: 1.0 / max(pairs if t["kind"] != "ce" else count, 1) for t in terms}

    def loss_fn(s_logits: torch.Tensor, target: torch.Tensor, *t_rows: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=dtype, device=s_logits.device)
        t_logits = None
        if kd and not cached:
            with torch.no_grad():
                t_logits = (t_rows[0] @ t_weight.T).to(dtype)  # (C, n) or (C, V_t)
        for t in terms:
            if t["kind"] == "ce":
                value = F.cross_entropy(s_logits.to(dtype), target, reduction="sum",
                                        label_smoothing=t.get("label_smoothing", 0.0))
            else:
                temp = t["temperature"]
                log_s = F.log_softmax(s_logits[:, :n].to(dtype) / temp, -1)
                if cached:
                    s_buckets, log_t = bucket_log_probs(log_s, *t_rows[:3])  # (C, k + 1) each
                    per = _per_position(t["kind"], s_buckets, log_t, t.get("beta", 0.5))  # (C,)
                    if len(t_rows) == 5 and t["kind"] == "forward_kl":
                        per = per + tail_correction(log_s, s_buckets[:, -1], t_rows[2], *t_rows[3:])
                else:
                    log_t = F.log_softmax(t_logits / temp, -1)
                    per = _per_position(t["kind"], log_s, log_t, t.get("beta", 0.5))  # (C,)
                if cross:
                    per = per.masked_fill(~t_rows[1], 0.0)
                value = t.get("scale", 1.0) * per.sum()
            value = value * norm[t["name"]]
            sums[t["name"]] += value.detach()
            total = total + t["weight"] * value
        return total

    total = _ChunkedHeadLoss.apply(h, weight, loss_fn, _chunk_rows(chunk_size, weight.shape[0]), *flat)
    return total, sums
