"""Vision-language models for task: vlm: processors, teachers and students from a `ModelConfig`.

Sources (one per ModelConfig), as for causal LMs (kdkit.models.lm):
  pretrained  a hub ID or local save_pretrained directory (AutoModelForImageTextToText: Qwen2-VL, Qwen2.5-VL, ...)
  hf_config   {model_type: qwen2_vl, text_config: {...}, vision_config: {...}} or {base: <ID or dir>, ...}: random
              weights; the vocabulary size and the image / vision-start / vision-end token ids come from the processor
  run         a previous kdkit run directory whose student is a vision-language model

The processor (tokenizer + image processor + chat template) comes from `tokenizer` when set, else from the model's
source. `VLMProcessor` wraps it: Hugging Face's AutoProcessor when it loads, else (Qwen2-VL's processor needs
torchvision for its video part) the tokenizer and image processor with Qwen2-VL's rule for image tokens: each
image placeholder becomes grid_t * grid_h * grid_w / merge_size^2 tokens.

The losses never see full logits: `VLMStudent` gives the language model's last hidden state (the base model takes
pixel_values, image_grid_thw and mm_token_type_ids as keyword arguments) and the head's weight, as CausalLMStudent.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from kdkit.config.schema import ModelConfig, VLMConfig
from kdkit.errors import UserError
from kdkit.models.causal import (CausalLMStudent, FrozenCausalTeacher, _check_logits_config, _first_line, _head,
                                 _hidden, _reraise_oom, check_plain_logits, hf_model)
from kdkit.models.lm import _check_local, _dtype, _quantization

KIND = "vision_language"
VISION_ATTRS = ("visual", "vision_tower", "vision_model", "vision_encoder")
# the placeholder tokens a Qwen2-VL-style config names by id
TOKEN_IDS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
             "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}


# --------------------------------------------------------------------------------------------------- processor

class VLMProcessor:
    """A model's processor as kdkit's data pipeline uses it: `render(messages)` -> text with one image placeholder per
    image; `encode(text, images)` -> {"input_ids", "mm_token_type_ids"} (lists) and "pixel_values" /
    "image_grid_thw" tensors when there are images."""

    def __init__(self, tokenizer: Any, image_processor: Any, processor: Any = None, chat_template: str | None = None):
        self.processor, self.tokenizer, self.image_processor = processor, tokenizer, image_processor
        self.chat_template = chat_template or getattr(processor, "chat_template", None) or tokenizer.chat_template
        self.image_token = getattr(processor, "image_token", None) or getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    def set_pixels(self, min_pixels: Optional[int], max_pixels: Optional[int]) -> None:
        size = dict(getattr(self.image_processor, "size", None) or {})
        if min_pixels is not None:
            size["shortest_edge"] = min_pixels
        if max_pixels is not None:
            size["longest_edge"] = max_pixels
        if size:
            self.image_processor.size = size
        for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
            if value is not None and hasattr(self.image_processor, name):
                setattr(self.image_processor, name, value)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  chat_template=self.chat_template)

    def encode(self, text: str, images: list) -> dict[str, Any]:
        if self.processor is not None:
            enc = self.processor(text=[text], images=images or None, return_tensors="pt", add_special_tokens=False)
            ids = enc["input_ids"][0].tolist()
            out = {"input_ids": ids, "mm_token_type_ids": [int(t == self.image_token_id) for t in ids]}
            if images:
                out.update(pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"])
            return out
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"{len(pieces) - 1} image placeholders for {len(images)} images")
        out: dict[str, Any] = {}
        if images:
            feats = self.image_processor(images=images, return_tensors="pt")
            merge = int(getattr(self.image_processor, "merge_size", 1)) ** 2
            counts = (feats["image_grid_thw"].prod(-1) // merge).tolist()
            text = pieces[0] + "".join(self.image_token * n + p for n, p in zip(counts, pieces[1:]))
            out.update(pixel_values=feats["pixel_values"], image_grid_thw=feats["image_grid_thw"])
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        out.update(input_ids=ids, mm_token_type_ids=[int(t == self.image_token_id) for t in ids])
        return out

    def identity(self) -> str:
        """What decides how samples are encoded: vocabulary, template and image processing (to compare processors)."""
        from kdkit.data.text_tokens import tokenizer_fingerprint

        ip = self.image_processor.to_dict() if hasattr(self.image_processor, "to_dict") else {}
        ip = {k: v for k, v in ip.items() if k not in ("processor_class", "image_processor_type", "_processor_class")}
        return json.dumps([tokenizer_fingerprint(self.tokenizer), self.chat_template, ip], sort_keys=True, default=str)

    def save(self, out: Path) -> None:
        """tokenizer, image processor, chat template and processor_config.json: AutoProcessor.from_pretrained(out)
        works where the processor class loads (Qwen2-VL's needs torchvision), kdkit's fallback everywhere."""
        out = Path(out)
        self.tokenizer.save_pretrained(out)
        self.image_processor.save_pretrained(out)
        if self.chat_template:
            (out / "chat_template.jinja").write_text(self.chat_template)
        cls = type(self.processor).__name__ if self.processor is not None else _processor_class(self.image_processor)
        if cls and not (out / "processor_config.json").exists():
            (out / "processor_config.json").write_text(json.dumps({"processor_class": cls}, indent=2) + "\n")


def _processor_class(image_processor: Any) -> Optional[str]:
    name = type(image_processor).__name__.removesuffix("Pil").removesuffix("Fast")
    return name.replace("ImageProcessor", "Processor") if "ImageProcessor" in name else None


def processor_source(spec: ModelConfig, role: str) -> tuple[str, Optional[str], str] | None:
    if spec.tokenizer is not None:
        return spec.tokenizer, None, f"{role}.tokenizer"
    if spec.pretrained is not None:
        return spec.pretrained, spec.revision, f"{role}.pretrained"
    if spec.run is not None:
        return str(export_dir(spec.run, f"{role}.run")), None, f"{role}.run"
    base = (spec.hf_config or {}).get("base")
    return (str(base), None, f"{role}.hf_config.base") if base is not None else None


def load_processor(spec: ModelConfig, role: str, vlm: VLMConfig | None = None) -> VLMProcessor:
    """The processor of `spec` (see the module docstring), with vlm.min_pixels / max_pixels applied."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    where = f"{role}.tokenizer"
    found = processor_source(spec, role)
    if found is None:
        raise UserError(f"{where}: {role}.hf_config has no base to take a processor from; set {where} "
                        "(a processor's hub ID or directory: tokenizer, image processor and chat template)")
    source, revision, field = found
    _check_local(source, field)
    kw = {"revision": revision, "trust_remote_code": spec.trust_remote_code}
    try:
        hf_proc = AutoProcessor.from_pretrained(source, **kw)
        if getattr(hf_proc, "image_processor", None) is None or getattr(hf_proc, "tokenizer", None) is None:
            raise ValueError("not an image-text processor")
        proc = VLMProcessor(hf_proc.tokenizer, hf_proc.image_processor, hf_proc)
    except Exception as err:  # e.g. Qwen2-VL's video processor needs torchvision: assemble the parts
        _reraise_oom(err)
        try:
            proc = VLMProcessor(AutoTokenizer.from_pretrained(source, **kw), AutoImageProcessor.from_pretrained(source, **kw),
                                chat_template=_template_file(source))
        except Exception as err2:
            _reraise_oom(err2)
            raise UserError(f"{where}: cannot load a processor (tokenizer and image processor) from {source!r} "
                            f"({field}): {_first_line(err2)}") from None
        if not hasattr(proc.image_processor, "merge_size"):
            raise UserError(f"{where}: the processor of {source!r} does not load ({_first_line(err)}) and its image "
                            "processor is not Qwen2-VL-like (no merge_size) for kdkit to expand image tokens itself")
    if not proc.chat_template:
        raise UserError(f"{where}: the processor of {source!r} has no chat template")
    if proc.image_token_id is None or proc.image_token_id == proc.tokenizer.unk_token_id:
        raise UserError(f"{where}: the tokenizer of {source!r} has no image token {proc.image_token!r}")
    if vlm is not None:
        proc.set_pixels(vlm.min_pixels, vlm.max_pixels)
    return proc


def _template_file(source: str) -> Optional[str]:
    f = Path(source).expanduser() / "chat_template.jinja"
    return f.read_text() if f.is_file() else None


# --------------------------------------------------------------------------------------------------- models

def export_dir(path: str | Path, where: str) -> Path:
    from kdkit.models.build import read_export

    path, meta = read_export(path, where)
    if meta.get("kind") != KIND:
        raise UserError(f"{where}: {path} holds {meta.get('kind', 'an image classifier')}, not a vision-language model")
    return path


def _check_vlm_type(model_type: Any, where: str, trust_remote_code: bool = False, auto_map: Any = None) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as known

    if model_type in known or (trust_remote_code and auto_map and "AutoModelForImageTextToText" in auto_map):
        return
    close = difflib.get_close_matches(str(model_type), sorted(known), n=3)
    hint = f"did you mean {' or '.join(close)}?" if close else "e.g. qwen2_vl, qwen2_5_vl"
    raise UserError(f"{where}: transformers has no image-text-to-text model of model type {model_type!r}; {hint}")


def _token_overrides(model_type: str, overrides: dict, tokenizer: Any) -> dict:
    """vocab_size and the placeholder token ids from the processor's tokenizer, where the config leaves them."""
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(model_type).to_dict()
    text = dict(overrides.get("text_config") or {})
    text.setdefault("vocab_size", len(tokenizer))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        text.setdefault(name, getattr(tokenizer, name))
    overrides["text_config"] = text
    vocab = tokenizer.get_vocab()
    for name, token in TOKEN_IDS.items():
        if name in defaults and name not in overrides and token in vocab:
            overrides[name] = vocab[token]
    return overrides


def _from_config(spec: ModelConfig, role: str, processor: VLMProcessor | None):
    from transformers import AutoConfig, AutoModelForImageTextToText

    where = f"{role}.hf_config"
    overrides = dict(spec.hf_config)
    base = overrides.pop("base", None)
    try:
        if base is None:
            model_type = overrides.pop("model_type", None)
            if model_type is None:
                raise UserError(f"{where}: give model_type (e.g. qwen2_vl) or base")
            _check_vlm_type(model_type, f"{where}.model_type")
            if processor is not None:
                overrides = _token_overrides(model_type, overrides, processor.tokenizer)
            cfg = AutoConfig.for_model(model_type, **overrides)
        else:
            _check_local(str(base), f"{where}.base")
            cfg = AutoConfig.from_pretrained(base, trust_remote_code=spec.trust_remote_code, **overrides)
            _check_vlm_type(cfg.model_type, f"{where}.base", spec.trust_remote_code, getattr(cfg, "auto_map", None))
        _check_logits_config(cfg, where)
        return AutoModelForImageTextToText.from_config(cfg, dtype=_dtype(spec, role, random_init=True),
                                                       trust_remote_code=spec.trust_remote_code)
    except UserError:
        raise
    except Exception as err:
        _reraise_oom(err)
        raise UserError(f"{where}: cannot build the model: {_first_line(err)}") from None


def _from_pretrained(source: str, spec: ModelConfig, role: str, where: str, device: Any, **quant):
    from transformers import AutoConfig, AutoModelForImageTextToText

    _check_local(source, where)
    kw = {"revision": spec.revision if spec.pretrained else None, "trust_remote_code": spec.trust_remote_code}
    try:
        cfg = AutoConfig.from_pretrained(source, **kw)
    except Exception as err:
        _reraise_oom(err)
        raise UserError(f"{where}: cannot load {source!r}: {_first_line(err)}") from None
    _check_vlm_type(cfg.model_type, where, spec.trust_remote_code, getattr(cfg, "auto_map", None))
    _check_logits_config(cfg, where)
    try:
        return AutoModelForImageTextToText.from_pretrained(source, dtype=_dtype(spec, role), **kw, **quant)
    except Exception as err:
        _reraise_oom(err)
        raise UserError(f"{where}: cannot load the model in {source!r}: {_first_line(err)}") from None


def load_vlm_export(path: str | Path, *, where: str = "run", dtype: Any = "auto", **kwargs):
    """Load what `save_vlm` wrote (a run directory or its student/ directory), LoRA adapters merged."""
    from transformers import AutoModelForImageTextToText

    path = export_dir(path, where)
    meta = json.loads((path / "kdkit.json").read_text())
    try:
        if meta.get("format") != "adapter":
            return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **kwargs)
        from peft import PeftModel

        base_info = meta.get("base") or {}
        base_src = str(path / base_info["dir"]) if "dir" in base_info else base_info["pretrained"]
        base = AutoModelForImageTextToText.from_pretrained(base_src, dtype=dtype, **kwargs)
        return PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    except Exception as err:
        _reraise_oom(err)
        raise UserError(f"{where}: cannot load the model in {path}: {_first_line(err)}") from None


