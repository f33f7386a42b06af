"""Teacher fidelity: how far a language-model teacher loaded in reduced form (8-bit, 4-bit, float16, bfloat16) is
from a float32 copy of itself.

`check_teacher_fidelity` builds the float32 copy from the same source (on the teacher's device, or on the CPU where
it does not fit there), compares the two on the first `fidelity_batches` batches of the validation split, prints one
line and frees the copy. `teacher_fidelity` is the comparison: the per-token KL(float32 || teacher) at T=1 on the
label positions (mean and max, nats) and how often both put the same token first. Logits are formed a chunk of
positions at a time, each model's on its own device, so neither the logits of all positions nor both heads on one
device are ever needed.
"""

from __future__ import annotations

import gc
import itertools
import math
import os
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.config.schema import ModelConfig
from kdkit.distill.lm import next_token_targets
from kdkit.losses.divergence import kl_from_log_probs
from kdkit.losses.fused import CHUNK_ELEMENTS, MIN_CHUNK_ROWS
from kdkit.data import make_loader
from kdkit.models.causal import FrozenCausalTeacher, _first_line
from kdkit.models.lm import build_causal_lm

HiddenFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (ids, mask) -> (hidden (B, L, H), head (V, H))

# Beyond its weights, the copy needs room for one evaluation batch's activations and a chunk of logits.
_HEADROOM = 1.1
_SLACK_BYTES = 1 << 28


def reduced_form(spec: ModelConfig) -> Optional[str]:
    """'8bit' or '4bit' (quantization), 'float16' or 'bfloat16' (dtype), or None for a teacher in full form."""
    if spec.quantization is not None:
        return spec.quantization
    return spec.dtype if spec.dtype in ("float16", "bfloat16") else None


def reference_spec(spec: ModelConfig) -> ModelConfig:
    """The same teacher (same source, revision, tokenizer), unquantized, in float32."""
    return spec.model_copy(update={"quantization": None, "dtype": "float32", "gradient_checkpointing": False})


@torch.no_grad()
def teacher_fidelity(teacher_fn: HiddenFn, reference_fn: HiddenFn, loader: Iterable[dict[str, Tensor]],
                     device: torch.device | str, batches: int, *, chunk_size: Optional[int] = None) -> dict[str, Any]:
    """{"kl", "kl_max", "top1", "tokens", "batches"} over the first `batches` batches of `loader`.

    kl / kl_max: mean / largest per-token KL(reference || teacher) at T=1 in nats; top1: the fraction of positions
    where both argmaxes agree. Positions are those whose next-token target (labels shifted, -100 skipped) counts.
    Batches go to `device`; each function's hidden states meet its own head weight on that weight's device, and the
    reference's log-probs move to the teacher's. kl and top1 are NaN when no position counts."""
    kl_sum, kl_max, agree, tokens, used = 0.0, 0.0, 0, 0, 0
    for batch in itertools.islice(loader, batches):
        used += 1
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        keep = (next_token_targets(batch["labels"].to(device)) != -100).reshape(-1)  # (B*L,)
        if not bool(keep.any()):
            continue
        t_hidden, t_head = teacher_fn(ids, mask)
        r_hidden, r_head = reference_fn(ids, mask)
        t_rows = t_hidden.reshape(-1, t_hidden.shape[-1])[keep.to(t_hidden.device)]  # (N, H)
        r_rows = r_hidden.reshape(-1, r_hidden.shape[-1])[keep.to(r_hidden.device)]  # (N, H_r)
        chunk = chunk_size or max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(int(t_head.shape[0]), 1))
        for start in range(0, t_rows.shape[0], chunk):
            log_t = F.log_softmax((t_rows[start:start + chunk] @ t_head.T).float(), -1)  # (C, V)
            log_r = F.log_softmax((r_rows[start:start + chunk] @ r_head.T).float(), -1).to(log_t.device)
            kl = kl_from_log_probs(log_r, log_t)  # (C,)
            kl_sum += float(kl.double().sum())
            kl_max = max(kl_max, float(kl.max()))
            agree += int((log_t.argmax(-1) == log_r.argmax(-1)).sum())
            tokens += int(kl.shape[0])
            del log_t, log_r, kl
    return {"kl": kl_sum / tokens if tokens else math.nan, "kl_max": kl_max,
            "top1": agree / tokens if tokens else math.nan, "tokens": tokens, "batches": used}


