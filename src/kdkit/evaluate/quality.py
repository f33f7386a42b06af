"""Classification quality: accuracy, top-k, cross-entropy and agreement with a reference (the teacher)."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.errors import DataError

# Columns of the per-sample statistics tensor gathered across processes.
_CORRECT1, _CORRECT5, _LOSS, _AGREE = range(4)


def _logits(out: Any) -> Tensor:
    """Accept bare logits, a Hugging Face output (`.logits`) or a dict with "logits"."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(f"model returned {type(out).__name__}; expected logits (B, C)")


def _eval_modes(*models: Any) -> list[tuple[nn.Module, bool]]:
    """Put every nn.Module in eval mode, remembering each submodule's own flag so it can be restored exactly."""
    saved = []
    for m in models:
        if isinstance(m, nn.Module):
            saved += [(sub, sub.training) for sub in m.modules()]
            m.eval()
    return saved


def _progress(loader: Iterable, enabled: bool):
    if not enabled:
        yield from loader
        return
    from rich.progress import track  # imported lazily: quiet evaluation never needs rich

    total = len(loader) if hasattr(loader, "__len__") else None
    yield from track(loader, description="evaluating", total=total, transient=True)


@torch.inference_mode()
def classification_quality(model: Callable[[Tensor], Tensor], loader: Iterable[dict], device: Any = None, *,
                           reference: Callable[[Tensor], Tensor] | None = None, progress: bool = False,
                           gather: Callable[[Tensor], Tensor] | None = None,
                           reduce: Callable[[Tensor], Tensor] | None = None) -> dict:
    """Evaluate a classifier over `loader`.

    Batches are dicts with "pixels" (B, C, H, W) and "labels" (B,); they are moved to `device` (None: left where
    they are). Returns {"accuracy", "top5", "loss", "samples"} plus "agreement" when `reference` is given:
    accuracies and agreement are percentages rounded to 4 decimals, "top5" is top-min(5, C), "loss" the mean
    cross-entropy (computed in float32).

    `gather` (e.g. `accelerator.gather_for_metrics`) is applied once per batch to a per-sample (B, 4) tensor of
    [correct@1, correct@k, loss, agree]. Per-sample rather than per-batch sums on purpose: gather_for_metrics
    drops the samples a distributed sampler duplicated to pad the last batch, which it can only do along the
    sample dimension, so the totals then count every sample exactly once. `reduce` (e.g. a sum over processes
    that each evaluated a disjoint shard) is applied once to the float64 totals instead.
    """
    saved = _eval_modes(model, reference)
    totals: Tensor | None = None
    try:
        for batch in _progress(loader, progress):
            pixels, labels = batch["pixels"], batch["labels"]
            if device is not None:
                pixels = pixels.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
            # float32 so half-precision logits don't lose the loss's small differences
            logits = _logits(model(pixels)).float()
            k = min(5, logits.shape[-1])
            stats = torch.zeros(labels.shape[0], 4, device=logits.device, dtype=torch.float32)
            pred = logits.argmax(-1)
            stats[:, _CORRECT1] = (pred == labels).float()
            stats[:, _CORRECT5] = (logits.topk(k, dim=-1).indices == labels[:, None]).any(-1).float()
            stats[:, _LOSS] = F.cross_entropy(logits, labels, reduction="none")
            if reference is not None:
                ref = _logits(reference(pixels)).to(logits.device)
                stats[:, _AGREE] = (ref.argmax(-1) == pred).float()
            if gather is not None:
                stats = gather(stats)
            # Summed on the device in float64: exact counts, and no host sync per batch.
            batch_sum = torch.cat([stats.double().sum(0), stats.new_tensor([stats.shape[0]], dtype=torch.float64)])
            totals = batch_sum if totals is None else totals + batch_sum
    finally:
        for sub, training in saved:
            sub.training = training

    if reduce is not None:
        totals = reduce(totals if totals is not None else torch.zeros(5, dtype=torch.float64, device=device))
    if totals is None or totals[-1].item() == 0:
        raise DataError("the evaluation data yielded no samples (check the split sizes and data.limit_eval)")
    c1, c5, loss_sum, agree, n = totals.tolist()
    out = {"accuracy": round(100.0 * c1 / n, 4), "top5": round(100.0 * c5 / n, 4),
           "loss": round(loss_sum / n, 6), "samples": int(n)}
    if reference is not None:
        out["agreement"] = round(100.0 * agree / n, 4)
    return out
