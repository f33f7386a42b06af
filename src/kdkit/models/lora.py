"""LoRA students through peft, and exporting / loading a trained causal LM (merged, or as an adapter)."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from kdkit.config.schema import LoraConfig
from kdkit.errors import UserError
from kdkit.models.causal import (KDKIT_JSON, CausalLMStudent, _first_line, _head, _is_quantized, _reraise_oom,
                                 hf_model, is_peft_model)
from kdkit.models.lm import _read_meta, export_dir

# --------------------------------------------------------------------------------------------------- LoRA

def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each shared tensor once."""
    seen: dict[int, nn.Parameter] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    numel = [(p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1), p.requires_grad) for p in seen.values()]
    return sum(n for n, t in numel if t), sum(n for n, _ in numel)


def _checkpointing(model: nn.Module) -> bool:
    return bool(getattr(model, "is_activation_checkpointing", None) if hasattr(model, "is_activation_checkpointing")
                else getattr(model, "is_gradient_checkpointing", False))


def apply_lora(model: nn.Module, lora: LoraConfig, *, where: str = "student.lora",
               log: Optional[Callable[[str], None]] = print):
    """Wrap `model` in a peft LoRA adapter (task CAUSAL_LM): only the adapter's parameters train.

    A quantized (bitsandbytes) model is first prepared for k-bit training (QLoRA). `log` gets one line with the
    trainable and total parameter counts (None: silent). Returns the peft model."""
    try:
        from peft import LoraConfig as PeftLoraConfig, get_peft_model, prepare_model_for_kbit_training
    except ImportError:
        raise UserError(f"{where}: LoRA needs peft (pip install 'kdkit[lm]' or pip install peft)") from None
    if is_peft_model(model) or isinstance(model, CausalLMStudent):
        raise ValueError("apply_lora takes the transformers model, not a peft model or CausalLMStudent")
    if _is_quantized(model):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=_checkpointing(model),
            gradient_checkpointing_kwargs={"use_reentrant": False})
    target = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    cfg = PeftLoraConfig(task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                         target_modules=target)
    try:
        with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = get_peft_model(model, cfg)
    except ValueError as err:
        raise UserError(f"{where}.target_modules: {_first_line(err)}") from None
    from peft.tuners.tuners_utils import BaseTunerLayer

    hf = hf_model(peft_model)
    if isinstance(hf.get_output_embeddings(), BaseTunerLayer):
        raise UserError(f"{where}.target_modules: the output head (lm_head) cannot be adapted: the fused losses "
                        "read its weight directly; leave it out of target_modules")
    if isinstance(hf.get_input_embeddings(), BaseTunerLayer) and hf.config.get_text_config().tie_word_embeddings:
        raise UserError(f"{where}.target_modules: the input embeddings are tied to the output head here, so "
                        "adapting them would change the head the fused losses read; leave them out of target_modules")
    trainable, total = count_parameters(peft_model)
    if log is not None:
        log(f"{where}: LoRA r={lora.r} alpha={lora.alpha:g} on {target if isinstance(target, str) else ', '.join(target)}: "
            f"{trainable:,} of {total:,} parameters train ({100.0 * trainable / max(total, 1):.2f}%)")
    return peft_model


# --------------------------------------------------------------------------------------------------- export

