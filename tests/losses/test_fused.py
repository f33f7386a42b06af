"""fused_divergence / fused_cross_entropy equal the unfused losses on full logits, in value and gradients, for
every kind, chunk size, mask and dtype; and they never hold the logits of all positions at once."""

import pytest
import torch

from kdkit.losses import DIVERGENCE_KINDS, cross_entropy, divergence, fused_cross_entropy, fused_divergence
from kdkit.losses import fused as fused_module

B, T, HS, HT, V = 3, 5, 6, 10, 17


def _inputs(dtype=torch.float64, seed=0, masked=True):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, T, HS, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    ws = (torch.randn(V, HS, generator=g, dtype=torch.float64) * 0.7).to(dtype).requires_grad_(True)
    ht = torch.randn(B, T, HT, generator=g, dtype=torch.float64).to(dtype)
    wt = (torch.randn(V, HT, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    if masked:
        labels[0, :2] = -100  # a prompt
        labels[2, -1] = -100
    return hs, ws, ht, wt, labels


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_fused_divergence_equals_divergence_on_full_logits(kind, chunk_size):
    hs, ws, ht, wt, labels = _inputs()
    kwargs = dict(kind=kind, temperature=2.0, beta=0.3, labels=labels)
    ref = divergence(hs @ ws.T, ht @ wt.T, **kwargs)
    out = fused_divergence(hs, ws, ht, wt, chunk_size=chunk_size, **kwargs)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads(out, hs, ws), _grads(ref, hs, ws)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_endpoints_and_no_labels(beta):
    hs, ws, ht, wt, _ = _inputs()
    ref = divergence(hs @ ws.T, ht @ wt.T, kind="jsd", beta=beta)
    out = fused_divergence(hs, ws, ht, wt, kind="jsd", beta=beta, chunk_size=2)
    torch.testing.assert_close(out, ref)
    for a, b in zip(_grads(out, hs, ws), _grads(ref, hs, ws)):
        torch.testing.assert_close(a, b)


def test_bf16_inputs_match_the_unfused_bf16_graph():
    hs, ws, ht, wt, labels = _inputs(torch.bfloat16)
    ref = divergence(hs @ ws.T, ht @ wt.T, kind="forward_kl", labels=labels)
    out = fused_divergence(hs, ws, ht, wt, kind="forward_kl", labels=labels, chunk_size=3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    (gh, gw), (rh, rw) = _grads(out, hs, ws), _grads(ref, hs, ws)
    assert gh.dtype == gw.dtype == torch.bfloat16
    torch.testing.assert_close(gh, rh, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(gw, rw, rtol=2e-2, atol=2e-3)  # float32 accumulation across chunks: at least as exact


def test_everything_masked_is_zero_with_zero_gradients():
    hs, ws, ht, wt, labels = _inputs()
    labels[:] = -100
    out = fused_divergence(hs, ws, ht, wt, labels=labels)
    assert out.item() == 0.0
    gh, gw = _grads(out, hs, ws)
    assert not gh.any() and not gw.any()
    ce = fused_cross_entropy(hs, ws, labels)
    assert ce.item() == 0.0


def test_the_teacher_gets_no_gradient_and_a_frozen_head_none():
    hs, ws, ht, wt, labels = _inputs()
    ht.requires_grad_(True)
    wt.requires_grad_(True)
    ws_frozen = ws.detach()
    out = fused_divergence(hs, ws_frozen, ht, wt, labels=labels)
    out.backward()
    assert hs.grad is not None and ht.grad is None and wt.grad is None


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_fused_cross_entropy_equals_cross_entropy(label_smoothing, chunk_size):
    hs, ws, _, _, labels = _inputs()
    ref = cross_entropy(hs @ ws.T, labels, label_smoothing=label_smoothing)
    out = fused_cross_entropy(hs, ws, labels, label_smoothing=label_smoothing, chunk_size=chunk_size)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads(out, hs, ws), _grads(ref, hs, ws)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_scaled_upstream_gradient_scales_the_result():
    hs, ws, ht, wt, labels = _inputs()
    out = fused_divergence(hs, ws, ht, wt, labels=labels, chunk_size=2)
    ref = divergence(hs @ ws.T, ht @ wt.T, labels=labels)
    for a, b in zip(torch.autograd.grad(3.5 * out, (hs, ws)), torch.autograd.grad(3.5 * ref, (hs, ws))):
        torch.testing.assert_close(a, b)


def test_logits_are_never_held_for_all_positions(monkeypatch):
    """Every logits tensor the fused loss builds has at most chunk_size rows."""
    biggest = []
    real_per_position = fused_module._per_position

    def spy(kind, log_s, log_t, beta):
        biggest.append(log_s.shape[0])
        return real_per_position(kind, log_s, log_t, beta)

    monkeypatch.setattr(fused_module, "_per_position", spy)
    hs, ws, ht, wt, labels = _inputs(masked=False)
    fused_divergence(hs, ws, ht, wt, labels=labels, chunk_size=4).backward()
    assert biggest and max(biggest) == 4 and sum(biggest) == B * T


def test_default_chunk_is_bounded_by_elements():
    assert fused_module._chunk_rows(None, 32000) == (1 << 22) // 32000
    assert fused_module._chunk_rows(None, 10**9) == fused_module.MIN_CHUNK_ROWS
    with pytest.raises(ValueError):
        fused_module._chunk_rows(0, 10)


def test_bad_shapes_are_refused():
    hs, ws, ht, wt, labels = _inputs()
    with pytest.raises(ValueError, match="vocabularies differ"):
        fused_divergence(hs, ws, ht, wt[:-1])
    with pytest.raises(ValueError, match="positions"):
        fused_divergence(hs, ws, ht[:, :-1], wt)
    with pytest.raises(ValueError, match="labels shape"):
        fused_divergence(hs, ws, ht, wt, labels=labels[:, :-1])
    with pytest.raises(ValueError, match="unknown divergence"):
        fused_divergence(hs, ws, ht, wt, kind="kl")


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_float32_and_temperatures(kind, temperature):
    hs, ws, ht, wt, labels = _inputs(torch.float32)
    kwargs = dict(kind=kind, temperature=temperature, beta=0.3, labels=labels)
    ref = divergence(hs @ ws.T, ht @ wt.T, **kwargs)
    out = fused_divergence(hs, ws, ht, wt, chunk_size=3, **kwargs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(out, hs, ws), _grads(ref, hs, ws)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_minus_inf_padded_vocabulary_rows_give_finite_values_and_gradients(kind):
    """Padded head rows whose logits are -inf in both models (as a -inf bias would make them)."""
    hs, ws, ht, wt, labels = _inputs()
    pad = torch.zeros(V, dtype=torch.bool)
    pad[-3:] = True
    # a constant 1 column carries a bias of -inf on the padded rows, as a biased head does in kdkit.models.causal
    one = torch.ones(*hs.shape[:-1], 1, dtype=hs.dtype)
    bias = torch.zeros(V, 1, dtype=hs.dtype).masked_fill(pad[:, None], float("-inf"))
    hs1 = torch.cat([hs, one], -1)
    ws1 = torch.cat([ws, bias], -1)
    ht1, wt1 = torch.cat([ht, one], -1), torch.cat([wt, bias], -1)
    out = fused_divergence(hs1, ws1, ht1, wt1, kind=kind, labels=labels, chunk_size=4)
    assert torch.isfinite(out)
    gh, = torch.autograd.grad(out, hs)
    assert torch.isfinite(gh).all()
    ref = divergence((hs @ ws.T)[..., :-3], (ht @ wt.T)[..., :-3], kind=kind, labels=labels)
    torch.testing.assert_close(out, ref)


def test_fused_terms_equal_the_separate_losses_in_one_pass():
    from kdkit.losses.fused import fused_terms

    hs, ws, ht, wt, labels = _inputs()
    wt_padded = torch.cat([wt, torch.randn(2, HT, dtype=wt.dtype)])  # a teacher head with 2 padded rows
    terms = [{"name": "ce", "kind": "ce", "weight": 0.1, "label_smoothing": 0.1},
             {"name": "kd", "kind": "forward_kl", "weight": 0.9, "temperature": 2.0, "scale": 4.0},
             {"name": "jsd", "kind": "jsd", "weight": 0.5, "temperature": 1.0, "beta": 0.3}]
    total, parts = fused_terms(hs, ws, labels, terms, teacher_hidden=ht, teacher_weight=wt_padded, vocab_rows=V,
                               chunk_size=4)
    ce = cross_entropy(hs @ ws.T, labels, label_smoothing=0.1)
    kd = 4.0 * divergence(hs @ ws.T, ht @ wt.T, kind="forward_kl", temperature=2.0, labels=labels)
    jsd = divergence(hs @ ws.T, ht @ wt.T, kind="jsd", beta=0.3, labels=labels)
    ref = 0.1 * ce + 0.9 * kd + 0.5 * jsd
    torch.testing.assert_close(total, ref)
    torch.testing.assert_close(parts["ce"], ce.detach())
    torch.testing.assert_close(parts["kd"], kd.detach())
    torch.testing.assert_close(parts["jsd"], jsd.detach())
    for a, b in zip(_grads(total, hs, ws), _grads(ref, hs, ws)):
        torch.testing.assert_close(a, b)


def test_answer_pairs_line_up_the_ith_answer_token_of_each_tokenization():
    from kdkit.losses.fused import answer_pairs

    s = torch.tensor([[-100, 5, 6, 7, -100], [-100, -100, 1, -100, -100]])
    t = torch.tensor([[-100, -100, 8, 9, -100, -100], [2, 3, 4, -100, -100, -100]])
    s_idx, t_idx = answer_pairs(s, t)
    assert s_idx.tolist() == [1, 2, 5 + 2]  # row 0: 2 pairs (the teacher has 2 answer tokens), row 1: 1 pair
    assert t_idx.tolist() == [2, 3, 6 + 0]


@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_cross_tokenizer_uld_equals_a_per_pair_reference(chunk_size):
    """Teacher with its own tokenization (other length, other vocabulary): ULD over the answer pairs, CE over every
    student answer position, both in one pass, with the gradients of the plain computation."""
    from kdkit.losses.divergence import uld_distance
    from kdkit.losses.fused import fused_terms

    hs, ws, _, _, labels = _inputs()
    g = torch.Generator().manual_seed(7)
    vt, lt = 23, 7  # the teacher's vocabulary and sequence length differ from the student's
    ht = torch.randn(B, lt, HT, generator=g, dtype=torch.float64)
    wt = torch.randn(vt, HT, generator=g, dtype=torch.float64)
    t_labels = torch.randint(0, vt, (B, lt), generator=g)
    t_labels[0, :4] = -100
    t_labels[1, :] = -100  # a sample the teacher's tokenization truncated away: no pairs, still CE
    terms = [{"name": "ce", "kind": "ce", "weight": 0.3},
             {"name": "kd", "kind": "uld", "weight": 0.7, "temperature": 2.0}]
    total, parts = fused_terms(hs, ws, labels, terms, teacher_hidden=ht, teacher_weight=wt, teacher_labels=t_labels,
                               chunk_size=chunk_size)

    per_pair = []
    for b in range(B):
        si = (labels[b] != -100).nonzero().squeeze(1).tolist()
        ti = (t_labels[b] != -100).nonzero().squeeze(1).tolist()
        for i, j in zip(si, ti):
            per_pair.append(uld_distance(torch.log_softmax(hs[b, i] @ ws.T / 2.0, -1),
                                         torch.log_softmax(ht[b, j] @ wt.T / 2.0, -1)))
    uld = torch.stack(per_pair).mean()
    ce = cross_entropy(hs @ ws.T, labels)
    ref = 0.3 * ce + 0.7 * uld
    torch.testing.assert_close(parts["kd"], uld.detach())
    torch.testing.assert_close(parts["ce"], ce.detach())
    torch.testing.assert_close(total, ref)
    for a, b in zip(_grads(total, hs, ws), _grads(ref, hs, ws)):
        torch.testing.assert_close(a, b)


def test_cross_tokenizer_needs_uld():
    from kdkit.losses.fused import fused_terms

    hs, ws, ht, wt, labels = _inputs()
    with pytest.raises(ValueError, match="must be 'uld'"):
        fused_terms(hs, ws, labels, [{"name": "kd", "kind": "forward_kl", "weight": 1.0, "temperature": 1.0}],
                    teacher_hidden=ht, teacher_weight=wt, teacher_labels=labels)
