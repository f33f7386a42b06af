"""Students derived from the teacher (`student.derive_from: teacher`, kdkit.models.derive): every k-th layer copied,
narrower widths by evenly spaced rows and columns of the teacher's weights, both parameter counts printed, clear
errors, and `kdkit train` end to end for a ViT (classification) and a Qwen2 decoder (lm)."""

import json
import re
import shutil

import pytest
import torch
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageClassification,
                          AutoModelForSequenceClassification)

from kdkit.cli.main import main
from kdkit.config.schema import ModelConfig
from kdkit.evaluate import count_params
from kdkit.models import FrozenTeacher, build_model
from kdkit.models.derive import DECODERS, ENCODERS, VISION, derive_model, even_indices, layer_mapping

from conftest import TINY, write_yaml
from tiny_lm import save_tiny_lm, tiny_tokenizer

VIT = dict(model_type="vit", hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
           image_size=8, patch_size=4, num_channels=1, num_labels=10)
LAYER = re.compile(r"(^|\.)(layers|layer)\.(\d+)\.")


def _human(n):
    return f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def _params(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def _in_layer(name, i):
    m = LAYER.search(name)
    return m is not None and int(m.group(3)) == i


def _teacher_name(name, mapping):
    return LAYER.sub(lambda m: f"{m.group(1)}{m.group(2)}.{mapping[int(m.group(3))]}.", name, count=1)


def assert_copied(student, teacher, mapping):
    """Every student parameter equals the teacher's (layer i from teacher layer mapping[i])."""
    s, t = _params(student), dict(teacher.state_dict())
    assert s
    for name, value in s.items():
        assert torch.equal(value, t[_teacher_name(name, mapping)]), name


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    path = tmp_path_factory.mktemp("vit") / "teacher"
    torch.manual_seed(0)
    AutoModelForImageClassification.from_config(AutoConfig.for_model(**VIT)).save_pretrained(path)
    ViTImageProcessorPil(size={"height": 8, "width": 8}, image_mean=[0.3], image_std=[0.2]).save_pretrained(path)
    return path


def _vit(vit_dir):
    return AutoModelForImageClassification.from_pretrained(vit_dir)


# --------------------------------------------------------------------------------------------------- the mapping

def test_layer_mapping_is_every_kth_layer_from_the_first_and_indices_are_evenly_spaced():
    assert layer_mapping(12, 6) == [0, 2, 4, 6, 8, 10]  # DistilBERT's choice
    assert layer_mapping(12, 4) == [0, 3, 6, 9]
    assert layer_mapping(4, 4) == [0, 1, 2, 3]
    assert even_indices(8, 4).tolist() == [0, 2, 4, 6]
    assert even_indices(768, 384).tolist() == list(range(0, 768, 2))
    assert even_indices(12, 8).tolist() == [0, 1, 3, 4, 6, 7, 9, 10]


# --------------------------------------------------------------------------------------------------- ViT

def test_same_width_vit_student_copies_layers_embeddings_and_head_exactly(vit_dir, capsys):
    spec = ModelConfig(pretrained=str(vit_dir))
    teacher = build_model(spec, num_classes=10, channels=1, data_size=(8, 8), role="teacher")
    student = build_model(ModelConfig(derive_from="teacher", num_layers=2), num_classes=10, channels=1,
                          data_size=(8, 8), role="student", teacher=spec, loaded_teacher=FrozenTeacher(teacher))
    s, t = student.net, teacher.net
    assert s.config.num_hidden_layers == 2 and s.config.hidden_size == 32 and type(s) is type(t)
    assert_copied(s, t, [0, 2])
    for name in ("vit.embeddings.cls_token", "vit.embeddings.position_embeddings", "vit.layernorm.weight",
                 "vit.embeddings.patch_embeddings.projection.weight", "classifier.weight", "classifier.bias"):
        assert torch.equal(s.get_parameter(name), t.get_parameter(name)), name
    layer_2 = {k.split("layers.2.")[1]: v for k, v in _params(t).items() if _in_layer(k, 2)}
    layer_1 = {k.split("layers.1.")[1]: v for k, v in _params(s).items() if _in_layer(k, 1)}
    assert layer_1.keys() == layer_2.keys() and all(torch.equal(layer_1[k], layer_2[k]) for k in layer_1)
    assert (student.mean, student.std, student.image_size) == ([0.3], [0.2], (8, 8))  # the teacher's pixels
    out = capsys.readouterr().out
    n_t, n_s = count_params(t), count_params(s)
    assert n_s < n_t
    assert (f"student: derived from the teacher (vit, 4 -> 2 layers, width 32): {_human(n_t)} -> {_human(n_s)} "
            "parameters; layers 0,2 copied") in out
    assert "weight selection" not in out
    assert student(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_narrower_vit_keeps_evenly_spaced_rows_and_columns_of_the_teachers_weights(vit_dir, capsys):
    t = _vit(vit_dir)
    s = derive_model(t, num_layers=2, hidden_size=16, overrides={"num_attention_heads": 2, "intermediate_size": 32})
    c = s.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (2, 16, 2, 32)
    h = torch.arange(16) * 2  # hidden 32 -> 16: 0, 2, ..., 30
    i = torch.arange(32) * 2  # intermediate 64 -> 32
    heads = torch.cat([torch.arange(8), torch.arange(16, 24)])  # heads 0 and 2 of 4, all 8 dims of each
    S, T = _params(s), _params(t)
    for si, ti in ((0, 0), (1, 2)):
        a, b = f"vit.layers.{si}.", f"vit.layers.{ti}."
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert S[a + f"attention.{proj}.weight"].shape == (16, 16)
            assert torch.equal(S[a + f"attention.{proj}.weight"], T[b + f"attention.{proj}.weight"][heads][:, h])
            assert torch.equal(S[a + f"attention.{proj}.bias"], T[b + f"attention.{proj}.bias"][heads])
        assert torch.equal(S[a + "attention.o_proj.weight"], T[b + "attention.o_proj.weight"][h][:, heads])
        assert torch.equal(S[a + "mlp.fc1.weight"], T[b + "mlp.fc1.weight"][i][:, h])
        assert torch.equal(S[a + "mlp.fc2.weight"], T[b + "mlp.fc2.weight"][h][:, i])
        assert torch.equal(S[a + "layernorm_before.weight"], T[b + "layernorm_before.weight"][h])
    assert torch.equal(S["vit.embeddings.patch_embeddings.projection.weight"],
                       T["vit.embeddings.patch_embeddings.projection.weight"][h])
    assert torch.equal(S["vit.embeddings.cls_token"], T["vit.embeddings.cls_token"][..., h])
    assert torch.equal(S["vit.embeddings.position_embeddings"], T["vit.embeddings.position_embeddings"][..., h])
    assert torch.equal(S["classifier.weight"], T["classifier.weight"][:, h])
    assert torch.equal(S["classifier.bias"], T["classifier.bias"])
    out = capsys.readouterr().out
    assert "student: derived from the teacher (vit, 4 -> 2 layers, width 32 -> 16)" in out
    assert "weight selection (Xu et al. 2023)" in out and "intermediate 64 -> 32" in out and "heads 4 -> 2" in out
    assert s(pixel_values=torch.rand(2, 1, 8, 8)).logits.shape == (2, 10)


def test_random_init_differs_from_the_teacher(vit_dir, capsys):
    t = _vit(vit_dir)
    torch.manual_seed(1)
    s = derive_model(t, num_layers=2, init="random")
    S, T = _params(s), _params(t)
    assert S.keys() == T.keys() - {k for k in T if _in_layer(k, 2) or _in_layer(k, 3)}
    assert not torch.equal(S["vit.layers.0.attention.q_proj.weight"], T["vit.layers.0.attention.q_proj.weight"])
    assert not torch.equal(S["vit.embeddings.position_embeddings"], T["vit.embeddings.position_embeddings"])
    assert not torch.equal(S["classifier.weight"], T["classifier.weight"])
    out = capsys.readouterr().out
    assert f"{_human(count_params(t))} -> {_human(count_params(s))} parameters; random initialisation" in out


# --------------------------------------------------------------------------------------------------- BERT

def test_bert_encoder_with_its_classification_head_is_derived_at_the_module_level(capsys):
    torch.manual_seed(0)
    t = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(
        "bert", hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, vocab_size=60,
        num_labels=3))
    same = derive_model(t, num_layers=2)
    assert type(same) is type(t) and same.config.num_hidden_layers == 2
    assert_copied(same, t, [0, 2])  # embeddings, pooler, classifier and layers 0, 2
    narrow = derive_model(t, num_layers=2, hidden_size=16)  # 4 heads of 8 -> 4 heads of 4 dims
    h = torch.arange(16) * 2
    S, T = _params(narrow), _params(t)
    a, b = "bert.encoder.layer.1.", "bert.encoder.layer.2."
    assert torch.equal(S[a + "attention.self.query.weight"], T[b + "attention.self.query.weight"][h][:, h])
    assert torch.equal(S[a + "attention.output.dense.weight"], T[b + "attention.output.dense.weight"][h][:, h])
    assert torch.equal(S[a + "intermediate.dense.weight"], T[b + "intermediate.dense.weight"][:, h])
    assert torch.equal(S[a + "output.dense.weight"], T[b + "output.dense.weight"][h])
    assert torch.equal(S["bert.embeddings.word_embeddings.weight"], T["bert.embeddings.word_embeddings.weight"][:, h])
    assert torch.equal(S["bert.pooler.dense.weight"], T["bert.pooler.dense.weight"][h][:, h])
    assert torch.equal(S["classifier.weight"], T["classifier.weight"][:, h])
    assert narrow(input_ids=torch.tensor([[1, 5, 7, 2]])).logits.shape == (1, 3)
    out = capsys.readouterr().out
    assert "(bert, 4 -> 2 layers, width 32)" in out and "(bert, 4 -> 2 layers, width 32 -> 16)" in out
    assert "head dim 8 -> 4" in out


# --------------------------------------------------------------------------------------------------- decoders

def _decoder(model_type, **extra):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_decoder_layers_heads_and_kv_heads_are_selected(model_type, capsys):
    t = _decoder(model_type)
    assert_copied(derive_model(t, num_layers=2), t, [0, 2])
    s = derive_model(t, num_layers=2, hidden_size=16, overrides={"num_attention_heads": 2})
    c = s.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (2, 16, 2, 1)
    if getattr(c, "layer_types", None) is not None:
        assert len(c.layer_types) == 2
    h = torch.arange(16) * 2
    q = torch.cat([torch.arange(8), torch.arange(16, 24)])  # query heads 0, 2 of 4 (8 dims each)
    kv = torch.arange(8)  # key/value head 0 of 2
    S, T = _params(s), _params(t)
    a, b = "model.layers.1.", "model.layers.2."
    assert torch.equal(S[a + "self_attn.q_proj.weight"], T[b + "self_attn.q_proj.weight"][q][:, h])
    assert torch.equal(S[a + "self_attn.k_proj.weight"], T[b + "self_attn.k_proj.weight"][kv][:, h])
    assert torch.equal(S[a + "self_attn.v_proj.weight"], T[b + "self_attn.v_proj.weight"][kv][:, h])
    assert torch.equal(S[a + "self_attn.o_proj.weight"], T[b + "self_attn.o_proj.weight"][h][:, q])
    assert torch.equal(S[a + "mlp.gate_proj.weight"], T[b + "mlp.gate_proj.weight"][:, h])
    assert torch.equal(S[a + "mlp.down_proj.weight"], T[b + "mlp.down_proj.weight"][h])
    assert torch.equal(S[a + "input_layernorm.weight"], T[b + "input_layernorm.weight"][h])
    assert torch.equal(S["model.embed_tokens.weight"], T["model.embed_tokens.weight"][:, h])
    assert torch.equal(S["model.norm.weight"], T["model.norm.weight"][h])
    assert torch.equal(S["lm_head.weight"], T["lm_head.weight"][:, h])
    assert s(input_ids=torch.tensor([[1, 5, 9]])).logits.shape == (1, 3, 60)
    assert f"({model_type}, 4 -> 2 layers, width 32 -> 16)" in capsys.readouterr().out


def _family(model_type):
    common = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, vocab_size=60)
    if model_type in VISION:
        import transformers

        cfg = AutoConfig.for_model(**{**VIT, "model_type": model_type})
        cls = getattr(transformers, f"{type(cfg).__name__.removesuffix('Config')}ForImageClassification")
        return cls(cfg), {"pixel_values": torch.rand(1, 1, 8, 8)}
    if model_type == "distilbert":
        cfg = AutoConfig.for_model(model_type, dim=32, n_layers=4, n_heads=4, hidden_dim=64, **common)
    elif model_type in ENCODERS:
        cfg = AutoConfig.for_model(model_type, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                   intermediate_size=64, **common)
    else:
        extra = {"head_dim": 8} if model_type in ("gemma", "qwen3") else {}
        return _decoder(model_type, **extra), {"input_ids": torch.tensor([[1, 5, 9]])}
    return AutoModel.from_config(cfg), {"input_ids": torch.tensor([[1, 5, 9]])}


