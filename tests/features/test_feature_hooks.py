"""kdkit.models.hooks: features by module path, hooks that leave nothing behind, eager attention only while needed,
and the blocks `layers: auto` chooses from."""

from pathlib import Path

import pytest
import torch

from kdkit.data import preprocess
from kdkit.errors import UserError
from kdkit.models.hooks import (FeatureCapture, attention_weights, auto_blocks, eager_attention, find_attention,
                                first_tensor, resolve_module, trace_shapes)

from tiny_nets import classifier, hf_vit, zoo_cnn

NETS = f"{Path(__file__).parent / 'tiny_nets.py'}"


def _no_hooks(model):
    return all(not m._forward_hooks for m in model.modules())


def test_capture_equals_a_manual_forward_and_leaves_no_hooks():
    model = classifier(zoo_cnn(width=4, depth=2)).eval()
    x = torch.rand(3, 1, 8, 8)
    cap = FeatureCapture(model, ["net.1", "4"])  # with and without the leading net.
    with cap:
        logits = model(x)
        feats = cap.take()
    assert cap.outputs == {} and _no_hooks(model)
    # by hand: the Sequential's layers one by one on the preprocessed input
    h = preprocess(x, model.image_size, model.mean, model.std)
    manual = {}
    for i, layer in enumerate(model.net):
        h = layer(h)
        manual[i] = h.clone()
    torch.testing.assert_close(feats["net.1"], manual[1])
    torch.testing.assert_close(feats["4"], manual[4])
    torch.testing.assert_close(logits, h)
    # the capture is reusable and each take forgets what it returned
    with cap:
        model(x)
        assert set(cap.take()) == {"net.1", "4"} and cap.take() == {}
    assert _no_hooks(model)


def test_hooks_are_removed_after_an_error():
    model = classifier(zoo_cnn())
    with pytest.raises(RuntimeError):
        with FeatureCapture(model, ["net.0"]) as cap:
            model(torch.rand(2, 1, 8, 8))
            raise RuntimeError("boom")
    assert _no_hooks(model) and cap.outputs == {}


def test_teacher_features_from_inference_mode_are_usable_targets():
    """Captured under inference mode (the frozen teacher), then a student loss's backward works."""
    teacher = classifier(zoo_cnn(width=4)).eval()
    with FeatureCapture(teacher, ["net.2"]) as cap:
        with torch.inference_mode():
            teacher(torch.rand(2, 1, 8, 8))
        target = cap.take()["net.2"]
    assert not target.is_inference() and not target.requires_grad
    student_feat = torch.zeros_like(target, requires_grad=True)
    torch.nn.functional.mse_loss(student_feat, target).backward()
    assert student_feat.grad is not None and torch.isfinite(student_feat.grad).all()


def test_an_output_changed_in_place_later_is_copied_or_refused():
    """BatchNorm followed by ReLU(inplace=True): the trace says so; a copy keeps the BatchNorm's output, an
    uncopied capture is refused rather than silently holding the ReLU's output."""
    model = classifier(zoo_cnn()).eval()
    bn = "0.1"
    x = torch.rand(2, 1, 8, 8)
    shapes = trace_shapes(model, x)
    assert shapes[bn]["inplace"] and not shapes["0"]["inplace"] and not shapes["0.0"]["inplace"]
    with FeatureCapture(model, [bn], clone={bn}) as cap:
        model(x)
        got = cap.take()[bn]
    assert (got < 0).any()  # before the ReLU, not after it
    with FeatureCapture(model, [bn], clone=False, where="distill.terms.f.layers") as cap:
        model(x)
        with pytest.raises(UserError, match=r"distill.terms.f.layers: the student's net.0.1 output was changed in place"):
            cap.take()
    seen = []
    h = model.net[1].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with FeatureCapture(model, ["0"], clone=False) as cap:  # the block's output: the model's own tensor, no copy
        model(x)
        assert cap.take()["0"] is seen[0]
    h.remove()