def build_vlm(spec: ModelConfig, role: str = "student", *, processor: VLMProcessor | None = None, device: Any = None,
              check_logits: bool = True):
    """A teacher or student vision-language model (a transformers PreTrainedModel, on the CPU unless quantized).
    quantization (8bit / 4bit, bitsandbytes) needs CUDA and is refused elsewhere with a UserError, as for LMs."""
    if spec.factory is not None:
        raise UserError(f"{role}.factory: task vlm builds models from pretrained, hf_config or run")
    quant = _quantization(spec, role, device)  # refuses random weights and CPU-only machines first
    if spec.pretrained is not None:
        model = _from_pretrained(spec.pretrained, spec, role, f"{role}.pretrained", device, **quant)
        model._kdkit_source = {"pretrained": spec.pretrained, "revision": spec.revision,
                               "trust_remote_code": spec.trust_remote_code}
    elif spec.run is not None:
        path = export_dir(spec.run, f"{role}.run")
        model = load_vlm_export(path, where=f"{role}.run", dtype=_dtype(spec, role), **quant)
        model._kdkit_source = {"pretrained": str(path.resolve()), "revision": None, "trust_remote_code": False}
    else:
        model = _from_config(spec, role, processor)
        model._kdkit_source = None
    if spec.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if check_logits:
        field = "pretrained" if spec.pretrained is not None else "run" if spec.run is not None else "hf_config"
        check_plain_logits(model, f"{role}.{field}")
    return model