@pytest.mark.parametrize("model_type", VISION + ENCODERS + DECODERS)
def test_every_supported_family_derives_copies_and_runs(model_type):
    torch.manual_seed(0)
    t, inputs = _family(model_type)
    assert_copied(derive_model(t, num_layers=2, verbose=False), t, [0, 2])
    s = derive_model(t, num_layers=1, hidden_size=16, overrides={"num_attention_heads": 2}, verbose=False)
    assert s._kdkit_derivation["random"] == []  # the teacher fills every tensor
    assert len(s._kdkit_derivation["selected"]) > 0
    s.eval()(**inputs)


def test_unsupported_family_and_growth_are_user_errors():
    from kdkit.errors import UserError

    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_embd=16, n_layer=2, n_head=2, vocab_size=60,
                                                                 bos_token_id=1, eos_token_id=2))
    with pytest.raises(UserError, match=r"student\.derive_from: the teacher is a 'gpt2' model"):
        derive_model(gpt2, num_layers=1)
    t = _decoder("qwen2")
    with pytest.raises(UserError, match=r"student\.num_layers: 5 is more than the teacher's 4 layers"):
        derive_model(t, num_layers=5)
    with pytest.raises(UserError, match=r"student\.hidden_size: the student's hidden \(64\) is larger"):
        derive_model(t, hidden_size=64)
    with pytest.raises(UserError, match=r"student\.overrides\.num_attention_head: .*did you mean"):
        derive_model(t, overrides={"num_attention_head": 2})
    with pytest.raises(UserError, match=r"student\.hidden_size: 18 is not divisible by the 4 attention heads"):
        derive_model(t, hidden_size=18)
    assert derive_model(t, hidden_size=64, init="random", verbose=False).config.hidden_size == 64


