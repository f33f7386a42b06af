"""Causal LMs as the fused losses see them: the base model's last hidden state and the output head's weight.

`CausalLMStudent` is the module the trainer prepares (DDP-wraps); `FrozenCausalTeacher` is the teacher, held apart
from it. Both work through a peft wrapper, and a biased head (Phi) rides as an extra weight column against a
constant 1 in the hidden state, so `hidden @ head_weight.T` are always the model's logits.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from kdkit.errors import UserError

KDKIT_JSON = "kdkit.json"

# Config attributes that change logits after the head, with the value that leaves them alone (None: absent/off).
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,  # Gemma 2/3: tanh soft-capping
    "logits_soft_cap": None,  # RecurrentGemma
    "logit_scale": 1.0,  # Cohere: logits * logit_scale
    "logits_scaling": 1.0,  # Granite: logits / logits_scaling
    "output_multiplier": 1.0,
}


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {(text[0] if text else '')[:limit]}"


def _reraise_oom(err: BaseException) -> None:
    if isinstance(err, (torch.OutOfMemoryError, MemoryError, KeyboardInterrupt)):
        raise err


def _check_logits_config(cfg: Any, where: str) -> None:
    """UserError when the config says logits are transformed after the head (the fused losses need plain ones)."""
    configs = [cfg]
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if text is not cfg:
        configs.append(text)
    for c in configs:
        for attr, neutral in _LOGIT_TRANSFORMS.items():
            value = getattr(c, attr, None)
            if value is None or value == neutral or (neutral is None and value == 0):
                continue
            raise UserError(
                f"{where}: {getattr(cfg, 'model_type', 'this model')} transforms its logits after the output head "
                f"({attr}: {value}); kdkit's fused losses compute logits as last_hidden_state @ lm_head.weight.T, "
                "so they need a model with plain logits (e.g. Qwen2, Llama, Mistral, Phi, GPT-2)")


# --------------------------------------------------------------------------------------------------- the student

def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model under a CausalLMStudent and/or a peft wrapper (LoRA layers stay injected)."""
    if isinstance(model, CausalLMStudent):
        model = model.lm
    return model.get_base_model() if is_peft_model(model) else model


def _decoder(hf: nn.Module) -> nn.Module:
    """The module whose last_hidden_state the causal LM feeds its head (Qwen2Model, LlamaModel, GPT2Model, ...)."""
    base = getattr(hf, "base_model", hf)
    if base is hf:
        raise ValueError(f"{type(hf).__name__} has no separate base model (base_model_prefix "
                         f"{getattr(hf, 'base_model_prefix', '')!r}); cannot take its hidden states without logits")
    return base


def _head(hf: nn.Module) -> nn.Module:
    head = hf.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(hf).__name__} has no output embedding (lm_head) weight")
    return head


def _head_weight(hf: nn.Module) -> torch.Tensor:
    head = _head(hf)
    bias = getattr(head, "bias", None)
    if bias is None:
        return head.weight
    # A biased head (Phi-1/2): the bias is the weight's last column, the hidden states carry a trailing 1.
    return torch.cat([head.weight, bias.to(head.weight.dtype).unsqueeze(1)], dim=1)


def _hidden(hf: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], **kwargs) -> torch.Tensor:
    out = _decoder(hf)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if getattr(_head(hf), "bias", None) is not None:
        hidden = torch.cat([hidden, hidden.new_ones(*hidden.shape[:-1], 1)], dim=-1)
    return hidden


