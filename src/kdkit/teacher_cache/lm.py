"""Language-model teacher caches: per labelled position, the top-k log-probabilities at the distillation temperature,
their token ids (in the student's vocabulary: the aligned head rows) and the log of the remaining mass.

A shard holds, for its samples in dataset order: "offsets" int64 (n + 1,) into the positions; "ids" (P, k) int16
(id - 32768, for vocabularies up to 65536 rows) or int32; "logp" float16 (P, k); "log_rest" float32 (P,); with
`cache.tail_samples` = s > 0 also "tail_ids" (P, s), token ids drawn from the teacher's distribution outside the top-k
(same int16/int32 form), and "tail_negent" float32 (P,), that tail's negative entropy: together they make forward KL
unbiased (kdkit.losses.sparse). The draws are seeded by the shard's first sample, so a cache is the same however many
processes write it. The positions of a sample are those whose next-token target is labelled, in order: exactly the
rows the fused losses keep, so a batch's cached rows line up with its labelled positions. Bytes per token:
4 k + 2 s + 8 for vocabularies up to 65536 rows (the default k = 64, s = 16: 296), 6 k + 4 s + 8 above.
"""

from __future__ import annotations

import torch

from kdkit.distill.lm import next_token_targets
from kdkit.errors import DataError, UserError
from kdkit.losses.sparse import sample_tail, topk_log_probs

SHIFT = 32768  # int16 holds id - SHIFT for ids below 65536


def kd_temperature(cfg) -> float:
    """The one temperature of the config's KD terms (a cache stores log-probabilities taken at it)."""
    temps = {t.temperature or cfg.distill.temperature for t in cfg.distill.terms if t.kind == "kd"}
    if len(temps) > 1:
        raise UserError(f"distill.terms: a teacher cache stores one temperature; the kd terms use {sorted(temps)}")
    return temps.pop() if temps else cfg.distill.temperature


def settings(cfg, vocab_rows: int) -> dict:
    k = min(cfg.cache.top_k, vocab_rows)
    forward = any(t.kind == "kd" and t.divergence == "forward_kl" for t in cfg.distill.terms)
    return {"top_k": k, "tail_samples": cfg.cache.tail_samples if forward and k < vocab_rows else 0,
            "temperature": kd_temperature(cfg), "vocab_rows": int(vocab_rows), "max_length": cfg.data.text.max_length}


def _to_store(ids: torch.Tensor, vocab_rows: int) -> torch.Tensor:
    return (ids - SHIFT).to(torch.int16) if vocab_rows <= 2 * SHIFT else ids.to(torch.int32)


def _from_store(x: torch.Tensor) -> torch.Tensor:
    return x.long() + SHIFT if x.dtype == torch.int16 else x.long()


@torch.no_grad()
def compute_shard(teacher, dataset, start: int, end: int, *, k: int, temperature: float, vocab_rows: int,
                  batch_size: int, device, tail_samples: int = 0, chunk_rows: int = 1024,
                  advance=lambda n: None) -> tuple[dict, int]:
    """The shard tensors of samples [start, end) of `dataset` (a TextDataset) and its number of positions."""
    counts, ids_out, logp_out, rest_out, tail_out, negent_out = [], [], [], [], [], []
    generator = torch.Generator(device).manual_seed(1_000_003 * start + 17)
    for a in range(start, end, batch_size):
        index = torch.arange(a, min(a + batch_size, end))
        batch = dataset.get_batch(index)
        target = next_token_targets(batch["labels"])  # (B, L)
        keep = target != -100
        hidden, head = teacher(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        rows = hidden[keep.to(hidden.device)]  # (K, H), row-major: sample by sample, position by position
        head = head[:vocab_rows]
        for c in range(0, rows.shape[0], chunk_rows):
            logits = rows[c:c + chunk_rows] @ head.T
            tid, lp, rest = topk_log_probs(logits, k, temperature)
            if tail_samples:
                log_p = torch.log_softmax(logits.float() / temperature, -1)
                drawn, negent = sample_tail(log_p, tid, rest.float(), tail_samples, generator)
                tail_out.append(drawn.cpu())
                negent_out.append(negent.cpu())
            ids_out.append(tid.cpu())
            logp_out.append(lp.to(torch.float16).cpu())
            rest_out.append(rest.float().cpu())
        counts.append(keep.sum(1))
        advance(len(index))
    counts = torch.cat(counts) if counts else torch.zeros(0, dtype=torch.int64)
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    ids = torch.cat(ids_out) if ids_out else torch.zeros(0, k, dtype=torch.int64)
    logp = torch.cat(logp_out) if logp_out else torch.zeros(0, k, dtype=torch.float16)
    rest = torch.cat(rest_out) if rest_out else torch.zeros(0)
    out = {"offsets": offsets, "ids": _to_store(ids, vocab_rows), "logp": logp, "log_rest": rest}
    if tail_samples:
        tail = torch.cat(tail_out) if tail_out else torch.zeros(0, tail_samples, dtype=torch.int64)
        out["tail_ids"] = _to_store(tail, vocab_rows)
        out["tail_negent"] = torch.cat(negent_out) if negent_out else torch.zeros(0)
    return out, int(offsets[-1])


class CachedLMTeacher:
    """Stands in for the teacher when training from a cache: the sparse teacher rows of a batch's samples."""

    cached = True

    def __init__(self, reader, settings: dict):
        self.reader, self.settings = reader, settings
        self.vocab_rows, self.temperature = settings["vocab_rows"], settings["temperature"]

    def rows(self, index: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(ids int64 (K, k), log-probs float32 (K, k), log rest float32 (K,)) of samples `index` in order, then the
        sampled tail (ids int64 (K, s), negative entropy (K,)) when the cache has one; DataError when a sample's
        labelled positions are not the cached ones (the data changed under the cache)."""
        tail = bool(self.settings.get("tail_samples"))
        parts = [[] for _ in range(5 if tail else 3)]
        for i, n in zip(index.tolist(), counts.tolist()):
            shard, j = self.reader.locate(int(i))
            a, b = int(shard["offsets"][j]), int(shard["offsets"][j + 1])
            if b - a != n:
                raise DataError(f"{self.reader.dir}: training sample {i} has {n} labelled positions but the cache "
                                f"holds {b - a}; make the cache again for this data")
            parts[0].append(_from_store(shard.rows("ids", a, b)))
            parts[1].append(shard.rows("logp", a, b).float())
            parts[2].append(shard.rows("log_rest", a, b))
            if tail:
                parts[3].append(_from_store(shard.rows("tail_ids", a, b)))
                parts[4].append(shard.rows("tail_negent", a, b))
        return tuple(torch.cat(p) for p in parts)
