"""Causal language models for task: lm: tokenizers, teachers and students from a `ModelConfig`.

LoRA and export live in kdkit.models.lora; the hidden-state wrappers in kdkit.models.causal.

Sources (one per ModelConfig):
  pretrained  a hub ID or local save_pretrained directory (AutoModelForCausalLM)
  hf_config   {model_type: qwen2, hidden_size: ...} or {base: <ID or dir>, num_hidden_layers: 2, ...}: random weights
  run         a previous kdkit run directory (or its student/ directory) whose student is a causal LM
and a student `derive_from: teacher` (kdkit.models.derive): the teacher's Llama-like config with fewer layers or a
narrower width, initialised from the teacher's weights, reading the teacher's tokenizer.

The distillation losses never see full logits: they take the last hidden state and the output head's weight
(`kdkit.losses.fused`). `CausalLMStudent` exposes exactly those two for the trainer, and `build_causal_lm` refuses
models whose logits are not `lm_head(last_hidden_state)` (soft-capped or scaled logits: Gemma 2, Cohere, Granite).
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from kdkit.config.schema import ModelConfig
from kdkit.errors import UserError
from kdkit.models.causal import KDKIT_JSON, _check_logits_config, _first_line, _reraise_oom, check_plain_logits

def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~", ".\\")) or os.path.exists(os.path.expanduser(path))


def _check_local(path: str, where: str) -> None:
    if _looks_local(path) and not os.path.isdir(os.path.expanduser(path)):
        raise UserError(f"{where}: directory not found: {path}")


# --------------------------------------------------------------------------------------------------- kdkit runs

def export_dir(path: str | Path, where: str) -> Path:
    """The exported causal LM of a kdkit run directory (or that student/ directory itself); UserError otherwise."""
    from kdkit.models.build import read_export

    path, meta = read_export(path, where)
    if meta.get("kind") != "causal_lm":
        kind = meta.get("kind", "an image classifier")
        raise UserError(f"{where}: {path} holds {kind}, not a causal language model (kind: causal_lm)")
    return path


def _read_meta(path: Path) -> dict:
    return json.loads((path / KDKIT_JSON).read_text())


# --------------------------------------------------------------------------------------------------- tokenizer

def _tokenizer_source(spec: ModelConfig, role: str, teacher: Optional[ModelConfig] = None
                      ) -> tuple[str, Optional[str], str] | None:
    """(source, revision, the field it came from) or None when the spec names no tokenizer."""
    if spec.tokenizer is not None:
        return spec.tokenizer, None, f"{role}.tokenizer"
    if spec.derive_from is not None:  # a derived student reads the teacher's tokens
        return _tokenizer_source(teacher, "teacher") if teacher is not None else None
    if spec.pretrained is not None:
        return spec.pretrained, spec.revision, f"{role}.pretrained"
    if spec.run is not None:
        return str(export_dir(spec.run, f"{role}.run")), None, f"{role}.run"
    base = (spec.hf_config or {}).get("base")
    if base is not None:
        return str(base), None, f"{role}.hf_config.base"
    return None


def load_tokenizer(spec: ModelConfig, role: str, teacher: Optional[ModelConfig] = None):
    """The tokenizer of `spec`: `tokenizer`, else the pretrained model's, the run's student/, or hf_config.base's
    (a student with derive_from: the teacher's, from the `teacher` spec).

    A tokenizer without a pad token pads with its EOS token. UserError naming `<role>.tokenizer` when none can be
    loaded (or none is named: hf_config without base needs `tokenizer`)."""
    from transformers import AutoTokenizer

    where = f"{role}.tokenizer"
    found = _tokenizer_source(spec, role, teacher)
    if found is None:
        what = "the teacher names" if spec.derive_from is not None else f"{role}.hf_config has"
        raise UserError(f"{where}: {what} no base to take a tokenizer from; set {where} (a hub ID or directory)")
    source, revision, field = found
    via = "" if field == where else f" (from {field})"
    _check_local(source, where + via)
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=spec.trust_remote_code)
        tok = _as_declared(tok, source, revision)
    except Exception as err:
        _reraise_oom(err)
        raise UserError(f"{where}: cannot load a tokenizer from {source!r}{via}: {_first_line(err)}"
                        + ("" if field == where else f"; set {where}")) from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(f"{where}: the tokenizer of {source!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _as_declared(tok, source: str, revision: Optional[str]):
    """The tokenizer its tokenizer_config.json declares. transformers 5's AutoTokenizer picks the model type's class
    for some families (qwen2 -> Qwen2Tokenizer) even where the directory declares a generic tokenizer.json one, and
    that class rebuilds the pre-tokenizer: a tokenizer trained with `tokenizers` beside a Qwen2 config would then
    split text differently from the tokenizer it was saved from (kdkit's exports carry such tokenizers)."""
    from transformers.models.auto.tokenization_auto import get_tokenizer_config

    declared = get_tokenizer_config(source, revision=revision).get("tokenizer_class")
    if declared in GENERIC_TOKENIZER_CLASSES and type(tok).__name__ not in GENERIC_TOKENIZER_CLASSES:
        from transformers import PreTrainedTokenizerFast  # TokenizersBackend in transformers 5

        return PreTrainedTokenizerFast.from_pretrained(source, revision=revision)
    return tok


# --------------------------------------------------------------------------------------------------- building

def _dtype(spec: ModelConfig, role: str, *, random_init: bool = False):
    if spec.dtype == "auto":
        return torch.float32 if role == "student" or random_init else "auto"
    return getattr(torch, spec.dtype)


def _check_causal_type(model_type: Any, where: str, trust_remote_code: bool = False, auto_map: Any = None) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return
    if trust_remote_code and auto_map and "AutoModelForCausalLM" in auto_map:
        return
    known = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    close = difflib.get_close_matches(str(model_type), known, n=3)
    hint = f"did you mean {' or '.join(close)}?" if close else "e.g. qwen2, llama, mistral, phi, gpt2"
    raise UserError(f"{where}: transformers has no causal language model of model type {model_type!r}; {hint}")


def _quantization(spec: ModelConfig, role: str, device: Any) -> dict:
    """from_pretrained kwargs for `quantization` (bitsandbytes on CUDA); UserError where it cannot work."""
    if spec.quantization is None:
        return {}
    where = f"{role}.quantization"
    if spec.hf_config is not None:
        raise UserError(f"{where}: quantization loads pretrained weights; {role}.hf_config builds random ones "
                        "(use pretrained or run, or drop quantization)")
    if not torch.cuda.is_available():
        raise UserError(
            f"{where}: {spec.quantization} loading needs a CUDA GPU and bitsandbytes, and this machine has no CUDA. "
            f"Instead use {role}.dtype: bfloat16 (half the memory of float32), a smaller {role}, "
            "or run where CUDA is available")
    from transformers.utils import is_bitsandbytes_available

    if not is_bitsandbytes_available():
        raise UserError(f"{where}: {spec.quantization} loading needs bitsandbytes (pip install bitsandbytes)")
    from transformers import BitsAndBytesConfig

    if spec.quantization == "8bit":
        qcfg = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    if device is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return {"quantization_config": qcfg, "device_map": {"": device}}


def _from_pretrained(source: str, spec: ModelConfig, role: str, where: str, device: Any,
                     revision: Optional[str] = None):
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_local(source, where)
    try:
        cfg = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=spec.trust_remote_code)
    except Exception as err:
        _reraise_oom(err)
        raise UserError(f"{where}: cannot load {source!r}: {_first_line(err)}") from None
    _check_causal_type(cfg.model_type, where, spec.trust_remote_code, getattr(cfg, "auto_map", None))
    _check_logits_config(cfg, where)  # before the weights: a big checkpoint fails in a second, not minutes
    quant = _quantization(spec, role, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=_dtype(spec, role),
                                                     trust_remote_code=spec.trust_remote_code, **quant)
    except Exception as err:
        _reraise_oom(err)
        raise UserError(f"{where}: cannot load the model in {source!r}: {_first_line(err)}") from None
    return model


def _config_of(spec: ModelConfig, role: str, vocab_size: Optional[int]):
    """The transformers config an hf_config spec describes."""
    from transformers import AutoConfig

    where = f"{role}.hf_config"
    overrides = dict(spec.hf_config)
    base = overrides.pop("base", None)
    tok = None
    if base is None:
        model_type = overrides.pop("model_type", None)
        if model_type is None:
            raise UserError(f"{where}: give model_type (e.g. qwen2, llama, mistral) or base")
        _check_causal_type(model_type, f"{where}.model_type")
        if "vocab_size" not in overrides:
            if vocab_size is None:
                tok = load_tokenizer(spec, role)
                vocab_size = len(tok)
            overrides["vocab_size"] = vocab_size
        if tok is None and spec.tokenizer is not None:
            tok = load_tokenizer(spec, role)
        if tok is not None:  # generation stops at the tokenizer's EOS, not a default id of the model family
            for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                overrides.setdefault(name, getattr(tok, name))
        try:
            cfg = AutoConfig.for_model(model_type, **overrides)
        except Exception as err:
            _reraise_oom(err)
            raise UserError(f"{where}: {_first_line(err)}") from None
    else:
        if vocab_size is not None:
            overrides.setdefault("vocab_size", vocab_size)
        _check_local(str(base), f"{where}.base")
        try:
            cfg = AutoConfig.from_pretrained(base, trust_remote_code=spec.trust_remote_code, **overrides)
        except Exception as err:
            _reraise_oom(err)
            raise UserError(f"{where}.base: cannot load the config of {base!r}: {_first_line(err)}") from None
        _check_causal_type(cfg.model_type, f"{where}.base", spec.trust_remote_code, getattr(cfg, "auto_map", None))
    _check_logits_config(cfg, where)
    return cfg


def _from_config(spec: ModelConfig, role: str, vocab_size: Optional[int]):
    from transformers import AutoModelForCausalLM

    where = f"{role}.hf_config"
    cfg = _config_of(spec, role, vocab_size)
    try:
        return AutoModelForCausalLM.from_config(cfg, dtype=_dtype(spec, role, random_init=True),
                                                trust_remote_code=spec.trust_remote_code)
    except Exception as err:
        _reraise_oom(err)
        raise UserError(f"{where}: cannot build the model: {_first_line(err)}") from None


def teacher_config(spec: ModelConfig, vocab_size: Optional[int] = None, role: str = "teacher"):
    """The transformers config of a causal LM spec, without loading its weights."""
    from transformers import AutoConfig

    if spec.hf_config is not None:
        return _config_of(spec, role, vocab_size)
    if spec.pretrained is not None:
        source, revision, where = spec.pretrained, spec.revision, f"{role}.pretrained"
    else:
        where = f"{role}.run"
        path = export_dir(spec.run, where)
        base = _read_meta(path).get("base") or {}  # an adapter export: the config is its base's
        source = str(path / base["dir"]) if "dir" in base else base.get("pretrained", str(path))
        revision = base.get("revision")
    _check_local(source, where)
    try:
        return AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=spec.trust_remote_code)
    except Exception as err:
        _reraise_oom(err)
        raise UserError(f"{where}: cannot load the config of {source!r}: {_first_line(err)}") from None