class CausalLMStudent(nn.Module):
    """A causal LM (or a peft model of one) as the trainer sees it: hidden states in, no logits.

    `forward(input_ids, attention_mask)` runs the base model (the decoder without the head) and returns the last
    hidden state (B, L, H); `head_weight` is the output embedding (V, H), so `hidden @ head_weight.T` are the
    model's logits (with a biased head, H is hidden_size + 1: the bias rides as the weight's last column against a
    constant 1). `lm` is the wrapped model, for generation and export. The trainer prepares (DDP-wraps) this module;
    the loss reads `head_weight` from the unwrapped one."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        hf = hf_model(lm)
        _decoder(hf), _head(hf)  # fail now, not at the first step

    @property
    def hf(self) -> nn.Module:
        """The transformers model (under any peft wrapper)."""
        return hf_model(self.lm)

    @property
    def head_weight(self) -> torch.Tensor:
        return _head_weight(self.hf)

    @property
    def vocab_rows(self) -> int:
        return int(_head(self.hf).weight.shape[0])

    @property
    def device(self) -> torch.device:
        return _head(self.hf).weight.device

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        return _hidden(self.hf, input_ids, attention_mask, **kwargs)


def teacher_hidden(model: nn.Module, input_ids: torch.Tensor,
                   attention_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden state (B, L, H), head weight (V, H)) of a frozen teacher, computed under inference mode.

    The hidden states are cloned outside inference mode (they can meet the student's autograd graph); the head
    weight is the parameter itself, detached (with a biased head, a concatenated copy)."""
    hf = hf_model(model)
    device = _head(hf).weight.device
    with torch.inference_mode():
        hidden = _hidden(hf, input_ids.to(device), None if attention_mask is None else attention_mask.to(device))
    hidden = hidden.clone()
    with torch.no_grad():
        weight = _head_weight(hf).detach()
    return hidden, weight


def _is_quantized(hf: nn.Module) -> bool:
    return bool(getattr(hf, "is_quantized", False) or getattr(hf, "hf_quantizer", None) is not None
                or getattr(hf, "is_loaded_in_4bit", False) or getattr(hf, "is_loaded_in_8bit", False))


class FrozenCausalTeacher:
    """FrozenTeacher for causal LMs: eval mode, no gradients, never prepared; call -> (hidden, head_weight)."""

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu"):
        hf = hf_model(model)
        if not _is_quantized(hf):  # bitsandbytes models sit where they were loaded and refuse .to()
            hf = hf.to(device)
        self.model = hf.eval().requires_grad_(False)
        self.device = _head(hf).weight.device

    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
        return teacher_hidden(self.model, input_ids, attention_mask)

    @property
    def vocab_rows(self) -> int:
        return int(_head(self.model).weight.shape[0])


def check_plain_logits(model: nn.Module, where: str = "model", tokens: int = 8) -> None:
    """UserError unless `hidden @ head_weight.T` reproduces the model's logits (one no-grad forward on `tokens`
    fixed ids, eval mode; no random numbers are drawn)."""
    hf = hf_model(model)
    _check_logits_config(hf.config, where)
    try:
        head = _head(hf)
        _decoder(hf)
    except ValueError as err:
        raise UserError(f"{where}: {err}") from None
    rows = head.weight.shape[0]
    device = head.weight.device
    ids = (torch.arange(tokens, device=device) % rows).unsqueeze(0)
    mask = torch.ones_like(ids)
    was_training = hf.training
    hf.eval()
    try:
        with torch.no_grad():
            logits = hf(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            mine = _hidden(hf, ids, mask).float() @ _head_weight(hf).float().T
    except Exception as err:
        _reraise_oom(err)
        raise UserError(f"{where}: a forward pass on {tokens} tokens failed: {_first_line(err)}") from None
    finally:
        hf.train(was_training)
    if mine.shape != logits.shape:
        raise UserError(f"{where}: the model's logits have shape {tuple(logits.shape)} but its head gives "
                        f"{tuple(mine.shape)}; kdkit's fused losses need logits = lm_head(last hidden state)")
    tol = 1e-4 if head.weight.dtype == torch.float32 and not _is_quantized(hf) else 3e-2
    err = (mine - logits).abs().max().item()
    scale = max(1.0, logits.abs().max().item())
    if not err <= tol * scale:
        raise UserError(f"{where}: the model's logits differ from lm_head(last hidden state) by {err:.3g}; kdkit's "
                        "fused losses compute logits as hidden @ lm_head.weight.T and need a model with plain logits")
