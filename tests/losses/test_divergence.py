"""Tests for kdkit.losses.divergence: values against a plain float64 reference, masking,
-inf vocab entries, gradients, dtypes and the GKD / DistiLLM conventions."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdkit.losses import DIVERGENCE_KINDS, cross_entropy, divergence, kd_loss

KINDS = list(DIVERGENCE_KINDS)
SHAPE = (2, 5, 11)


def _logits(seed, shape=SHAPE, scale=3.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)


def _labels(seed, shape=SHAPE[:-1], masked_frac=0.4):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, SHAPE[-1], shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < masked_frac] = -100
    return labels


# ---------------------------------------------------------------- float64 reference
def _kl(p, q):
    """sum_v p_v log(p_v / q_v), skipping p_v = 0."""
    total = 0.0
    for pv, qv in zip(p.tolist(), q.tolist()):
        if pv > 0:
            total += pv * math.log(pv / qv)
    return total


def _ref_position(kind, p_s, p_t, beta):
    if kind == "forward_kl":
        return _kl(p_t, p_s)
    if kind == "reverse_kl":
        return _kl(p_s, p_t)
    if kind == "jsd":  # TRL generalized_jsd_loss convention, endpoints special-cased
        if beta == 0:
            return _kl(p_t, p_s)
        if beta == 1:
            return _kl(p_s, p_t)
        m = beta * p_t + (1 - beta) * p_s
        return beta * _kl(p_t, m) + (1 - beta) * _kl(p_s, m)
    if kind == "skew_forward_kl":
        return _kl(p_t, beta * p_t + (1 - beta) * p_s)
    if kind == "skew_reverse_kl":
        return _kl(p_s, beta * p_s + (1 - beta) * p_t)
    if kind == "tvd":
        return 0.5 * sum(abs(a - b) for a, b in zip(p_t.tolist(), p_s.tolist()))
    if kind == "uld":  # sorted probabilities, the shorter list padded with zeros
        a, b = sorted(p_s.tolist(), reverse=True), sorted(p_t.tolist(), reverse=True)
        width = max(len(a), len(b))
        a, b = a + [0.0] * (width - len(a)), b + [0.0] * (width - len(b))
        return sum(abs(x - y) for x, y in zip(a, b))
    raise AssertionError(kind)


def reference(student, teacher, kind, temperature=1.0, beta=0.5, labels=None, ignore_index=-100):
    s = student.detach().double().reshape(-1, student.shape[-1])
    t = teacher.detach().double().reshape(-1, teacher.shape[-1])
    keep = [True] * s.shape[0] if labels is None else (labels.reshape(-1) != ignore_index).tolist()
    values = [
        _ref_position(kind, torch.softmax(s[i] / temperature, -1), torch.softmax(t[i] / temperature, -1), beta)
        for i in range(s.shape[0])
        if keep[i]
    ]
    return sum(values) / len(values) if values else 0.0


# ---------------------------------------------------------------- values
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_zero_for_identical_inputs(kind, temperature):
    logits = _logits(0)
    value = divergence(logits, logits.clone(), kind=kind, temperature=temperature)
    assert value.abs().item() < 1e-6


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_matches_float64_reference(kind, temperature, beta):
    s, t = _logits(1), _logits(2)
    value = divergence(s, t, kind=kind, temperature=temperature, beta=beta)
    assert value.dtype == torch.float32
    expected = reference(s, t, kind, temperature, beta)
    assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # float64 inputs stay float64 and match tightly.
    value64 = divergence(s.double(), t.double(), kind=kind, temperature=temperature, beta=beta)
    assert value64.dtype == torch.float64
    assert value64.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(4))
def test_nonnegative(kind, seed):
    s, t = _logits(10 + seed, scale=5.0 * (seed + 1)), _logits(20 + seed, scale=seed + 1.0)
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert divergence(s, t, kind=kind, beta=beta, temperature=2.0).item() >= 0.0


def test_unknown_kind_lists_kinds():
    s = _logits(0)
    with pytest.raises(ValueError) as err:
        divergence(s, s, kind="kl")
    for kind in KINDS:
        assert kind in str(err.value)


@pytest.mark.parametrize("bad", [dict(beta=-0.1), dict(beta=1.5), dict(temperature=0.0)])
def test_invalid_hyperparameters(bad):
    s = _logits(0)
    with pytest.raises(ValueError):
        divergence(s, s, kind="jsd", **bad)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        divergence(_logits(0), _logits(1, shape=(2, 5, 12)))
    with pytest.raises(ValueError):
        divergence(_logits(0), _logits(1), labels=torch.zeros(2, 4, dtype=torch.long))


# ---------------------------------------------------------------- conventions
def test_jsd_endpoints_follow_trl():
    # TRL special-cases beta=0 as KL(teacher||student) and beta=1 as KL(student||teacher).
    s, t = _logits(3), _logits(4)
    assert torch.equal(divergence(s, t, kind="jsd", beta=0.0), divergence(s, t, kind="forward_kl"))
    assert torch.equal(divergence(s, t, kind="jsd", beta=1.0), divergence(s, t, kind="reverse_kl"))
    # ...which is a jump, not the continuous limit: JSD(beta) -> 0 as beta -> 0 or 1.
    assert divergence(s, t, kind="jsd", beta=1e-6).item() < 1e-4
    assert divergence(s, t, kind="jsd", beta=1 - 1e-6).item() < 1e-4


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_swap_symmetry(beta):
    # JSD(beta; S, T) == JSD(1 - beta; T, S): the mixture and the two weighted terms swap.
    s, t = _logits(5), _logits(6)
    a = divergence(s, t, kind="jsd", beta=beta)
    b = divergence(t, s, kind="jsd", beta=1 - beta)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("skew, plain", [("skew_forward_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")])
def test_skew_endpoints(skew, plain):
    # DistiLLM: skew 0 is the plain KL, skew 1 compares a distribution with itself.
    s, t = _logits(7), _logits(8)
    torch.testing.assert_close(divergence(s, t, kind=skew, beta=0.0), divergence(s, t, kind=plain))
    assert divergence(s, t, kind=skew, beta=1.0).item() == 0.0


# ---------------------------------------------------------------- masking
@pytest.mark.parametrize("kind", KINDS)
def test_mask_excludes_positions(kind):
    s, t, labels = _logits(11), _logits(12), _labels(13)
    assert 0 < (labels == -100).sum() < labels.numel()
    value = divergence(s, t, kind=kind, beta=0.3, temperature=2.0, labels=labels)
    expected = reference(s, t, kind, 2.0, 0.3, labels=labels)
    assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)

    # Rewriting masked positions (big values, even all -inf rows) changes nothing.
    masked = labels == -100
    s2, t2 = s.clone(), t.clone()
    s2[masked] = 100 * _logits(14)[masked]
    t2[masked] = float("-inf")
    s2.requires_grad_(True)
    value2 = divergence(s2, t2, kind=kind, beta=0.3, temperature=2.0, labels=labels)
    assert torch.equal(value, value2.detach())
    value2.backward()
    assert torch.isfinite(s2.grad).all()
    assert (s2.grad[masked] == 0).all()


def test_custom_ignore_index():
    s, t = _logits(15), _logits(16)
    labels = _labels(17).clamp(min=0)
    labels[0, :2] = 7
    expected = reference(s, t, "forward_kl", labels=labels, ignore_index=7)
    assert divergence(s, t, labels=labels, ignore_index=7).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_all_masked_is_exactly_zero_with_zero_grads(kind):
    s = _logits(18).requires_grad_(True)
    t = _logits(19).requires_grad_(True)
    labels = torch.full(SHAPE[:-1], -100)
    value = divergence(s, t, kind=kind, labels=labels)
    assert value.item() == 0.0
    value.backward()
    for grad in (s.grad, t.grad):
        assert torch.equal(grad, torch.zeros_like(grad))


# ---------------------------------------------------------------- -inf vocab entries
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_neg_inf_vocab_entries(kind, beta):
    padded = [3, 9, 10]  # e.g. padded vocabulary rows, -inf for both models
    kept = [v for v in range(SHAPE[-1]) if v not in padded]
    s = _logits(20).index_fill(-1, torch.tensor(padded), float("-inf")).requires_grad_(True)
    t = _logits(21).index_fill(-1, torch.tensor(padded), float("-inf")).requires_grad_(True)
    value = divergence(s, t, kind=kind, beta=beta, temperature=2.0)
    assert torch.isfinite(value)
    # Same value as if the padded entries did not exist.
    expected = reference(s[..., kept], t[..., kept], kind, 2.0, beta)
    assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # materialize_grads: skew kinds at beta=1 do not depend on the student at all.
    grads = torch.autograd.grad(value, (s, t), allow_unused=True, materialize_grads=True)
    for grad in grads:
        assert torch.isfinite(grad).all()
        assert (grad[..., padded] == 0).all()


# ---------------------------------------------------------------- gradients and dtypes
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind):
    s = _logits(22, shape=(2, 3, 5), dtype=torch.float64).requires_grad_(True)
    t = _logits(23, shape=(2, 3, 5), dtype=torch.float64).requires_grad_(True)
    labels = torch.tensor([[1, -100, 2], [0, 4, -100]])
    fn = lambda a, b: divergence(a, b, kind=kind, beta=0.3, temperature=1.5, labels=labels)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s, t))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_return_float32(kind, dtype):
    s, t = _logits(24, dtype=dtype), _logits(25, dtype=dtype)
    value = divergence(s, t, kind=kind, temperature=2.0)
    assert value.dtype == torch.float32
    # Computed in float32 from the rounded inputs, not in low precision.
    expected = reference(s.float(), t.float(), kind, 2.0)
    assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------- kd_loss, cross_entropy
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_kd_loss_is_t_squared_divergence(kind, temperature):
    s, t, labels = _logits(26), _logits(27), _labels(28)
    expected = temperature**2 * divergence(s, t, kind=kind, temperature=temperature, beta=0.2, labels=labels)
    got = kd_loss(s, t, temperature=temperature, kind=kind, beta=0.2, labels=labels)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("masked_frac", [0.0, 0.4])
def test_cross_entropy_matches_torch(label_smoothing, masked_frac):
    s, labels = _logits(29), _labels(30, masked_frac=masked_frac)
    expected = F.cross_entropy(s.reshape(-1, SHAPE[-1]), labels.reshape(-1), label_smoothing=label_smoothing)
    got = cross_entropy(s, labels, label_smoothing=label_smoothing)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_cross_entropy_all_masked_and_dtype():
    s = _logits(31, dtype=torch.bfloat16).requires_grad_(True)
    value = cross_entropy(s, torch.full(SHAPE[:-1], -100), label_smoothing=0.1)
    assert value.dtype == torch.float32 and value.item() == 0.0
    value.backward()
    assert torch.equal(s.grad, torch.zeros_like(s.grad))


# ---------------------------------------------------------------- ULD: vocabularies of different sizes
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_uld_compares_vocabularies_of_different_sizes(temperature):
    s, t = _logits(1), _logits(2, shape=SHAPE[:-1] + (17,))
    labels = _labels(3)
    value = divergence(s, t, kind="uld", temperature=temperature, labels=labels)
    assert value.item() == pytest.approx(reference(s, t, "uld", temperature, labels=labels), rel=1e-5)
    with pytest.raises(ValueError, match="shapes differ"):
        divergence(s, t, kind="tvd")


def test_uld_ignores_which_token_is_which():
    """Sorted probabilities: permuting the teacher's vocabulary (another tokenizer's ids) changes nothing, and
    padding it with impossible tokens changes nothing either."""
    s = _logits(4)
    t = s[..., torch.randperm(SHAPE[-1], generator=torch.Generator().manual_seed(0))]
    padded = torch.cat([t, torch.full(SHAPE[:-1] + (6,), float("-inf"))], -1)
    assert divergence(s, t, kind="uld").item() < 1e-6
    value = divergence(s.requires_grad_(), padded, kind="uld")
    value.backward()
    assert value.item() < 1e-6 and torch.isfinite(s.grad).all()