def _derived(spec: ModelConfig, teacher: Optional[ModelConfig], loaded: Any, role: str, vocab_size: Optional[int]):
    """A student derived from the teacher (kdkit.models.derive): from the loaded teacher's weights where it has
    plain ones, else from the teacher built (init: teacher_layers) or only configured (init: random) from its spec."""
    from transformers import AutoModelForCausalLM

    from kdkit.models.derive import derive_from_spec

    where = f"{role}.derive_from"
    hf = getattr(loaded, "model", None)
    quantized = hf is not None and getattr(hf.config, "quantization_config", None) is not None
    if hf is None or quantized or getattr(loaded, "cached", False):
        if teacher is None or not any(getattr(teacher, k) is not None for k in ("pretrained", "hf_config", "run")):
            raise UserError(f"{where}: needs the teacher's model: with teacher.cache, also give the source the "
                            "cache was made from (teacher.pretrained, hf_config or run)")
        own = teacher.model_copy(update={"cache": None, "quantization": None, "gradient_checkpointing": False})
        hf = (build_causal_lm(own, "teacher", vocab_size=vocab_size, check_logits=False)
              if spec.init == "teacher_layers" else teacher_config(own, vocab_size))
    return derive_from_spec(spec, hf, where=role, model_class=AutoModelForCausalLM, dtype=_dtype(spec, role))