def _merged_state_dict(peft_model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The base model's state dict with every active LoRA delta added (what merge_and_unload would give), built
    without touching the model; None when an adapter is not plain LoRA (variants such as DoRA, LoRA biases)."""
    from peft.tuners.lora import LoraLayer

    hf = hf_model(peft_model)
    merged: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in hf.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            adapters = [a for a in module.active_adapters if a in module.lora_A or a in module.lora_embedding_A]
            if any(a in getattr(module, "lora_variant", {}) or getattr(module, "lora_bias", {}).get(a, False)
                   for a in adapters):
                return None
            weight = module.get_base_layer().weight
            new = weight.detach().clone()
            for a in adapters:
                new += module.get_delta_weight(a).to(new.dtype)
            merged[f"{name}.weight"] = new
        state: dict[str, torch.Tensor] = {}
        for key, value in hf.state_dict().items():
            if ".lora_" in key or key.startswith("lora_"):
                continue
            clean = key.replace(".base_layer.", ".")
            state[clean] = merged.get(clean, value)
    return state


def _base_state_dict(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's own weights (adapters left out), under the names a plain model has."""
    hf = hf_model(peft_model)
    return {k.replace(".base_layer.", "."): v for k, v in hf.state_dict().items()
            if ".lora_" not in k and not k.startswith("lora_")}


def save_causal_lm(model: nn.Module, tokenizer: Any, out_dir: str | Path, *, lora_export: str = "merged",
                   meta: Optional[dict] = None) -> Path:
    """Write a causal LM (a CausalLMStudent, peft model or transformers model) with its tokenizer and kdkit.json.

    A plain model or lora_export merged: `AutoModelForCausalLM.from_pretrained(out_dir)` loads it without kdkit
    (the adapter is merged into a copy of the weights; the model given keeps training unchanged). lora_export
    adapter: only the adapter (`PeftModel.from_pretrained(base, out_dir)`); when the base came from no loadable
    checkpoint (hf_config, random weights) its weights go to out_dir/base/. `meta` is added to kdkit.json."""
    if lora_export not in ("merged", "adapter"):
        raise ValueError(f"lora_export must be merged or adapter, got {lora_export!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm = model.lm if isinstance(model, CausalLMStudent) else model
    hf = hf_model(lm)
    source = getattr(hf, "_kdkit_source", None)
    info: dict[str, Any] = {"kind": "causal_lm", "model_type": hf.config.model_type,
                            "vocab_rows": int(_head(hf).weight.shape[0]),
                            "tokenizer_len": len(tokenizer) if tokenizer is not None else None}
    if not is_peft_model(lm):
        hf.save_pretrained(out)
        info["format"] = "hf"
    elif lora_export == "adapter":
        lm.save_pretrained(out)
        info["format"] = "adapter"
        if source and source.get("pretrained"):
            info["base"] = {"pretrained": source["pretrained"], "revision": source.get("revision"),
                            "trust_remote_code": bool(source.get("trust_remote_code"))}
        else:
            if _is_quantized(hf):
                raise UserError("student.lora.export: adapter export of a quantized model needs the base it was "
                                "loaded from (pretrained)")
            hf.save_pretrained(out / "base", state_dict=_base_state_dict(lm))
            info["base"] = {"dir": "base"}
            _set_adapter_base(out, str((out / "base").resolve()))
    else:
        _save_merged(lm, hf, source, out)
        info["format"] = "hf"
        info["merged_lora"] = True
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
        note = plain_reload_note(tokenizer, out)
        if note:
            print(f"warning: {note}", flush=True)
            info["tokenizer_note"] = note
    info.update(meta or {})
    (out / KDKIT_JSON).write_text(json.dumps(info, indent=2) + "\n")
    return out


def plain_reload_note(tokenizer: Any, out: Path) -> Optional[str]:
    """None when `AutoTokenizer.from_pretrained(out)` splits the probe texts as `tokenizer` does, else how to load it
    (transformers 5 gives some model types their own tokenizer class, which rebuilds a custom pre-tokenizer)."""
    from transformers import AutoTokenizer

    from kdkit.models.vocab import PROBES

    try:
        plain = AutoTokenizer.from_pretrained(out)
    except Exception as err:  # noqa: BLE001 - any failure is what the note reports
        return f"AutoTokenizer.from_pretrained({str(out)!r}) fails ({type(err).__name__}): load the tokenizer with " \
               "transformers.PreTrainedTokenizerFast.from_pretrained"
    if all(plain(t, add_special_tokens=False)["input_ids"] == tokenizer(t, add_special_tokens=False)["input_ids"]
           for t in PROBES):
        return None
    return (f"AutoTokenizer.from_pretrained({str(out)!r}) loads {type(plain).__name__}, which splits text differently "
            f"from the {type(tokenizer).__name__} this model was trained with: load it with "
            "transformers.PreTrainedTokenizerFast.from_pretrained (kdkit does)")


def _set_adapter_base(out: Path, base: str) -> None:
    cfg_file = out / "adapter_config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        cfg["base_model_name_or_path"] = base
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _save_merged(lm: nn.Module, hf: nn.Module, source: Optional[dict], out: Path) -> None:
    if _is_quantized(hf):
        # QLoRA: merging into 4/8-bit weights rounds the update away; merge into the base reloaded unquantized.
        if not (source and source.get("pretrained")):
            raise UserError("student.lora.export: merging an adapter into a quantized model needs the base it was "
                            "loaded from; use export: adapter")
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory() as tmp:
            lm.save_pretrained(tmp)
            base = AutoModelForCausalLM.from_pretrained(source["pretrained"], revision=source.get("revision"),
                                                        dtype="auto", trust_remote_code=bool(source.get("trust_remote_code")))
            PeftModel.from_pretrained(base, tmp).merge_and_unload().save_pretrained(out)
        return
    state = _merged_state_dict(lm)
    if state is not None:
        hf.save_pretrained(out, state_dict=state)
        return
    import copy

    copy.deepcopy(lm).merge_and_unload().save_pretrained(out)


def load_causal_lm_export(path: str | Path, *, where: str = "run", dtype: Any = "auto", merge: bool = True,
                          trust_remote_code: bool = False, **from_pretrained_kwargs):
    """Load what `save_causal_lm` wrote (a run directory or its student/ directory).

    A full or merged export is a transformers model; an adapter export is its base with the adapter, merged
    (merge=True, a transformers model) or as a peft model (merge=False). Extra kwargs go to from_pretrained
    (quantization_config, device_map)."""
    from transformers import AutoModelForCausalLM

    path = export_dir(path, where)
    meta = _read_meta(path)
    fmt = meta.get("format")
    try:
        if fmt == "hf":
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                        **from_pretrained_kwargs)
        if fmt != "adapter":
            raise UserError(f"{where}: {path / KDKIT_JSON} has an unknown format {fmt!r}")
        from peft import PeftModel

        base_info = meta.get("base") or {}
        if "dir" in base_info:
            base_src, revision = str(path / base_info["dir"]), None
        elif "pretrained" in base_info:
            base_src, revision = base_info["pretrained"], base_info.get("revision")
            trust_remote_code = trust_remote_code or bool(base_info.get("trust_remote_code"))
        else:
            raise UserError(f"{where}: {path / KDKIT_JSON} names no base model for the adapter")
        base = AutoModelForCausalLM.from_pretrained(base_src, revision=revision, dtype=dtype,
                                                    trust_remote_code=trust_remote_code, **from_pretrained_kwargs)
        with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(base, str(path))
        return model.merge_and_unload() if merge else model
    except UserError:
        raise
    except Exception as err:
        _reraise_oom(err)
        raise UserError(f"{where}: cannot load the model in {path}: {_first_line(err)}") from None