def vision_tower(hf: nn.Module) -> nn.Module:
    """The vision encoder of a vision-language model (Qwen2-VL: model.visual)."""
    for owner in (getattr(hf, "base_model", hf), hf):
        for name in VISION_ATTRS:
            module = getattr(owner, name, None)
            if isinstance(module, nn.Module):
                return module
    raise UserError(f"{type(hf).__name__}: no vision tower found (looked for {', '.join(VISION_ATTRS)})")


def _features(output: Any) -> torch.Tensor:
    """The tokens a vision tower hands the language model: pooler_output (Qwen2-VL: after the merger)."""
    for name in ("pooler_output", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return output[0] if isinstance(output, (tuple, list)) else output


class _Capture:
    """A forward hook keeping a vision tower's last output tokens (N, D)."""

    def __init__(self, module: nn.Module):
        self.value: Optional[torch.Tensor] = None
        module.register_forward_hook(self)

    def __call__(self, module, args, output) -> None:
        self.value = _features(output)


class VLMStudent(CausalLMStudent):
    """CausalLMStudent for vision-language models: `forward(input_ids, attention_mask, pixel_values=...,
    image_grid_thw=..., mm_token_type_ids=...)` -> the language model's last hidden state; `head_weight`.
    With `projector_to` (the teacher's vision feature width) it holds a linear projector from the student's vision
    features to the teacher's, trained with it, and `vision_features` holds the last forward's (N, D) tokens."""

    def __init__(self, lm: nn.Module, *, freeze_vision: bool = False, projector_to: Optional[int] = None):
        super().__init__(lm)
        tower = vision_tower(self.hf)
        if freeze_vision:
            tower.requires_grad_(False)
        self._capture = _Capture(tower) if projector_to else None
        self.projector = None
        if projector_to:
            width = self.hf.config.get_text_config().hidden_size
            self.projector = nn.Linear(width, projector_to)

    @property
    def vision_features(self) -> Optional[torch.Tensor]:
        return None if self._capture is None else self._capture.value


class FrozenVLMTeacher(FrozenCausalTeacher):
    """The frozen vision-language teacher: call(input_ids, attention_mask, **vision inputs) -> (hidden, head weight);
    `vision_features` holds the last call's vision tokens when `capture_vision`."""

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu", *, capture_vision: bool = False):
        super().__init__(model, device)
        self._capture = _Capture(vision_tower(self.model)) if capture_vision else None

    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **vision):
        dev = self.device
        vision = {k: v.to(dev) for k, v in vision.items() if v is not None}
        with torch.inference_mode():
            hidden = _hidden(self.model, input_ids.to(dev), None if attention_mask is None else attention_mask.to(dev),
                             **vision)
        with torch.no_grad():
            weight = _head(self.model).weight.detach()
        return hidden.clone(), weight

    @property
    def vision_features(self) -> Optional[torch.Tensor]:
        return None if self._capture is None or self._capture.value is None else self._capture.value.clone()

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)


def save_vlm(model: nn.Module, processor: VLMProcessor, out_dir: str | Path, *, lora_export: str = "merged") -> Path:
    """student/: save_pretrained layout with its processor (LoRA merged, or the adapter), and kdkit.json."""
    from kdkit.models.lora import save_causal_lm

    lm = model.lm if isinstance(model, CausalLMStudent) else model
    out = save_causal_lm(lm, None, out_dir, lora_export=lora_export,
                         meta={"kind": KIND, "tokenizer_len": len(processor.tokenizer),
                               "vocab_rows": int(_head(hf_model(lm)).weight.shape[0])})
    processor.save(out)
    return out
