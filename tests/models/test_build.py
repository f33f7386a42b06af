import pytest
import torch
from transformers import AutoConfig, AutoModelForImageClassification

from kdkit.config.schema import ModelConfig
from kdkit.errors import UserError
from kdkit.evaluate import count_params as count_parameters
from kdkit.models import FrozenTeacher, build_model, load_exported, save_model

from conftest import TINY

TINY_VIT = dict(model_type="vit", hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                image_size=16, patch_size=4)


def _build(spec: dict, role="student", classes=10, channels=1, size=(8, 8)):
    return build_model(ModelConfig(**spec), num_classes=classes, channels=channels, data_size=size, role=role)


def test_hf_config_with_overrides_resizes_the_batch():
    model = _build({"hf_config": TINY_VIT})
    assert model.is_hf and model.image_size == (16, 16)
    assert model.net.config.num_hidden_layers == 2 and model.net.config.num_channels == 1
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)  # data at 8x8, the ViT sees 16x16


def test_hf_from_local_save_pretrained_directory(tmp_path):
    cfg = AutoConfig.for_model(**{**TINY_VIT, "num_channels": 3, "num_labels": 10})
    AutoModelForImageClassification.from_config(cfg).save_pretrained(tmp_path / "vit")
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil
    ViTImageProcessorPil(size={"height": 16, "width": 16}, image_mean=[0.1, 0.2, 0.3], image_std=[0.5, 0.5, 0.5]).save_pretrained(tmp_path / "vit")
    model = _build({"pretrained": str(tmp_path / "vit")}, role="teacher")
    assert model.mean == [0.1, 0.2, 0.3] and model.image_size == (16, 16)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)  # grey data repeated to the RGB the model expects
    with pytest.raises(UserError, match="teacher predicts 10 classes"):
        _build({"pretrained": str(tmp_path / "vit")}, role="teacher", classes=5)
    student = _build({"pretrained": str(tmp_path / "vit")}, classes=5)  # a student gets a fresh head
    assert student(torch.rand(2, 1, 8, 8)).shape == (2, 5)


def test_hf_config_from_base_directory(tmp_path):
    AutoModelForImageClassification.from_config(AutoConfig.for_model(**{**TINY_VIT, "num_channels": 1, "num_labels": 10})).save_pretrained(tmp_path / "base")
    model = _build({"hf_config": {"base": str(tmp_path / "base"), "num_hidden_layers": 1}})
    assert model.net.config.num_hidden_layers == 1 and model.net.config.hidden_size == 16


def test_factory_by_module_and_by_file():
    a = _build({"factory": "kdkit.models.zoo:fmnist_cnn", "kwargs": {"width": 4, "depth": 1}}, size=(28, 28))
    assert a(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    b = _build({"factory": f"{TINY}:tiny_mlp", "kwargs": {"hidden": 5}})
    assert count_parameters(b) == (64 * 5 + 5) + (5 * 10 + 10)


@pytest.mark.parametrize("factory,needle", [
    ("no_such_module_xyz:f", "cannot import"),
    (f"{TINY}:missing", "no callable"),
    (f"{TINY}:not_a_module", "not an nn.Module"),
    ("/nope/file.py:f", "file not found"),
    ("nocolon", "expected"),
])
def test_factory_errors_name_the_field(factory, needle):
    with pytest.raises(UserError, match=needle) as err:
        _build({"factory": factory}, role="teacher")
    assert str(err.value).startswith("teacher.factory")


@pytest.mark.parametrize("spec", [{"factory": f"{TINY}:tiny_mlp", "kwargs": {"hidden": 6}}, {"hf_config": TINY_VIT}])
def test_run_directory_round_trip(tmp_path, spec):
    model = _build(spec).eval()
    save_model(model, tmp_path / "run" / "student", class_names=[str(i) for i in range(10)])
    again = _build({"run": str(tmp_path / "run")}, role="teacher").eval()
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(model(x), again(x))
    assert load_exported(tmp_path / "run" / "student", "x").image_size == model.image_size
    with pytest.raises(UserError, match="predicts 10 classes"):
        _build({"run": str(tmp_path / "run")}, classes=3)
    with pytest.raises(UserError, match="not a kdkit run"):
        _build({"run": str(tmp_path)})


def test_exported_hf_student_loads_without_kdkit(tmp_path):
    from transformers import AutoImageProcessor
    model = _build({"hf_config": TINY_VIT}).eval()
    save_model(model, tmp_path / "s", class_names=[f"c{i}" for i in range(10)])
    plain = AutoModelForImageClassification.from_pretrained(tmp_path / "s").eval()
    proc = AutoImageProcessor.from_pretrained(tmp_path / "s")
    assert plain.config.id2label[3] == "c3" and list(proc.image_mean) == [0.5]
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(plain(pixel_values=(x - 0.5) / 0.5).logits, model(x))


def test_frozen_teacher_gives_no_gradients_yet_usable_targets():
    teacher = FrozenTeacher(_build({"factory": f"{TINY}:tiny_mlp"}, role="teacher"))
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())
    student = _build({"factory": f"{TINY}:tiny_mlp"})
    x = torch.rand(4, 1, 8, 8)
    target = teacher(x)
    loss = torch.nn.functional.kl_div(student(x).log_softmax(-1), target.softmax(-1), reduction="batchmean")
    loss.backward()  # teacher outputs work as targets though computed under inference mode
    assert all(p.grad is None for p in teacher.model.parameters())


def test_wrong_class_count_is_caught_before_training():
    with pytest.raises(UserError, match="student: the model outputs shape \\(1, 3\\)"):
        _build({"factory": f"{TINY}:tiny_mlp", "kwargs": {"num_classes": 3}})
    with pytest.raises(UserError, match="teacher.factory: fmnist_cnn"):
        _build({"factory": "kdkit.models.zoo:fmnist_cnn", "kwargs": {"width": 0}}, role="teacher", size=(28, 28))
    with pytest.raises(UserError, match="forward pass"):  # a 28x28 model on 8x8 data
        _build({"factory": f"{TINY}:tiny_mlp", "kwargs": {"size": 28}})


def test_broken_export_is_a_user_error(tmp_path):
    model = _build({"factory": f"{TINY}:tiny_mlp"})
    save_model(model, tmp_path / "s")
    (tmp_path / "s" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="does not load"):
        load_exported(tmp_path / "s", "teacher.run")
    (tmp_path / "s" / "kdkit.json").write_text("{not json")
    with pytest.raises(UserError, match="malformed"):
        load_exported(tmp_path / "s", "teacher.run")