def test_a_missing_path_names_the_config_path_and_suggests_close_names():
    model = classifier(zoo_cnn())
    with pytest.raises(UserError) as err:
        resolve_module(model, "net.0.11", "distill.terms.feat.layers")
    msg = str(err.value)
    assert msg.startswith("distill.terms.feat.layers: the student has no module 'net.0.11'")
    assert "did you mean" in msg and "net.0.1" in msg
    with pytest.raises(UserError, match="distill.terms.x.layers: the teacher has no module"):
        FeatureCapture(model, ["nope.nope"], where="distill.terms.x.layers", role="teacher")


def test_vit_layers_and_attention_captured_as_hugging_face_returns_them():
    model = classifier(hf_vit(hidden=8, layers=2, heads=2)).eval()
    net = model.net
    attn = find_attention(model, "vit.layers.1")
    assert attn == "vit.layers.1.attention"
    x = torch.rand(2, 1, 8, 8)
    with FeatureCapture(model, {"vit.layers.0": first_tensor, attn: attention_weights}, eager=[attn]) as cap:
        model(x)
        feats = cap.take()
    assert net.config._attn_implementation == "sdpa" and net.vit.layers[1].attention.config is net.config
    assert _no_hooks(model)
    # the reference: the whole model in eager mode, asked for hidden states and attentions
    net.set_attn_implementation("eager")
    out = net(pixel_values=preprocess(x, model.image_size, model.mean, model.std), output_hidden_states=True,
              output_attentions=True)
    torch.testing.assert_close(feats["vit.layers.0"], out.hidden_states[1])
    torch.testing.assert_close(feats[attn], out.attentions[1])
    assert feats[attn].shape == (2, 2, 17, 17)


def test_eager_attention_only_inside_the_block():
    model = classifier(hf_vit()).eval()
    layer = model.net.vit.layers[0].attention
    seen = []
    h = layer.register_forward_hook(lambda m, i, o: seen.append(attention_weights(o)))
    x = torch.rand(1, 1, 8, 8)
    with eager_attention([layer]):
        model(x)
    model(x)
    h.remove()
    assert seen[0] is not None and seen[1] is None  # sdpa returns no probabilities
    assert layer.config is model.net.config and model.net.config._attn_implementation == "sdpa"


def test_trace_draws_no_random_numbers_and_keeps_the_mode():
    model = classifier(zoo_cnn()).train()
    state = torch.get_rng_state()
    shapes = trace_shapes(model, torch.zeros(2, 1, 8, 8))
    assert torch.equal(state, torch.get_rng_state()) and model.training and _no_hooks(model)
    assert shapes["0"]["shape"] == (4, 8, 8) and shapes["4"]["shape"] == (16, 2, 2)


@pytest.mark.parametrize("spec, expected", [
    (zoo_cnn(width=4, depth=1), ["0", "2", "4"]),  # conv blocks; pooling layers have no parameters
    (zoo_cnn(width=4, depth=2), ["0", "1", "3", "4", "6", "7"]),
    (hf_vit(layers=3), ["vit.layers.0", "vit.layers.1", "vit.layers.2"]),
    ({"factory": f"{NETS}:tiny_resnet"}, ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1"]),
    ({"hf_config": {"model_type": "resnet", "embedding_size": 4, "hidden_sizes": [4, 8], "depths": [1, 1],
                    "layer_type": "basic"}}, ["resnet.encoder.stages.0", "resnet.encoder.stages.1"]),
    ({"factory": f"{Path(__file__).parents[1] / 'tiny_models.py'}:tiny_mlp", "kwargs": {"size": 8}}, []),
])
def test_auto_blocks(spec, expected):
    size = 16 if spec.get("hf_config", {}).get("model_type") == "resnet" else 8  # HF ResNet's stem divides by 4
    model = classifier(spec, size=size)
    assert auto_blocks(model, trace_shapes(model, torch.zeros(2, 1, size, size))) == expected
