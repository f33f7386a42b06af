"""Causal LMs from config: sources, dtype, the hidden-state student, LoRA and export. Tiny models, no downloads."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdkit.config.schema import LoraConfig, ModelConfig
from kdkit.errors import UserError
from kdkit.models import (CausalLMStudent, FrozenCausalTeacher, apply_lora, build_causal_lm, load_causal_lm_export,
                          load_tokenizer, save_causal_lm, teacher_hidden)
from kdkit.models.causal import check_plain_logits, hf_model

from tiny_lm import save_tiny_lm, tiny_causal_lm, tiny_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tiny_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, tok_dir):
    return save_tiny_lm(tmp_path_factory.mktemp("qwen2"), tok_dir, "qwen2")


def _ids(tok, texts=("def add(a, b):", "The quick brown fox jumps")):
    batch = tok(list(texts), return_tensors="pt", padding=True)
    return batch["input_ids"], batch["attention_mask"]


def _build(spec: dict, role="student", **kw):
    return build_causal_lm(ModelConfig(**spec), role, **kw)


@pytest.mark.parametrize("model_type", ["qwen2", "llama", "phi", "gpt2"])
def test_student_hidden_times_head_is_the_models_logits(model_type, tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    if model_type == "gpt2":  # GPT-2 names its sizes differently; tied embeddings
        from transformers import GPT2Config, GPT2LMHeadModel
        torch.manual_seed(0)
        lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=2, n_head=2, n_positions=64))
    else:
        lm = tiny_causal_lm(model_type, vocab_size=len(tok))
    lm.eval()
    student = CausalLMStudent(lm)
    ids, mask = _ids(tok)
    hidden = student(ids, mask)
    assert hidden.shape[:2] == ids.shape
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(hidden @ student.head_weight.T, logits, atol=1e-6, rtol=0)
    assert student.head_weight.shape[0] == len(tok) and student.vocab_rows == len(tok)
    if model_type == "phi":  # a biased head rides as an extra column against a constant 1
        assert hidden.shape[-1] == lm.config.hidden_size + 1
    h_t, w_t = teacher_hidden(lm, ids, mask)
    assert not h_t.is_inference() and not w_t.requires_grad
    torch.testing.assert_close(h_t @ w_t.T, logits, atol=1e-6, rtol=0)
    check_plain_logits(lm, "teacher")


def test_student_gradients_reach_body_and_head(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    student = CausalLMStudent(tiny_causal_lm("llama", vocab_size=len(tok)))
    ids, mask = _ids(tok)
    (student(ids, mask) @ student.head_weight.T).logsumexp(-1).mean().backward()
    assert student.lm.lm_head.weight.grad is not None
    assert student.lm.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_pretrained_dir_tokenizer_and_dtype(qwen_dir):
    student = _build({"pretrained": str(qwen_dir)})
    assert student.dtype == torch.float32 and type(student).__name__ == "Qwen2ForCausalLM"
    teacher = _build({"pretrained": str(qwen_dir), "dtype": "bfloat16"}, role="teacher")
    assert teacher.dtype == torch.bfloat16
    # auto: a teacher keeps the checkpoint's own dtype
    AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.bfloat16).save_pretrained(qwen_dir.parent / "bf16")
    assert _build({"pretrained": str(qwen_dir.parent / "bf16")}, role="teacher").dtype == torch.bfloat16
    assert _build({"pretrained": str(qwen_dir.parent / "bf16")}).dtype == torch.float32  # a student trains in fp32
    tok = load_tokenizer(ModelConfig(pretrained=str(qwen_dir)), "student")
    assert len(tok) == student.config.vocab_size and tok.pad_token == "<|pad|>"


def test_tokenizer_sources_and_pad(tmp_path, tok_dir):
    no_pad = AutoTokenizer.from_pretrained(tok_dir)
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path / "nopad")
    tok = load_tokenizer(ModelConfig(hf_config={"model_type": "qwen2"}, tokenizer=str(tmp_path / "nopad")), "student")
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    with pytest.raises(UserError, match=r"^student\.tokenizer: .*set student\.tokenizer"):
        load_tokenizer(ModelConfig(hf_config={"model_type": "qwen2"}), "student")
    with pytest.raises(UserError, match=r"^teacher\.tokenizer"):
        load_tokenizer(ModelConfig(pretrained=str(tmp_path / "missing")), "teacher")


def test_hf_config_from_model_type_and_from_base_with_overrides(qwen_dir, tok_dir):
    tiny = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1}
    model = _build({"hf_config": tiny, "tokenizer": str(tok_dir)})
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert model.config.vocab_size == len(tok) and model.config.num_hidden_layers == 1
    assert model.config.eos_token_id == tok.eos_token_id  # generation stops at the tokenizer's EOS
    assert _build({"hf_config": tiny}, vocab_size=320).config.vocab_size == 320  # no tokenizer needed then
    small = _build({"hf_config": {"base": str(qwen_dir), "num_hidden_layers": 1}})
    base = AutoModelForCausalLM.from_pretrained(qwen_dir)
    assert small.config.num_hidden_layers == 1 < base.config.num_hidden_layers
    assert small.config.hidden_size == base.config.hidden_size and small.dtype == torch.float32
    assert not torch.equal(small.lm_head.weight, base.lm_head.weight)  # random weights, the base's shapes
    with pytest.raises(UserError, match=r"student\.hf_config\.model_type: .*'qwen3'|student\.hf_config\.model_type: .*qwen2"):
        _build({"hf_config": {"model_type": "qwen22"}}, vocab_size=32)
    with pytest.raises(UserError, match=r"student\.hf_config: give model_type"):
        _build({"hf_config": {"hidden_size": 16}}, vocab_size=32)
    with pytest.raises(UserError, match=r"student\.hf_config\.model_type: transformers has no causal"):
        _build({"hf_config": {"model_type": "vit"}}, vocab_size=32)


def test_gradient_checkpointing(qwen_dir):
    model = _build({"pretrained": str(qwen_dir), "gradient_checkpointing": True})
    assert model.is_activation_checkpointing
    student = CausalLMStudent(model).train()
    student(torch.tensor([[1, 2, 3]])).sum().backward()
    assert model.model.embed_tokens.weight.grad is not None


def test_source_errors_name_the_field(tmp_path, qwen_dir):
    with pytest.raises(UserError, match=r"^student\.pretrained: directory not found"):
        _build({"pretrained": str(tmp_path / "nope")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"^teacher\.pretrained: cannot load"):
        _build({"pretrained": str(tmp_path / "empty")}, role="teacher")
    with pytest.raises(UserError, match=r"^teacher\.run: .*\(no kdkit\.json\)"):
        _build({"run": str(qwen_dir)}, role="teacher")
    with pytest.raises(UserError, match=r"^student\.hf_config\.base: directory not found"):
        _build({"hf_config": {"base": str(tmp_path / "nope")}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU refusal")
def test_quantization_needs_cuda(qwen_dir):
    with pytest.raises(UserError, match=r"^teacher\.quantization: 4bit .*no CUDA.*teacher\.dtype: bfloat16"):
        _build({"pretrained": str(qwen_dir), "quantization": "4bit"}, role="teacher")
    with pytest.raises(UserError, match=r"^teacher\.quantization: .*hf_config"):
        _build({"hf_config": {"model_type": "qwen2"}, "quantization": "8bit"}, role="teacher", vocab_size=32)


def test_models_with_transformed_logits_are_refused(tmp_path, tok_dir):
    for model_type, field in (("gemma2", "final_logit_softcapping"), ("cohere", "logit_scale")):
        with pytest.raises(UserError, match=rf"^teacher\.hf_config: {model_type} .*{field}.*plain logits"):
            _build({"hf_config": {"model_type": model_type, "hidden_size": 16, "intermediate_size": 32,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                  "head_dim": 8}}, role="teacher", vocab_size=32)
    lm = tiny_causal_lm("gemma2", vocab_size=32)
    lm.save_pretrained(tmp_path / "gemma2")
    with pytest.raises(UserError, match=r"^teacher\.pretrained: .*final_logit_softcapping"):
        _build({"pretrained": str(tmp_path / "gemma2")}, role="teacher")
    # the numeric check catches what no config field announces
    scaled = tiny_causal_lm("qwen2", vocab_size=32)
    scaled.lm_head.register_forward_hook(lambda m, i, o: o * 2.0)
    with pytest.raises(UserError, match=r"^teacher: the model's logits differ"):
        check_plain_logits(scaled, "teacher")


def test_frozen_teacher(qwen_dir, tok_dir):
    teacher = FrozenCausalTeacher(_build({"pretrained": str(qwen_dir)}, role="teacher"))
    ids, mask = _ids(AutoTokenizer.from_pretrained(tok_dir))
    hidden, weight = teacher(ids, mask)
    assert not any(p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training
    assert weight.shape[0] == teacher.vocab_rows and hidden.shape[:2] == ids.shape


def _lora_student(qwen_dir, **lora):
    model = _build({"pretrained": str(qwen_dir)})
    lines = []
    peft_model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, **lora), log=lines.append)
    return CausalLMStudent(peft_model), lines


def _train_step(student, ids, mask):
    trainable = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=0.05)
    torch.manual_seed(0)
    loss = torch.nn.functional.cross_entropy((student(ids, mask) @ student.head_weight.T)[:, :-1].flatten(0, 1),
                                             ids[:, 1:].flatten())
    loss.backward()
    opt.step()


def test_lora_trains_only_the_adapter_and_exports_merged(tmp_path, qwen_dir, tok_dir):
    student, lines = _lora_student(qwen_dir)
    names = {n for n, p in student.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    assert len(lines) == 1 and "parameters train" in lines[0]
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids, mask = _ids(tok)
    _train_step(student, ids, mask)
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= names and any("lora_A" in n for n in changed)
    student.eval()
    with torch.no_grad():
        want = student.lm(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(student(ids, mask) @ student.head_weight.T, want, atol=1e-6, rtol=0)
    out = save_causal_lm(student, tok, tmp_path / "student", meta={"note": "x"})
    meta = json.loads((out / "kdkit.json").read_text())
    assert meta["kind"] == "causal_lm" and meta["format"] == "hf" and meta["note"] == "x"
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # no peft, no kdkit
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, want, atol=1e-5, rtol=0)
    assert len(AutoTokenizer.from_pretrained(out)) == len(tok)
    # the model given keeps its adapter and weights: exporting did not merge it in place
    after = {n: p for n, p in student.named_parameters()}
    assert set(after) == set(before) and all(torch.equal(after[n], p) for n, p in before.items() if n not in changed)
    # a kdkit run as a teacher: the export loads back through `run`
    teacher = _build({"run": str(tmp_path)}, role="teacher")  # the run directory holding student/
    with torch.no_grad():
        torch.testing.assert_close(teacher(input_ids=ids, attention_mask=mask).logits, want, atol=1e-5, rtol=0)
    assert len(load_tokenizer(ModelConfig(run=str(tmp_path)), "teacher")) == len(tok)


def test_lora_adapter_export(tmp_path, qwen_dir, tok_dir):
    from peft import PeftModel

    student, _ = _lora_student(qwen_dir, target_modules=["q_proj", "v_proj"])
    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids, mask = _ids(tok)
    _train_step(student, ids, mask)
    student.eval()
    with torch.no_grad():
        want = student.lm(input_ids=ids, attention_mask=mask).logits
    out = save_causal_lm(student, tok, tmp_path / "student", lora_export="adapter")
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    assert json.loads((out / "kdkit.json").read_text())["format"] == "adapter"
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(qwen_dir), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, want, atol=1e-5, rtol=0)
    for merge in (True, False):
        again = load_causal_lm_export(tmp_path, merge=merge).eval()
        assert (type(again).__name__ == "Qwen2ForCausalLM") == merge
        with torch.no_grad():
            torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).logits, want, atol=1e-5, rtol=0)


def test_lora_adapter_export_of_random_base_carries_the_base(tmp_path, tok_dir):
    tiny = {"model_type": "qwen2", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1}
    model = _build({"hf_config": tiny, "tokenizer": str(tok_dir)})
    student = CausalLMStudent(apply_lora(model, LoraConfig(r=2, dropout=0.0), log=None))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids, mask = _ids(tok)
    _train_step(student, ids, mask)
    student.eval()
    with torch.no_grad():
        want = student.lm(input_ids=ids, attention_mask=mask).logits
    out = save_causal_lm(student, tok, tmp_path / "student", lora_export="adapter")
    assert (out / "base" / "config.json").is_file()
    with torch.no_grad():
        got = load_causal_lm_export(out)(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_lora_refuses_the_head_and_bad_targets(qwen_dir):
    with pytest.raises(UserError, match=r"student\.lora\.target_modules: the output head"):
        _lora_student(qwen_dir, target_modules=["q_proj", "lm_head"])
    with pytest.raises(UserError, match=r"student\.lora\.target_modules"):
        _lora_student(qwen_dir, target_modules=["no_such_module"])
    from transformers import AutoConfig

    tied = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "qwen2", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=True))
    with pytest.raises(UserError, match=r"student\.lora\.target_modules: the input embeddings are tied"):
        apply_lora(tied, LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]), log=None)


def test_plain_export_roundtrip(tmp_path, qwen_dir, tok_dir):
    model = _build({"pretrained": str(qwen_dir)})
    tok = AutoTokenizer.from_pretrained(tok_dir)
    save_causal_lm(CausalLMStudent(model), tok, tmp_path / "student")
    again = load_causal_lm_export(tmp_path, dtype=torch.float32)
    ids, mask = _ids(tok)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).logits,
                                   model.eval()(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)
    assert isinstance(hf_model(CausalLMStudent(again)), type(model))


def test_a_custom_tokenizer_beside_a_qwen2_config_loads_as_it_was_saved(tmp_path):
    """transformers 5's AutoTokenizer gives a qwen2 directory Qwen2Tokenizer, whose own pre-tokenizer splits text
    unlike a tokenizer trained with `tokenizers`: kdkit loads the declared class, and its exports say so."""
    from transformers import AutoTokenizer

    from kdkit.models.lm import load_tokenizer
    from kdkit.models.lora import save_causal_lm
    from kdkit.models.vocab import PROBES

    from importlib.resources import files

    shipped = str(files("kdkit") / "assets" / "stdlib_lm" / "tokenizer")  # the LM demo's, trained with `tokenizers`
    tok = AutoTokenizer.from_pretrained(shipped)
    directory = save_tiny_lm(tmp_path / "lm", shipped)
    plain = AutoTokenizer.from_pretrained(directory)
    differs = [t for t in PROBES if plain(t)["input_ids"] != tok(t)["input_ids"]]
    assert differs, "transformers no longer re-types this tokenizer: _as_declared may be unnecessary"
    loaded = load_tokenizer(ModelConfig(pretrained=str(directory)), "teacher")
    assert all(loaded(t)["input_ids"] == tok(t)["input_ids"] for t in PROBES)
    out = save_causal_lm(tiny_causal_lm(vocab_size=len(tok)), loaded, tmp_path / "export")
    note = json.loads((out / "kdkit.json").read_text())["tokenizer_note"]
    assert "splits text differently" in note and "PreTrainedTokenizerFast" in note
