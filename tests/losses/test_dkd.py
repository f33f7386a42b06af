"""Tests for kdkit.losses.dkd_loss against the formulas of Zhao et al. (CVPR 2022)."""

import math

import pytest
import torch

from kdkit.losses import dkd_loss, kd_loss


def _logits(seed, shape=(6, 10), scale=3.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)


def _labels(seed, batch=6, num_classes=10):
    return torch.randint(0, num_classes, (batch,), generator=torch.Generator().manual_seed(seed))


def _kl(p, q):
    return sum(pv * math.log(pv / qv) for pv, qv in zip(p, q) if pv > 0)


def reference(student, teacher, labels, alpha, beta, temperature):
    """Paper formulas, per sample: b = [p_t, 1 - p_t], p_hat_i = p_i / (1 - p_t) for i != t."""
    tckd, nckd = [], []
    for s, t, y in zip(student.double(), teacher.double(), labels.tolist()):
        p_s = torch.softmax(s / temperature, -1).tolist()
        p_t = torch.softmax(t / temperature, -1).tolist()
        tckd.append(_kl([p_t[y], 1 - p_t[y]], [p_s[y], 1 - p_s[y]]))
        hat_s = [p / (1 - p_s[y]) for i, p in enumerate(p_s) if i != y]
        hat_t = [p / (1 - p_t[y]) for i, p in enumerate(p_t) if i != y]
        nckd.append(_kl(hat_t, hat_s))
    n = len(tckd)
    return temperature**2 * (alpha * sum(tckd) / n + beta * sum(nckd) / n)


def mdistiller_style(student, teacher, labels, alpha, beta, temperature):
    """Re-statement of the official implementation: probability sums and a -1000 target mask."""
    gt = torch.nn.functional.one_hot(labels, student.shape[-1]).double()
    s, t = student.double() / temperature, teacher.double() / temperature
    p_s, p_t = s.softmax(-1), t.softmax(-1)
    b_s = torch.stack([(p_s * gt).sum(-1), (p_s * (1 - gt)).sum(-1)], -1)
    b_t = torch.stack([(p_t * gt).sum(-1), (p_t * (1 - gt)).sum(-1)], -1)
    tckd = (b_t * (b_t.log() - b_s.log())).sum() / labels.shape[0]
    q_t = (t - 1000.0 * gt).softmax(-1)
    log_q_s = (s - 1000.0 * gt).log_softmax(-1)
    nckd = torch.xlogy(q_t, q_t).sum() - (q_t * log_q_s).sum()
    return temperature**2 * (alpha * tckd + beta * nckd / labels.shape[0])


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("alpha, beta", [(1.0, 8.0), (0.5, 2.0)])
@pytest.mark.parametrize("num_classes", [2, 10])
def test_matches_reference(temperature, alpha, beta, num_classes):
    s, t = _logits(0, (6, num_classes)), _logits(1, (6, num_classes))
    labels = _labels(2, 6, num_classes)
    value = dkd_loss(s, t, labels, alpha=alpha, beta=beta, temperature=temperature)
    assert value.dtype == torch.float32 and value.dim() == 0
    expected = reference(s, t, labels, alpha, beta, temperature)
    assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert expected == pytest.approx(mdistiller_style(s, t, labels, alpha, beta, temperature).item(), rel=1e-9)


def test_defaults_are_paper_defaults():
    s, t, labels = _logits(3), _logits(4), _labels(5)
    expected = reference(s, t, labels, alpha=1.0, beta=8.0, temperature=4.0)
    assert dkd_loss(s, t, labels).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_zero_when_student_equals_teacher(temperature):
    s, labels = _logits(6), _labels(7)
    assert abs(dkd_loss(s, s.clone(), labels, temperature=temperature).item()) < 1e-6


@pytest.mark.parametrize("seed", range(3))
def test_reduces_to_kd_with_paper_weights(seed):
    # Eq. 5 of the paper: KD = TCKD + (1 - p_t^T) NCKD, per sample.
    s, t, y = _logits(10 + seed, (1, 10)), _logits(20 + seed, (1, 10)), _labels(30 + seed, 1)
    temperature = 2.0
    p_target = torch.softmax(t.double() / temperature, -1)[0, y].item()
    dkd = dkd_loss(s, t, y, alpha=1.0, beta=1.0 - p_target, temperature=temperature)
    kd = kd_loss(s, t, temperature=temperature)
    assert dkd.item() == pytest.approx(kd.item(), rel=1e-5)


def test_alpha_beta_linear():
    s, t, labels = _logits(8), _logits(9), _labels(10)
    tckd = dkd_loss(s, t, labels, alpha=1.0, beta=0.0)
    nckd = dkd_loss(s, t, labels, alpha=0.0, beta=1.0)
    for alpha, beta in [(2.0, 3.0), (0.5, 8.0), (0.0, 0.0)]:
        value = dkd_loss(s, t, labels, alpha=alpha, beta=beta)
        torch.testing.assert_close(value, alpha * tckd + beta * nckd)
    assert tckd.item() > 0 and nckd.item() > 0


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_finite_gradients(scale):
    # scale=1e3: saturated softmaxes where log(sum of probs) would give -inf / NaN.
    s = _logits(11, scale=scale).requires_grad_(True)
    t = _logits(12, scale=scale).requires_grad_(True)
    value = dkd_loss(s, t, _labels(13))
    assert torch.isfinite(value)
    value.backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    assert s.grad.abs().sum() > 0


def test_neg_inf_class_logits_are_finite():
    s, t, labels = _logits(14), _logits(15), _labels(16).clamp(max=7)
    s[:, 8:] = float("-inf")
    t[:, 8:] = float("-inf")
    s.requires_grad_(True)
    value = dkd_loss(s, t, labels)
    expected = reference(s.detach()[:, :8], t[:, :8], labels, 1.0, 8.0, 4.0)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    value.backward()
    assert torch.isfinite(s.grad).all()


def test_gradcheck():
    s = _logits(17, (3, 5), dtype=torch.float64).requires_grad_(True)
    t = _logits(18, (3, 5), dtype=torch.float64).requires_grad_(True)
    labels = torch.tensor([0, 3, 4])
    assert torch.autograd.gradcheck(lambda a, b: dkd_loss(a, b, labels, alpha=0.7, beta=2.0), (s, t))


def test_bf16_returns_float32():
    s, t, labels = _logits(19, dtype=torch.bfloat16), _logits(20, dtype=torch.bfloat16), _labels(21)
    value = dkd_loss(s, t, labels)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(reference(s.float(), t.float(), labels, 1.0, 8.0, 4.0), rel=1e-5)


@pytest.mark.parametrize(
    "student_shape, labels_shape",
    [((6, 10, 2), (6,)), ((6, 1), (6,)), ((6, 10), (5,))],
)
def test_bad_shapes_raise(student_shape, labels_shape):
    s = torch.zeros(student_shape)
    with pytest.raises(ValueError):
        dkd_loss(s, s.clone(), torch.zeros(labels_shape, dtype=torch.long))
