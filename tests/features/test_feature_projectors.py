"""kdkit.losses.projectors: one projector per pair of layers, whatever their layouts."""

import pytest
import torch
from torch import nn

from kdkit.losses.features import feature_distance
from kdkit.losses.projectors import FeatureProjector


def _check(proj, s_shape, t_shape, out_shape):
    s = torch.randn(3, *s_shape, requires_grad=True)
    t = torch.randn(3, *t_shape)
    out, target = proj(s), proj.target(t)
    assert tuple(out.shape) == (3, *out_shape) and out.shape == target.shape
    loss = feature_distance(out, target, "cosine", proj.channel_dim)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    return s, t, out, target


def test_tokens_to_tokens_with_different_widths():
    proj = FeatureProjector((17, 8), (17, 16))
    assert isinstance(proj.proj, nn.Linear) and (proj.proj.in_features, proj.proj.out_features) == (8, 16)
    s, t, out, target = _check(proj, (17, 8), (17, 16), (17, 16))
    torch.testing.assert_close(out, proj.proj(s))
    assert target is t and proj.describe() == "linear 8->16"


def test_maps_with_different_channels_and_sizes():
    shrink = FeatureProjector((8, 16, 16), (32, 4, 4))
    assert isinstance(shrink.proj, nn.Conv2d) and shrink.proj.kernel_size == (1, 1)
    s, _, out, _ = _check(shrink, (8, 16, 16), (32, 4, 4), (32, 4, 4))
    torch.testing.assert_close(out, shrink.proj(nn.functional.adaptive_avg_pool2d(s, 4)))
    assert shrink.describe() == "conv1x1 8->32, pooled 16x16 -> 4x4"
    grow = FeatureProjector((8, 4, 4), (32, 8, 8))
    s, _, out, _ = _check(grow, (8, 4, 4), (32, 8, 8), (32, 8, 8))
    up = nn.functional.interpolate(s, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, grow.proj(up))
    assert "bilinear 4x4 -> 8x8" in grow.describe()


@pytest.mark.parametrize("shape", [(16, 4, 4), (17, 8), (8,)])
def test_identity_when_shapes_already_match(shape):
    proj = FeatureProjector(shape, shape)
    assert isinstance(proj.proj, nn.Identity) and not list(proj.parameters())
    s = torch.randn(2, *shape)
    assert torch.equal(proj(s), s) and proj.describe() == "identity"


def test_cls_token_only():
    proj = FeatureProjector((17, 8), (65, 16), tokens="cls")
    s, t, out, target = _check(proj, (17, 8), (65, 16), (16,))
    torch.testing.assert_close(out, proj.proj(s[:, 0]))
    assert torch.equal(target, t[:, 0])
    with pytest.raises(ValueError, match="tokens: cls"):
        FeatureProjector((8, 4, 4), (17, 16), tokens="cls")


def test_all_tokens_with_different_grids():
    """CLS + 4x4 patches -> CLS + 8x8 patches: the CLS tokens matched, the student's grid resized to 8x8."""
    proj = FeatureProjector((17, 8), (65, 16))
    s, t, out, target = _check(proj, (17, 8), (65, 16), (65, 16))
    grid = s[:, 1:].transpose(1, 2).reshape(3, 8, 4, 4)
    up = nn.functional.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=False)
    expect = proj.proj(torch.cat([s[:, :1], up.flatten(2).transpose(1, 2)], 1))
    torch.testing.assert_close(out, expect)
    assert target is t
    # prefix counts differ (no CLS -> CLS): the prefix tokens are left out on both sides
    proj = FeatureProjector((16, 8), (65, 16))
    _, t, _, target = _check(proj, (16, 8), (65, 16), (64, 16))
    assert torch.equal(target, t[:, 1:]) and "prefix tokens left out" in proj.describe()


def test_vit_student_to_cnn_teacher_and_back():
    to_cnn = FeatureProjector((17, 8), (32, 8, 8))  # ViT tokens (CLS + 4x4) -> CNN map
    s, _, out, _ = _check(to_cnn, (17, 8), (32, 8, 8), (32, 8, 8))
    grid = s[:, 1:].transpose(1, 2).reshape(3, 8, 4, 4)
    torch.testing.assert_close(out, to_cnn.proj(nn.functional.interpolate(grid, size=(8, 8), mode="bilinear")))
    assert "student tokens as a 4x4 map (1 prefix dropped)" in to_cnn.describe()
    to_vit = FeatureProjector((16, 8, 8), (17, 32))  # CNN map -> ViT tokens
    _, t, _, target = _check(to_vit, (16, 8, 8), (17, 32), (32, 4, 4))
    assert torch.equal(target, t[:, 1:].transpose(1, 2).reshape(3, 32, 4, 4))


def test_layouts_that_cannot_be_matched_are_refused():
    with pytest.raises(ValueError, match="cannot be matched"):
        FeatureProjector((8,), (16, 4, 4))
    with pytest.raises(ValueError, match="only with tokens: cls"):
        FeatureProjector((8,), (17, 16))
    with pytest.raises(ValueError, match="maps, .* tokens or .* vectors"):
        FeatureProjector((2, 3, 4, 5), (8,))
