"""Divergences against a top-k teacher equal the dense ones at full k, lower-bound the KL below it, and give finite
gradients everywhere."""

import pytest
import torch

from kdkit.losses import DIVERGENCE_KINDS, divergence
from kdkit.losses.sparse import sparse_divergence, topk_log_probs

V = 13


def _pair(seed=0, shape=(3, 4)):
    g = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(*shape, V, generator=g, dtype=torch.float64)).requires_grad_(True)
    t = 3 * torch.randn(*shape, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, shape, generator=g)
    labels[0, :2] = -100
    return s, t, labels


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_full_k_equals_the_dense_divergence_in_value_and_gradient(kind, temperature):
    s, t, labels = _pair()
    ids, logp, rest = topk_log_probs(t, V, temperature)
    assert torch.isneginf(rest).all()
    sparse = sparse_divergence(s, ids, logp, rest, kind=kind, temperature=temperature, beta=0.3, labels=labels)
    dense = divergence(s, t, kind=kind, temperature=temperature, beta=0.3, labels=labels)
    torch.testing.assert_close(sparse, dense)
    g_sparse, = torch.autograd.grad(sparse, s)
    g_dense, = torch.autograd.grad(dense, s)
    torch.testing.assert_close(g_sparse, g_dense)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_top_k_never_exceeds_the_dense_kl_and_gradients_stay_finite(k):
    s, t, labels = _pair(1)
    ids, logp, rest = topk_log_probs(t, k)
    assert ids.shape == (3, 4, k) and torch.isfinite(rest).all()
    torch.testing.assert_close(torch.logsumexp(torch.cat([logp, rest[..., None]], -1), -1),
                               torch.zeros(3, 4, dtype=torch.float64))  # the k + 1 buckets hold all the mass
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        sparse = sparse_divergence(s, ids, logp, rest, kind=kind, labels=labels)
        assert 0 <= sparse.item() <= divergence(s, t, kind=kind, labels=labels).item() + 1e-12
        g, = torch.autograd.grad(sparse, s)
        assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_a_student_equal_to_the_teacher_scores_zero_and_masked_rows_are_zero():
    s, t, labels = _pair(2)
    ids, logp, rest = topk_log_probs(t, 4)
    assert sparse_divergence(t, ids, logp, rest).item() == pytest.approx(0, abs=1e-12)
    every = torch.full_like(labels, -100)
    value = sparse_divergence(s, ids, logp, rest, labels=every)
    value.backward()
    assert value.item() == 0 and torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("chunk_size", [1, 5, None])
@pytest.mark.parametrize("with_tail", [False, True])
def test_fused_terms_with_a_cached_teacher_equal_the_sparse_losses(chunk_size, with_tail):
    from kdkit.losses import cross_entropy
    from kdkit.losses.fused import fused_terms

    g = torch.Generator().manual_seed(3)
    hs = torch.randn(2, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(V, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t_logits = 2 * torch.randn(2, 6, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (2, 6), generator=g)
    labels[1, :3] = -100
    keep = labels != -100
    ids, logp, rest = topk_log_probs(t_logits[keep], 4, temperature=2.0)  # the labelled positions, in order
    tail = None
    if with_tail:
        from kdkit.losses.sparse import sample_tail

        tail = sample_tail(torch.log_softmax(t_logits[keep] / 2.0, -1), ids, rest, 5, torch.Generator().manual_seed(1))
    terms = [{"name": "ce", "kind": "ce", "weight": 0.2},
             {"name": "kd", "kind": "forward_kl", "weight": 0.8, "temperature": 2.0, "scale": 4.0}]
    cache = (ids, logp, rest, *tail) if with_tail else (ids, logp, rest)
    total, parts = fused_terms(hs, ws, labels, terms, teacher_topk=cache, chunk_size=chunk_size)
    logits = hs @ ws.T
    kd = 4.0 * sparse_divergence(logits[keep], ids, logp, rest, temperature=2.0, tail=tail)
    ref = 0.2 * cross_entropy(logits, labels) + 0.8 * kd
    torch.testing.assert_close(total, ref)
    torch.testing.assert_close(parts["kd"], kd.detach())
    for a, b in zip(torch.autograd.grad(total, (hs, ws)), torch.autograd.grad(ref, (hs, ws))):
        torch.testing.assert_close(a, b)


def test_the_sampled_tail_makes_forward_kl_unbiased_in_value_and_gradient():
    """KL = bucket KL + r * KL(q_tail || p_tail): with many draws from the tail the estimate reaches the dense value and
    gradient, which the buckets alone undershoot."""
    from kdkit.losses.sparse import sample_tail

    s, t, labels = _pair(3)
    ids, logp, rest = topk_log_probs(t, 3, 2.0)
    log_q = torch.log_softmax(t / 2.0, -1)
    tail = sample_tail(log_q, ids, rest, 200_000, torch.Generator().manual_seed(0))
    assert tail[0].shape == (3, 4, 200_000)
    assert not (tail[0][..., None] == ids[..., None, :]).any()  # never a top-k token
    outside = log_q.scatter(-1, ids, float("-inf")) - rest[..., None]
    torch.testing.assert_close(tail[1], (outside.exp() * outside.nan_to_num(neginf=0.0)).sum(-1))
    dense = divergence(s, t, temperature=2.0, labels=labels)
    buckets = sparse_divergence(s, ids, logp, rest, temperature=2.0, labels=labels)
    sampled = sparse_divergence(s, ids, logp, rest, temperature=2.0, labels=labels, tail=tail)
    assert buckets.item() < dense.item() - 0.05
    assert sampled.item() == pytest.approx(dense.item(), rel=5e-3)
    g_dense, = torch.autograd.grad(dense, s)
    g_sampled, = torch.autograd.grad(sampled, s)
    torch.testing.assert_close(g_sampled, g_dense, atol=2e-3, rtol=0)
    # other kinds ignore the tail; at full k there is no tail and nothing changes
    assert sparse_divergence(s, ids, logp, rest, kind="jsd", labels=labels, tail=tail).item() == \
        sparse_divergence(s, ids, logp, rest, kind="jsd", labels=labels).item()
    ids, logp, rest = topk_log_probs(t, V)
    full = sample_tail(torch.log_softmax(t, -1), ids, rest, 4)
    assert torch.equal(full[1], torch.zeros(3, 4, dtype=torch.float64))
    value = sparse_divergence(s, ids, logp, rest, labels=labels, tail=full)
    torch.testing.assert_close(value, divergence(s, t, labels=labels))
    g, = torch.autograd.grad(value, s)
    assert torch.isfinite(g).all()