# --------------------------------------------------------------------------------------------------- kdkit train

def _image_config(out, teacher, **student):
    return {
        "output_dir": str(out), "seed": 0,
        "data": {"source": "digits", "val_fraction": 0.1, "limit_eval": 64, "limit_train": 256},
        "student": {"derive_from": "teacher", **student},
        "teacher": teacher,
        "distill": {"temperature": 2.0, "terms": [{"kind": "ce", "weight": 0.5}, {"kind": "kd", "weight": 0.5}]},
        "train": {"max_steps": 4, "batch_size": 32, "lr": 0.003, "eval_every": 2, "save_every": 2, "log_every": 1,
                  "progress": False, "tracker": "none", "export": "last", "keep_last": 5},
        "eval": {"batch_size": 64, "latency_repeats": 2, "warmup": 1},
    }


@pytest.mark.parametrize("teacher,student,needle", [
    ({"factory": f"{TINY}:tiny_mlp"}, {"num_layers": 1}, "student.derive_from: the teacher is a custom module"),
    ("vit", {"num_layers": 6}, "student.num_layers: 6 is more than the teacher's 4 layers"),
    ({"hf_config": {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8], "depths": [1]}}, {},
     "student.derive_from: the teacher is a 'resnet' model"),
    ("vit", {"overrides": {"intermediate_size": 128}}, "student.overrides.intermediate_size: the student's"),
])
def test_bad_derivations_exit_2_naming_the_config_path(vit_dir, tmp_path, capsys, teacher, student, needle):
    teacher = {"pretrained": str(vit_dir)} if teacher == "vit" else teacher
    config = write_yaml(tmp_path / "c.yaml", _image_config(tmp_path / "run", teacher, **student))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_classification_train_with_a_derived_vit_student_exports_reloads_and_resumes(vit_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    from kdkit.config import validate
    from kdkit.experiment import train_run
    from kdkit.models import load_exported

    cfg = _image_config(tmp_path / "run", {"pretrained": str(vit_dir)}, num_layers=2, hidden_size=16,
                        overrides={"num_attention_heads": 2, "intermediate_size": 32})
    cfg["compare_baseline"] = True
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", cfg)), "--no-report"]) == 0
    out = capsys.readouterr().out
    line = "student: derived from the teacher (vit, 4 -> 2 layers, width 32 -> 16)"
    assert out.count(line) == 2  # the baseline student is derived the same way
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"teacher", "student", "baseline"} <= metrics.keys() and metrics["compression"] > 2
    for sub in (run / "student", run / "baseline" / "student"):
        plain = AutoModelForImageClassification.from_pretrained(sub)  # plain transformers
        assert (plain.config.num_hidden_layers, plain.config.hidden_size) == (2, 16)
        assert plain(pixel_values=torch.rand(2, 1, 8, 8)).logits.shape == (2, 10)
        model = load_exported(sub, "student")
        assert model.mean == [0.3] and model(torch.rand(2, 1, 8, 8)).shape == (2, 10)

    victim = tmp_path / "victim"  # cut after step 2, resumed: the derived student picks up its checkpoint
    shutil.copytree(run, victim)
    shutil.rmtree(victim / "student")
    for d in (victim / "checkpoints").glob("step-*"):
        if int(d.name.split("-")[1]) > 2:
            shutil.rmtree(d)
    train_run(validate({**cfg, "output_dir": str(victim)}), resume=True)
    a = load_file(str(run / "student" / "model.safetensors"))
    b = load_file(str(victim / "student" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def lm_teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("derive_lm")
    tiny_tokenizer(tmp / "tok")
    save_tiny_lm(tmp / "teacher", tmp / "tok", hidden=32, layers=4)  # 2 heads of 16, 1 key/value head
    lines = [json.dumps({"instruction": f"What is {i} plus 1?", "context": "", "response": str(i + 1)})
             for i in range(80)]
    (tmp / "data.jsonl").write_text("\n".join(lines) + "\n")
    return tmp


def _lm_config(tmp, out, **student):
    return {
        "task": "lm", "output_dir": str(out), "seed": 0,
        "data": {"source": "jsonl", "path": str(tmp / "data.jsonl"), "val_fraction": 0.1, "test_fraction": 0.1,
                 "text": {"max_length": 32}},
        "student": {"derive_from": "teacher", **student},
        "teacher": {"pretrained": str(tmp / "teacher")},
        "distill": {"temperature": 2.0, "terms": [{"kind": "ce", "weight": 0.1}, {"kind": "kd", "weight": 0.9}]},
        "train": {"max_steps": 3, "batch_size": 8, "lr": 0.003, "eval_every": 3, "save_every": None,
                  "log_every": 1, "progress": False, "tracker": "none"},
        "eval": {"batch_size": 8, "generate_samples": 2, "max_new_tokens": 3},
    }


def test_lm_train_with_a_derived_decoder_student_exports_a_plain_hf_model(lm_teacher, tmp_path, capsys):
    from transformers import AutoTokenizer

    cfg = _lm_config(lm_teacher, tmp_path / "run", num_layers=2, hidden_size=16)
    cfg["compare_baseline"] = True
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", cfg)), "--no-report"]) == 0
    out = capsys.readouterr().out
    assert out.count("student: derived from the teacher (qwen2, 4 -> 2 layers, width 32 -> 16)") == 2
    assert "layers 0,2 copied" in out and "weight selection" in out
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["student"]["perplexity"] > 1 and metrics["baseline"]["perplexity"] > 1
    assert metrics["compression"] > 2
    model = AutoModelForCausalLM.from_pretrained(run / "student")
    tok = AutoTokenizer.from_pretrained(run / "student")
    teacher_tok = AutoTokenizer.from_pretrained(lm_teacher / "teacher")
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (2, 16)
    assert len(tok) == len(teacher_tok) and tok("What is 3 plus 1?").input_ids == teacher_tok("What is 3 plus 1?").input_ids
    assert model(input_ids=torch.tensor([tok("What is 3 plus 1?").input_ids])).logits.shape[-1] == len(tok)


def test_lm_student_is_derived_from_the_teachers_spec_beside_a_cache(lm_teacher, tmp_path, capsys):
    cfg = _lm_config(lm_teacher, tmp_path / "run", num_layers=1)
    cfg["eval"].update(generate_samples=0, efficiency=False)
    cfg["cache"] = {"top_k": 8, "shard_samples": 100}
    config = write_yaml(tmp_path / "c.yaml", cfg)
    assert main(["cache", str(config), "--output", str(tmp_path / "cache")]) == 0
    cfg["teacher"]["cache"] = str(tmp_path / "cache")
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", cfg)), "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "the teacher itself is not loaded" in out and "(qwen2, 4 -> 1 layers, width 32)" in out
    assert "layers 0 copied" in out
    teacher = AutoModelForCausalLM.from_pretrained(lm_teacher / "teacher")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    assert student.config.num_hidden_layers == 1
    assert student.model.embed_tokens.weight.shape == teacher.model.embed_tokens.weight.shape
    del cfg["teacher"]["pretrained"]  # a cache alone: nothing to derive from
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", cfg)), "--overwrite"]) == 2
    assert "student.derive_from: teacher.cache holds the teacher's outputs" in capsys.readouterr().err
