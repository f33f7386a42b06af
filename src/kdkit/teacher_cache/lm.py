"""Language-model and vision-language teacher caches (task lm and vlm, one format): per labelled position, the
top-k log-probabilities at the distillation temperature, their token ids (in the student's vocabulary: the aligned
head rows) and the log of the remaining mass.

A shard holds, for its samples in dataset order: "offsets" int64 (n + 1,) into the positions; "ids" (P, k) int16
(id - 32768, for vocabularies up to 65536 rows) or int32; "logp" float16 (P, k); "log_rest" float32 (P,); with
`cache.tail_samples` = s > 0 also "tail_ids" (P, s), token ids drawn from the teacher's distribution outside the top-k
(same int16/int32 form), and "tail_negent" float32 (P,), that tail's negative entropy: together they make forward KL
unbiased (kdkit.losses.sparse). The draws are seeded by the shard's first sample, so a cache is the same however many
processes write it. The positions of a sample are those whose next-token target is labelled, in order: exactly the
rows the fused losses keep, so a batch's cached rows line up with its labelled positions. Bytes per token:
4 k + 2 s + 8 for vocabularies up to 65536 rows (the default k = 64, s = 16: 296), 6 k + 4 s + 8 above.

For vlm the teacher reads the batch's images too and the positions are the answer tokens; the student's and the
teacher's processors must be the same (one encoding of every sample), and nothing of the vision tower is kept.
"""

from __future__ import annotations

import torch

from kdkit.distill.lm import next_token_targets
from kdkit.errors import DataError, UserError
from kdkit.losses.divergence import compute_dtype
from kdkit.losses.sparse import sample_tail, topk_of

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
            "temperature": kd_temperature(cfg), "vocab_rows": int(vocab_rows), "max_length": max_length(cfg)}


def _to_store(ids: torch.Tensor, vocab_rows: int) -> torch.Tensor:
    return (ids - SHIFT).to(torch.int16) if vocab_rows <= 2 * SHIFT else ids.to(torch.int32)


def _from_store(x: torch.Tensor) -> torch.Tensor:
    return x.long() + SHIFT if x.dtype == torch.int16 else x.long()


def max_length(cfg) -> int:
    """The config's tokens per sample (task lm: data.text.max_length; vlm: vlm.max_length, image tokens included)."""
    return cfg.vlm.max_length if cfg.task == "vlm" else cfg.data.text.max_length


def make_token_plan(cfg, task, data, teacher, device):
    """The Plan of task lm or vlm: the teacher's rows at every labelled (answer) position, in the student's vocabulary
    after alignment (the first `vocab_rows` head rows both share)."""
    from kdkit.teacher_cache.build import Plan, teacher_spec_hash

    if getattr(data.train, "teacher", None) is not None:  # the teacher reads its own encoding of the samples
        if cfg.task == "vlm":
            raise UserError("teacher: its processor differs from the student's (tokenizer, chat template or image "
                            "processing) and a cache holds rows for one encoding of the samples; distil online")
        raise UserError("teacher: a cache across tokenizers is not supported yet; distil online (ULD)")
    if cfg.task == "vlm" and cfg.vlm.vision_feature_weight > 0:
        raise UserError("vlm.vision_feature_weight: needs the teacher's vision features, which a cache does not "
                        "hold; set it to 0 to cache the teacher, or distil online")
    if not hasattr(data.train, "get_batch"):
        raise UserError("data.text.streaming: a teacher cache needs the training split in memory")
    n = task._alignment(task._student_rows(cfg), teacher).size
    s = settings(cfg, n)
    key = {"data": data.fingerprint, "tokenizer": data.tokenizer_fingerprint, "settings": s,
           "teacher_spec": teacher_spec_hash(cfg.teacher), "teacher": task.teacher_fingerprint(teacher)}
    if cfg.task == "vlm":
        from kdkit.distill.vlm import vision_inputs

        forward = lambda b: teacher(b["input_ids"], b["attention_mask"], **vision_inputs(b))  # noqa: E731
    else:
        forward = lambda b: teacher(b["input_ids"].to(device), b["attention_mask"].to(device))  # noqa: E731

    def write(start: int, end: int, advance):
        return compute_shard(forward, data.train, start, end, k=s["top_k"], temperature=s["temperature"],
                             tail_samples=s["tail_samples"], vocab_rows=n, batch_size=cfg.eval.batch_size,
                             device=device, advance=advance)

    return Plan(cfg.task, key, len(data.train), "token", write)


@torch.no_grad()
def compute_shard(forward, dataset, start: int, end: int, *, k: int, temperature: float, vocab_rows: int,
                  batch_size: int, device, tail_samples: int = 0, chunk_rows: int = 1024,
                  advance=lambda n: None) -> tuple[dict, int]:
    """The shard tensors of samples [start, end) of `dataset` (anything with `get_batch(index)` -> {"labels", ...})
    and its number of positions; `forward(batch)` -> the teacher's (hidden (B, L, H), head (V, H)) on the batch."""
    counts, ids_out, logp_out, rest_out, tail_out, negent_out = [], [], [], [], [], []
    generator = torch.Generator(device).manual_seed(1_000_003 * start + 17)
    for a in range(start, end, batch_size):
        index = torch.arange(a, min(a + batch_size, end))
        batch = dataset.get_batch(index)
        target = next_token_targets(batch["labels"])  # (B, L)
        keep = target != -100
        hidden, head = forward(batch)
        rows = hidden[keep.to(hidden.device)]  # (K, H), row-major: sample by sample, position by position
        head = head[:vocab_rows]
        for c in range(0, rows.shape[0], chunk_rows):
            logits = rows[c:c + chunk_rows] @ head.T
            log_p = torch.log_softmax(logits.to(compute_dtype(logits)) / temperature, -1)  # once, for both
            tid, lp, rest = topk_of(log_p, k)
            if tail_samples:
                drawn, negent = sample_tail(log_p, tid, rest, tail_samples, generator)
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

    def check_student(self, student_rows: int) -> None:
        """The cache's ids index the student's head: refuse a student with fewer rows than the cache was made for."""
        if student_rows < self.vocab_rows:
            raise UserError(f"teacher.cache: {self.reader.dir} holds token ids over {self.vocab_rows} vocabulary rows "
                            f"but the student's head has {student_rows}; make the cache again for this student")

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