def reference_device(nbytes: int, device: torch.device) -> tuple[Optional[torch.device], str]:
    """Where a float32 copy of `nbytes` goes: `device` when it is a GPU with room for it, else the CPU; None and
    the reason when RAM, which the copy is loaded through, has no room for it in every process on this machine."""
    import psutil

    need = nbytes * _HEADROOM + _SLACK_BYTES
    procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    ram = psutil.virtual_memory().available
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    if need * procs > ram:
        per = f" to {procs} processes" if procs > 1 else ""
        gpu = f"; GPU memory: {_gb(free)} free" if device.type == "cuda" else ""
        return None, (f"a float32 copy of the teacher ({_gb(nbytes)}) does not fit in RAM ({_gb(ram)} available{per})"
                      + gpu)
    return (device if device.type == "cuda" and need <= free else torch.device("cpu")), ""


def check_teacher_fidelity(spec: ModelConfig, teacher, data, *, batch_size: int, seed: int) -> dict[str, float]:
    """Compare `teacher` (a FrozenCausalTeacher built from `spec`) with a float32 copy on the first
    spec.fidelity_batches batches of data.val (data.test without one; the teacher's own tokenization where it has
    one), print one line on the main process and return {"fidelity_kl", "fidelity_kl_max", "fidelity_top1"}.

    {} (nothing printed) when the teacher is in full form or fidelity_batches is 0; {} and one line saying why when
    the copy fits nowhere or runs out of memory. The global random state is left as it was."""
    form = reduced_form(spec)
    dataset = data.val if data.val is not None and len(data.val) > 0 else data.test
    if getattr(dataset, "teacher", None) is not None:  # different tokenizers: the teacher reads its own tokens
        dataset = dataset.teacher
    if form is None or spec.fidelity_batches == 0 or len(dataset) == 0:
        return {}
    hf = teacher.model
    params = hf.num_parameters() if hasattr(hf, "num_parameters") else sum(p.numel() for p in hf.parameters())
    place, why = reference_device(4 * params, teacher.device)
    if place is None:
        _say(f"teacher fidelity: skipped: {why}")
        return {}
    loader = make_loader(dataset, batch_size=batch_size, shuffle=False, seed=seed)
    cuda = [teacher.device.index or 0] if teacher.device.type == "cuda" else []  # place is this or the CPU
    reference = None
    try:
        with torch.random.fork_rng(devices=cuda):
            reference = FrozenCausalTeacher(build_causal_lm(reference_spec(spec), "teacher", check_logits=False), place)
            out = teacher_fidelity(teacher, reference, loader, teacher.device, spec.fidelity_batches)
    except (torch.OutOfMemoryError, MemoryError) as err:
        _say(f"teacher fidelity: skipped: a float32 copy of the teacher ({_gb(4 * params)}) ran out of memory on "
             f"{place}: {_first_line(err)}")
        return {}
    finally:
        del reference
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    if out["tokens"] == 0:
        _say(f"teacher fidelity: skipped: no labelled tokens in the first {out['batches']} evaluation batches")
        return {}
    _say(f"teacher fidelity: KL(float32 || {form} teacher) = {out['kl']:.3g} nats/token (max {out['kl_max']:.3g}) "
         f"over {out['batches']} batch{'es' if out['batches'] != 1 else ''}, {out['tokens']:,} tokens; "
         f"top-1 agreement {100 * out['top1']:.1f}%" + ("" if place == teacher.device else f" (the copy on {place})"))
    return {"fidelity_kl": _sig(out["kl"]), "fidelity_kl_max": _sig(out["kl_max"]),
            "fidelity_top1": round(out["top1"], 6)}


def _sig(x: float) -> float:
    """4 significant digits: a near-lossless teacher's KL can be below 1e-6, which rounding to decimals makes 0."""
    return float(f"{x:.4g}")


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def _say(line: str) -> None:
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(line, flush=True)
