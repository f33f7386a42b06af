"""Feature distances, attention KL and attention transfer: equal to plain references, by hand and through the
planned terms (kdkit.distill.features) on tiny models."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdkit.config.schema import LossTerm
from kdkit.data import preprocess
from kdkit.distill.features import build_inner_terms
from kdkit.errors import UserError
from kdkit.losses.features import attention_kl, attention_transfer, feature_distance
from kdkit.models import FrozenTeacher

from tiny_nets import classifier, hf_vit, zoo_cnn


def test_distances_equal_their_definitions():
    s, t = torch.randn(4, 6, 5, 5), torch.randn(4, 6, 5, 5)
    assert torch.allclose(feature_distance(s, t, "mse", 1), ((s - t) ** 2).mean())
    d = (s - t).abs()
    assert torch.allclose(feature_distance(s, t, "smooth_l1", 1), torch.where(d < 1, 0.5 * d ** 2, d - 0.5).mean())
    cos = (s * t).sum(1) / (s.norm(dim=1) * t.norm(dim=1))  # per position, over channels
    assert torch.allclose(feature_distance(s, t, "cosine", 1), (1 - cos).mean())
    for kind in ("mse", "smooth_l1", "cosine"):
        assert feature_distance(s, s.clone(), kind, 1).abs() < 1e-6
    with pytest.raises(ValueError, match="differ"):
        feature_distance(s, t[:, :3], "mse")


def _kl_by_hand(s, t):
    """sum_k t log(t / s), averaged over everything else, with explicit loops over the batch and queries."""
    total, n = 0.0, 0
    for b in range(t.shape[0]):
        for q in range(t.shape[-2]):
            p, r = t[b, ..., q, :].double(), s[b, ..., q, :].double()
            total += float((p * (p.log() - r.log())).sum(-1).sum())
            n += p[..., 0].numel()
    return total / n


def test_attention_kl_by_hand_and_properties():
    s = torch.softmax(torch.randn(2, 3, 5, 5), -1)
    t = torch.softmax(torch.randn(2, 3, 5, 5), -1)
    assert attention_kl(s, t, per_head=True).item() == pytest.approx(_kl_by_hand(s, t), rel=1e-5)
    assert attention_kl(s, t).item() == pytest.approx(_kl_by_hand(s.mean(1), t.mean(1)), rel=1e-5)
    assert attention_kl(t, t.clone(), per_head=True).abs() < 1e-6
    # heads may differ when averaged, not per head; token counts may not differ
    t4 = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    assert torch.isfinite(attention_kl(s, t4))
    with pytest.raises(ValueError, match="equal head counts"):
        attention_kl(s, t4, per_head=True)
    with pytest.raises(ValueError, match="different tokens"):
        attention_kl(s, torch.softmax(torch.randn(2, 3, 7, 7), -1))


def _at_by_hand(fs, ft):
    """Zagoruyko & Komodakis, p = 2, one sample at a time; the student map pooled to the teacher's size by hand."""
    out = []
    for b in range(fs.shape[0]):
        a_s, a_t = (fs[b] ** 2).mean(0), (ft[b] ** 2).mean(0)
        k = a_s.shape[0] // a_t.shape[0]
        a_s = a_s.reshape(a_t.shape[0], k, a_t.shape[1], k).mean((1, 3))
        a_s, a_t = a_s.flatten() / a_s.norm(), a_t.flatten() / a_t.norm()
        out.append((a_s - a_t).norm())
    return torch.stack(out).mean()


def test_attention_transfer_by_hand():
    fs, ft = torch.randn(3, 4, 8, 8, requires_grad=True), torch.randn(3, 16, 4, 4)
    loss = attention_transfer(fs, ft)
    torch.testing.assert_close(loss, _at_by_hand(fs, ft))
    loss.backward()
    assert torch.isfinite(fs.grad).all()
    same = torch.randn(2, 4, 6, 6, requires_grad=True)
    zero = attention_transfer(same, same.detach() * 3)  # the same spatial distribution of energy
    zero.backward()
    assert zero.item() == pytest.approx(0.0, abs=1e-6) and torch.isfinite(same.grad).all()
    assert 0.0 <= attention_transfer(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)).item() <= 2.0


def _planned(student, teacher_model, terms):
    inner = build_inner_terms(terms, student, FrozenTeacher(teacher_model), channels=1, image_size=(8, 8),
                              lr=1e-3, projector_lr=None)
    x = torch.rand(3, 1, 8, 8)
    _, targets = inner.teacher_targets(x, None)
    inner.module.eval()
    with torch.no_grad():
        logits, parts = inner.module(x, targets)
    return inner, x, logits, parts


@pytest.mark.parametrize("per_head", [False, True])
def test_planned_attention_kl_equals_output_attentions(capsys, per_head):
    student = classifier(hf_vit(hidden=8, layers=2, heads=2)).eval()
    teacher = classifier(hf_vit(hidden=16, layers=4, heads=2)).eval()
    term = LossTerm(kind="attention", name="att", mode="kl", per_head=per_head, num_pairs=2)
    _, x, logits, parts = _planned(student, teacher, [term])
    printed = capsys.readouterr().out
    assert "att: 2 pairs" in printed and "net.vit.layers.1.attention (2x17x17) -> net.vit.layers.3.attention (2x17x17)" in printed
    assert "eager attention" in printed
    refs = []
    for m in (student, teacher):
        m.net.set_attn_implementation("eager")
        with torch.no_grad():
            refs.append(m.net(pixel_values=preprocess(x, m.image_size, m.mean, m.std), output_attentions=True).attentions)
    (s0, s1), t = refs[0], refs[1]
    pick = (lambda a: a) if per_head else (lambda a: a.mean(1))
    expected = (_kl_by_hand(pick(s0), pick(t[1])) + _kl_by_hand(pick(s1), pick(t[3]))) / 2  # layers 1 and 3 of 4
    assert expected > 1e-2  # peaked attention: a KL far from float32 round-off
    assert parts["att"].item() == pytest.approx(expected, rel=1e-4)
    torch.testing.assert_close(logits, student(x))  # the student's own output, unchanged by the hooks


