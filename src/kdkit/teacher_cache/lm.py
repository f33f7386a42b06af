"""Language-model teacher caches: per labelled position, the top-k log-probabilities at the distillation temperature,
their token ids (in the student's vocabulary: the aligned head rows) and the log of the remaining mass.

A shard holds, for its samples in dataset order: "offsets" int64 (n + 1,) into the positions; "ids" (P, k) int16
(id - 32768, for vocabularies up to 65536 rows) or int32; "logp" float16 (P, k); "log_rest" float32 (P,). The
positions of a sample are those whose next-token target is labelled, in order: exactly the rows the fused losses
keep, so a batch's cached rows line up with its labelled positions. With k = 64 that is 4 k + 4 = 260 bytes per
token for vocabularies up to 65536 rows, 6 k + 4 = 388 above.
"""

from __future__ import annotations

import torch

from kdkit.distill.lm import next_token_targets
from kdkit.errors import DataError, UserError
from kdkit.losses.sparse import topk_log_probs

SHIFT = 32768  # int16 holds id - SHIFT for ids below 65536


def kd_temperature(cfg) -> float:
    """The one temperature of the config's KD terms (a cache stores log-probabilities taken at it)."""
    temps = {t.temperature or cfg.distill.temperature for t in cfg.distill.terms if t.kind == "kd"}
    if len(temps) > 1:
        raise UserError(f"distill.terms: a teacher cache stores one temperature; the kd terms use {sorted(temps)}")
    return temps.pop() if temps else cfg.distill.temperature


def settings(cfg, vocab_rows: int) -> dict:
    return {"top_k": min(cfg.cache.top_k, vocab_rows), "temperature": kd_temperature(cfg), "vocab_rows": int(vocab_rows),
            "max_length": cfg.data.text.max_length}


@torch.no_grad()
def compute_shard(teacher, dataset, start: int, end: int, *, k: int, temperature: float, vocab_rows: int,
                  batch_size: int, device, chunk_rows: int = 1024, advance=lambda n: None) -> tuple[dict, int]:
    """The shard tensors of samples [start, end) of `dataset` (a TextDataset) and its number of positions."""
    counts, ids_out, logp_out, rest_out = [], [], [], []
    for a in range(start, end, batch_size):
        index = torch.arange(a, min(a + batch_size, end))
        batch = dataset.get_batch(index)
        target = next_token_targets(batch["labels"])  # (B, L)
        keep = target != -100
        hidden, head = teacher(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        rows = hidden[keep.to(hidden.device)]  # (K, H), row-major: sample by sample, position by position
        head = head[:vocab_rows]
        for c in range(0, rows.shape[0], chunk_rows):
            tid, lp, rest = topk_log_probs(rows[c:c + chunk_rows] @ head.T, k, temperature)
            ids_out.append(tid.cpu())
            logp_out.append(lp.to(torch.float16).cpu())
            rest_out.append(rest.float().cpu())
        counts.append(keep.sum(1))
        advance(len(index))
    counts = torch.cat(counts) if counts else torch.zeros(0, dtype=torch.int64)
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    ids = torch.cat(ids_out) if ids_out else torch.zeros(0, k, dtype=torch.int64)
    ids = (ids - SHIFT).to(torch.int16) if vocab_rows <= 2 * SHIFT else ids.to(torch.int32)
    logp = torch.cat(logp_out) if logp_out else torch.zeros(0, k, dtype=torch.float16)
    rest = torch.cat(rest_out) if rest_out else torch.zeros(0)
    return {"offsets": offsets, "ids": ids, "logp": logp, "log_rest": rest}, int(offsets[-1])


class CachedLMTeacher:
    """Stands in for the teacher when training from a cache: the sparse teacher rows of a batch's samples."""

    cached = True

    def __init__(self, reader, settings: dict):
        self.reader, self.settings = reader, settings
        self.vocab_rows, self.temperature = settings["vocab_rows"], settings["temperature"]

    def rows(self, index: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids int64 (K, k), log-probs float32 (K, k), log rest float32 (K,)) of samples `index` in order;
        DataError when a sample's labelled positions are not the cached ones (the data changed under the cache)."""
        ids, logp, rest = [], [], []
        for i, n in zip(index.tolist(), counts.tolist()):
            shard, j = self.reader.locate(int(i))
            a, b = int(shard["offsets"][j]), int(shard["offsets"][j + 1])
            if b - a != n:
                raise DataError(f"{self.reader.dir}: training sample {i} has {n} labelled positions but the cache "
                                f"holds {b - a}; make the cache again for this data")
            x = shard.rows("ids", a, b)
            ids.append(x.long() + SHIFT if x.dtype == torch.int16 else x.long())
            logp.append(shard.rows("logp", a, b).float())
            rest.append(shard.rows("log_rest", a, b))
        return torch.cat(ids), torch.cat(logp), torch.cat(rest)