def derived_vocab_rows(spec: ModelConfig, teacher: ModelConfig, vocab_size: Optional[int] = None) -> int:
    """The head rows of a derived student, from the configs alone (overrides.vocab_size, else the teacher's)."""
    if "vocab_size" in spec.overrides:
        return int(spec.overrides["vocab_size"])
    return int(teacher_config(teacher.model_copy(update={"cache": None}), vocab_size).vocab_size)


def build_causal_lm(spec: ModelConfig, role: str = "student", *, vocab_size: Optional[int] = None,
                    device: Any = None, check_logits: bool = True, teacher: Optional[ModelConfig] = None,
                    loaded_teacher: Any = None):
    """A teacher or student causal LM (a transformers PreTrainedModel, on the CPU unless quantized).

    vocab_size: rows of a randomly initialised (hf_config) model's embeddings and head when hf_config does not set
    vocab_size (default: the tokenizer's length without base, the base config's with it); ignored for pretrained
    and run. dtype auto: float32 for the student and random weights, the checkpoint's own for a teacher.
    quantization (bitsandbytes, CUDA only) places the model on `device` (default cuda:LOCAL_RANK).
    check_logits: one forward on 8 tokens confirms the logits are `lm_head(last hidden state)`.
    derive_from: made from `teacher` (its spec) and `loaded_teacher` (the FrozenCausalTeacher, when loaded).
    Errors name `<role>.<field>`."""
    if spec.factory is not None:
        raise UserError(f"{role}.factory: task lm builds causal LMs from pretrained, hf_config or run")
    if spec.hf_config is not None:
        _quantization(spec, role, device)  # refuses quantization of random weights before building anything
    if spec.pretrained is not None:
        model = _from_pretrained(spec.pretrained, spec, role, f"{role}.pretrained", device, spec.revision)
        model._kdkit_source = {"pretrained": _absolute_if_local(spec.pretrained), "revision": spec.revision,
                               "trust_remote_code": spec.trust_remote_code}
    elif spec.run is not None:
        where = f"{role}.run"
        path = export_dir(spec.run, where)
        from kdkit.models.lora import load_causal_lm_export  # lora imports this module

        model = load_causal_lm_export(path, where=where, dtype=_dtype(spec, role),
                                      trust_remote_code=spec.trust_remote_code,
                                      **_quantization(spec, role, device))
        # A full export is a loadable base for a later adapter export; an adapter merged on load is not.
        model._kdkit_source = ({"pretrained": str(path.resolve()), "revision": None,
                                "trust_remote_code": spec.trust_remote_code}
                               if _read_meta(path).get("format") == "hf" else None)
        _check_logits_config(model.config, where)
    elif spec.derive_from is not None:
        model = _derived(spec, teacher, loaded_teacher, role, vocab_size)
        model._kdkit_source = None  # no loadable checkpoint: an adapter export must carry its base
    else:
        model = _from_config(spec, role, vocab_size)
        model._kdkit_source = None  # random weights: an adapter export must carry its base
    if spec.gradient_checkpointing:
        if getattr(model, "supports_gradient_checkpointing", False):
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name is deprecated
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            print(f"note: {role}.gradient_checkpointing: {type(model).__name__} does not support it; ignored")
    if check_logits:
        field = next(k for k in ("pretrained", "run", "derive_from", "hf_config") if getattr(spec, k) is not None)
        check_plain_logits(model, f"{role}.{field}")
    return model


def _absolute_if_local(source: str) -> str:
    path = Path(source).expanduser()
    return str(path.resolve()) if path.is_dir() else source