def test_per_head_kl_needs_equal_heads_and_kl_needs_equal_tokens():
    student = classifier(hf_vit(hidden=8, layers=2, heads=2))
    teacher = classifier(hf_vit(hidden=16, layers=2, heads=4))
    with pytest.raises(UserError, match=r"distill.terms.attention.per_head: .* 2 heads .* 4; per-head KL needs equal"):
        _planned(student, teacher, [LossTerm(kind="attention", per_head=True)])
    other_grid = classifier(hf_vit(hidden=16, layers=2, heads=2, patch=4))  # 1 + 2x2 tokens
    with pytest.raises(UserError, match="attends over 17 tokens .* over 5: attention kl needs the same token count"):
        _planned(student, other_grid, [LossTerm(kind="attention", mode="kl")])
    with pytest.raises(UserError, match="holds no attention module"):
        _planned(classifier(zoo_cnn()), teacher, [LossTerm(kind="attention", mode="kl")])


def test_planned_transfer_and_features_equal_references():
    student, teacher = classifier(zoo_cnn(width=4, depth=1)).eval(), classifier(zoo_cnn(width=8, depth=2)).eval()
    terms = [LossTerm(kind="attention", name="at", num_pairs=2), LossTerm(kind="features", name="ft", num_pairs=2)]
    inner, x, _, parts = _planned(student, teacher, terms)
    assert [p.mode for p in inner.plans] == ["transfer", "features"]
    assert [(p.student, p.teacher) for p in inner.plans[0].pairs] == [("2", "3"), ("4", "7")]  # last of 2 equal segments

    def feats(m, upto):
        h = preprocess(x, m.image_size, m.mean, m.std)
        for i in range(upto + 1):
            h = m.net[i](h)
        return h
    with torch.no_grad():
        at = (_at_by_hand(feats(student, 2), feats(teacher, 3)) + _at_by_hand(feats(student, 4), feats(teacher, 7))) / 2
        proj = inner.module.projectors
        ft = (F.mse_loss(proj["ft__0"](feats(student, 2)), feats(teacher, 3))
              + F.mse_loss(proj["ft__1"](feats(student, 4)), feats(teacher, 7))) / 2
    torch.testing.assert_close(parts["at"], at)
    torch.testing.assert_close(parts["ft"], ft)
    assert math.isfinite(parts["ft"].item())


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_kl_trains_through_gradient_checkpointing():
    """The student's chosen attention modules stay eager for the run: a checkpointed layer's recomputation in the
    backward pass computes what its forward did (with the switch undone after the forward it would not)."""
    student = classifier(hf_vit(hidden=8, layers=2, heads=2))
    student.net.gradient_checkpointing_enable()
    teacher = classifier(hf_vit(hidden=16, layers=2, heads=2)).eval()
    inner = build_inner_terms([LossTerm(kind="attention", name="att", mode="kl")], student, FrozenTeacher(teacher),
                              channels=1, image_size=(8, 8), lr=1e-3, projector_lr=None)
    assert student.net.vit.layers[0].attention.config._attn_implementation == "eager"
    assert student.net.config._attn_implementation == "sdpa"  # what student/ records is unchanged
    x = torch.rand(4, 1, 8, 8)
    _, targets = inner.teacher_targets(x, None)
    inner.module.train()
    _, parts = inner.module(x, targets)
    parts["att"].backward()
    q = student.net.vit.layers[0].attention.q_proj.weight
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_explicit_kl_layers_may_repeat_a_student_layer():
    student = classifier(hf_vit(hidden=8, layers=2, heads=2)).eval()
    teacher = classifier(hf_vit(hidden=16, layers=4, heads=2)).eval()
    term = LossTerm(kind="attention", name="att", mode="kl", layers=[["net.vit.layers.1", "vit.layers.1"],
                                                                     ["vit.layers.1.attention", "vit.layers.3"]])
    inner, x, _, parts = _planned(student, teacher, [term])
    assert [(p.student, p.teacher) for p in inner.plans[0].pairs] == [
        ("vit.layers.1.attention", "vit.layers.1.attention"), ("vit.layers.1.attention", "vit.layers.3.attention")]
    for m in (student, teacher):
        m.net.set_attn_implementation("eager")
    with torch.no_grad():
        s = student.net(pixel_values=preprocess(x, student.image_size, student.mean, student.std),
                        output_attentions=True).attentions
        t = teacher.net(pixel_values=preprocess(x, teacher.image_size, teacher.mean, teacher.std),
                        output_attentions=True).attentions
    expected = (_kl_by_hand(s[1].mean(1), t[1].mean(1)) + _kl_by_hand(s[1].mean(1), t[3].mean(1))) / 2
    assert parts["att"].item() == pytest.approx(expected, rel=1e-4)
