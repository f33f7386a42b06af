"""`build_text_data`: text records tokenized once into compact tensors, split by the seed, with fingerprints.

Layout. instruction and chat records become a prompt and loss-bearing assistant tokens: with the tokenizer's chat
template when data.text.chat_template is on and the tokenizer has one (the prompt is the template's rendering with
add_generation_prompt=True; each assistant turn, with the template's end-of-turn text, carries the loss), else the
plain layout "### Instruction:\\n{instruction}\\n\\n[### Input:\\n{context}\\n\\n]### Response:\\n" followed by the
response and EOS (chat turns: "### System:", "### Instruction:" for user, "### Response:" before each assistant
turn). text records carry the loss on every token and end with EOS. The tokenizer's own BOS (if it adds one) opens
every plain sample. Labels are the token ids (not shifted) with -100 on prompt tokens and padding.

Truncation to data.text.max_length keeps the prompt's end and the response's start: the window starts at
max(0, p - (max_length - 1)) where p is the first loss-bearing token, so at least one response token always
stays. Plain text keeps its start. Prompts kept for generation keep their last max_length - 1 tokens (plain text
has no reference answer: its "prompt" is the sample's first half).

Packing (text records only; ignored for the instruction/chat sources of a mixture, an error for a single one):
the documents of a split, each ending with EOS, are concatenated and cut into max_length blocks; a last partial
block is kept when it holds at least max_length / 4 tokens (or is the split's only block), else dropped.
Attention is not masked across documents inside a block.

Splits mirror `build_image_data`: test is the source's own (hf data.test_split when the dataset has it; a
missing one is carved only when test_split is the default "test") or a seeded data.test_fraction; val is hf
data.val_split, else a seeded data.val_fraction of the rest (none when 0); train is the rest. data.limit_train
keeps the first N of the seeded train order, data.limit_eval the first N of val and test (with packing: N
blocks). Records are split before packing, so text_files hold out whole files.

Mixture (data.text.mixture): every source is loaded, split and tokenized as above. The training set has
T = data.limit_train or the sum of the sources' train sizes samples; source i gets round(T * w_i / sum(w))
of them (largest remainder, so they sum to T): a seeded subset when it has more samples than that, else every
sample repeated floor(share / n_i) times plus a seeded subset for the remainder (sampling with replacement, but
balanced). val and test are the union of the sources' own; data.limit_eval splits its N over the sources by weight.

Streaming (data.text.streaming): the training records are read and tokenized as training goes, val and test are
held out in memory; see kdkit.data.text_stream.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from kdkit.config.schema import DataConfig
from kdkit.data.build import _carve_count, seeded_permutation
from kdkit.data.text_sources import Record, SourceRecords, load_records
from kdkit.data.text_tokens import TextEncoder, TokenStore, pack, tokenizer_fingerprint
from kdkit.errors import ConfigError, DataError

FINGERPRINT_VERSION = 1  # bump when tokenization or splitting changes, so old runs are not resumed on new data
PROGRESS_MIN_RECORDS = 10_000  # a progress bar is shown only when tokenizing more records than this


@dataclass
class TextData:
    """The three splits and what the model side needs to know about them."""

    train: Dataset
    val: Optional[Dataset]
    test: Dataset
    fingerprint: str  # sha256 hex over the token ids of every split and the settings
    tokenizer_fingerprint: str  # sha256 hex of the vocabulary, special tokens and chat template
    format: str  # the resolved format of the (first) source


class TextDataset(Dataset):
    """Samples drawn from one or more TokenStores: item k is sample index[k] of stores[which[k]].

    `__getitem__(k)` -> {"input_ids", "attention_mask", "labels"} 1-D int64; `get_batch(index)` -> the same
    (B, L) right-padded with pad_token_id (labels -100 there); `prompt(k)` -> (prompt ids int64, reference or None).

    `teacher`: the same samples in the teacher's own tokenization (different tokenizers, for ULD), a TextDataset
    with the same `which` / `index`; its tensors join every item and batch as "teacher_input_ids",
    "teacher_attention_mask" and "teacher_labels".
    """

    def __init__(self, stores: Sequence[TokenStore], which: torch.Tensor, index: torch.Tensor, pad_token_id: int,
                 format: str, teacher: Optional["TextDataset"] = None):
        self.stores, self.pad_token_id, self.format = list(stores), int(pad_token_id), format
        self.teacher = teacher
        self.which = torch.as_tensor(which, dtype=torch.int64)
        self.index = torch.as_tensor(index, dtype=torch.int64)
        if self.which.shape != self.index.shape:
            raise ValueError("which and index must have the same shape")

    @classmethod
    def of(cls, store: TokenStore, pad_token_id: int, format: str, index: Optional[torch.Tensor] = None):
        index = torch.arange(len(store)) if index is None else index
        return cls([store], torch.zeros(len(index), dtype=torch.int64), index, pad_token_id, format)

    def __len__(self) -> int:
        return len(self.index)

    def _locate(self, k: int) -> tuple[TokenStore, int]:
        if not -len(self) <= k < len(self):
            raise IndexError(f"sample {k} out of range for {len(self)} samples")
        return self.stores[int(self.which[k])], int(self.index[k])

    def _tokens(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        store, j = self._locate(k)
        a, b = int(store.offsets[j]), int(store.offsets[j + 1])
        return store.ids[a:b], store.loss[a:b]

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        ids, loss = self._tokens(int(k))
        ids = ids.long()
        item = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.where(loss, ids, torch.full_like(ids, -100))}
        return item if self.teacher is None else {**item, **_prefixed(self.teacher[k])}

    def get_batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = [self._tokens(int(k)) for k in torch.as_tensor(index).reshape(-1).tolist()]
        width = max((len(ids) for ids, _ in parts), default=0)
        input_ids = torch.full((len(parts), width), self.pad_token_id, dtype=torch.int64)
        attention = torch.zeros((len(parts), width), dtype=torch.int64)
        labels = torch.full((len(parts), width), -100, dtype=torch.int64)
        for r, (ids, loss) in enumerate(parts):
            n = len(ids)
            input_ids[r, :n] = ids
            attention[r, :n] = 1
            labels[r, :n] = torch.where(loss, ids.long(), -100)
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
        return batch if self.teacher is None else {**batch, **_prefixed(self.teacher.get_batch(index))}

    def prompt(self, k: int) -> tuple[torch.Tensor, Optional[str]]:
        """The prompt tokens of sample k (int64) and its reference response. Plain text has no reference (None);
        its prompt is the sample's first half (at least one token), to continue for generation timing."""
        store, j = self._locate(int(k))
        if store.references is None:
            a, b = int(store.offsets[j]), int(store.offsets[j + 1])
            return store.ids[a:a + max(1, (b - a) // 2)].long(), None
        a, b = int(store.prompt_offsets[j]), int(store.prompt_offsets[j + 1])
        return store.prompt_ids[a:b].long(), store.references[j]

    @property
    def generative(self) -> bool:
        """Whether samples have references (instruction / chat), i.e. generation-based evaluation makes sense."""
        return any(s.references is not None for s in self.stores)

    def lengths(self) -> torch.Tensor:
        """Tokens per sample, int64 (N,)."""
        out = torch.empty(len(self), dtype=torch.int64)
        for s, store in enumerate(self.stores):
            mask = self.which == s
            out[mask] = store.lengths()[self.index[mask]]
        return out

    def digest(self) -> str:
        h = hashlib.sha256()
        for store in self.stores:
            h.update(store.digest().encode())
        h.update(self.which.numpy().astype("<i8").tobytes())
        h.update(self.index.numpy().astype("<i8").tobytes())
        if self.teacher is not None:
            h.update(b"teacher:" + self.teacher.digest().encode())
        return h.hexdigest()


def _prefixed(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"teacher_{k}": v for k, v in batch.items()}


# ---- splits ----------------------------------------------------------------------------------------------------


@dataclass
class _Source:
    """One source after splitting: records per role, in the order a limit keeps the first of."""

    label: str
    weight: float
    src: SourceRecords
    roles: dict  # role -> (pool records, order LongTensor) or None
    packed: bool


def _split_orders(src: SourceRecords, cfg: DataConfig, seed: int, label: str) -> dict:
    """Mirror build_image_data: test, then val, then a seeded train order."""
    n = len(src.train)
    if n == 0:
        raise DataError(f"{label}: no training records")
    rest = torch.arange(n)
    try:
        if src.test is None:
            perm = seeded_permutation(n, seed, "test")
            k = _carve_count(n, cfg.test_fraction, "test", "data.test_fraction")
            test, rest = (src.train, perm[:k]), perm[k:]
        else:
            test = (src.test, torch.arange(len(src.test)))
        if src.val is not None:
            val = (src.val, torch.arange(len(src.val)))
            train = rest[seeded_permutation(len(rest), seed, "train")]
        elif cfg.val_fraction > 0:
            shuffled = rest[seeded_permutation(len(rest), seed, "val")]
            k = _carve_count(len(shuffled), cfg.val_fraction, "validation", "data.val_fraction")
            val, train = (src.train, shuffled[:k]), shuffled[k:]
        else:
            val, train = None, rest[seeded_permutation(len(rest), seed, "train")]
    except DataError as e:
        raise DataError(f"{label}: {e}") from None
    return {"train": (src.train, train), "val": val, "test": test}


def _pick(pool: list[Record], order: torch.Tensor) -> list[Record]:
    return [pool[i] for i in torch.sort(order).values.tolist()]


def _quotas(total: int, weights: Sequence[float]) -> list[int]:
    """round(total * w / sum(w)) per weight by largest remainder, summing to total."""
    exact = [total * w / sum(weights) for w in weights]
    out = [int(np.floor(x)) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: (out[i] - exact[i], i))[:total - sum(out)]:
        out[i] += 1
    return out


@contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    if not enabled or total <= PROGRESS_MIN_RECORDS:
        yield lambda n: None
        return
    from rich.progress import Progress  # imported lazily: small data never needs rich

    with Progress(transient=True) as bar:
        task = bar.add_task("tokenizing", total=total)
        yield lambda n: bar.advance(task, n)


def _load_sources(cfg: DataConfig, seed: int) -> list[_Source]:
    text = cfg.text
    # A missing test split is carved from train when test_split is the default "test" (many text datasets have
    # only train; a resumed run's config.yaml spells the default out, so "explicitly set" cannot be told apart);
    # any other test_split, and any val_split, names a split that must exist.
    default_test = DataConfig.model_fields["test_split"].default
    strict = {"val_split"} | ({"test_split"} if cfg.test_split != default_test else set())
    if text.mixture:
        specs = [(f"data.text.mixture[{i}]", s.source, s.path, s.format, s.glob, s.train_split, s.weight, s.exclude)
                 for i, s in enumerate(text.mixture)]
        strict = set()  # a mixture's hf sources use data.test_split / val_split only where they have them
    else:
        specs = [("data", cfg.source, cfg.path, text.format, text.glob, cfg.train_split, 1.0, text.exclude)]
    sources = []
    for key, kind, path, fmt, glob, train_split, weight, exclude in specs:
        src = load_records(kind, path, fmt, glob=glob, train_split=train_split, test_split=cfg.test_split,
                           val_split=cfg.val_split, key=key, strict=strict, exclude=exclude)
        packed = text.packing and src.format == "text"
        if text.packing and not packed and not text.mixture:
            raise ConfigError([("data.text.packing", f"packing is for plain text; {path} holds {src.format} records")])
        label = f"{kind} {path}"
        sources.append(_Source(label, weight, src, _split_orders(src, cfg, seed, label), packed))
    return sources


def build_text_data(cfg: DataConfig, tokenizer: Any, seed: int, *, teacher_tokenizer: Any = None,
                    progress: bool = True) -> TextData:
    """Load data.source / data.path (or data.text.mixture), tokenize once, split (see the module docstring).

    teacher_tokenizer (a tokenizer other than the student's, for ULD): every sample is also tokenized by it, with its
    own chat template and special tokens, into companion datasets (TextDataset.teacher); packing is refused then,
    since a block of one tokenization is not the same text as a block of the other."""
    if cfg.text.streaming:  # train read lazily, val/test held out in memory: kdkit.data.text_stream
        from kdkit.data.text_stream import build_streaming_text_data

        return build_streaming_text_data(cfg, tokenizer, seed, teacher_tokenizer=teacher_tokenizer)
    text = cfg.text
    encoder = TextEncoder(tokenizer, text.max_length, text.chat_template)
    t_encoder = None
    if teacher_tokenizer is not None:
        if text.packing:
            raise ConfigError([("data.text.packing", "packing cannot be used when the teacher's tokenizer differs "
                                "from the student's: distillation pairs the answer tokens of each sample in both "
                                "tokenizations; set packing: false")])
        t_encoder = TextEncoder(teacher_tokenizer, text.max_length, text.chat_template)
    sources = _load_sources(cfg, seed)
    single = not text.mixture
    if single and not sources[0].packed:  # limits cut records before tokenizing: a quick run tokenizes little
        roles = sources[0].roles
        for role, limit in (("train", cfg.limit_train), ("val", cfg.limit_eval), ("test", cfg.limit_eval)):
            if roles[role] is not None and limit:
                roles[role] = (roles[role][0], roles[role][1][:limit])

    picked = [{role: _pick(*r) if r is not None else None for role, r in s.roles.items()} for s in sources]
    total = sum(len(recs) for p in picked for recs in p.values() if recs is not None)
    total *= 1 if t_encoder is None else 2
    stores: list[dict] = []
    t_stores: list[dict] = []
    with _progress(total, progress) as advance:
        for s, p in zip(sources, picked):
            stores.append({role: None if recs is None else
                           (pack(encoder.encode(s.src.format, recs, truncate=False, advance=advance), text.max_length)
                            if s.packed else encoder.encode(s.src.format, recs, advance=advance))
                           for role, recs in p.items()})
            if t_encoder is not None:
                t_stores.append({role: None if recs is None else t_encoder.encode(s.src.format, recs, advance=advance)
                                 for role, recs in p.items()})

    def dataset(role: str, which: Sequence[int], index: torch.Tensor, picks: Sequence[int]) -> TextDataset:
        """Samples `index` of the `which`-th of the stores `picks` of role; with the teacher's companion."""
        which = torch.as_tensor(which, dtype=torch.int64)
        teacher = None if t_encoder is None else TextDataset([t_stores[i][role] for i in picks], which, index,
                                                             t_encoder.pad, fmt)
        return TextDataset([stores[i][role] for i in picks], which, index, pad, fmt, teacher)

    fmt = sources[0].src.format
    pad = encoder.pad
    splits: dict[str, Optional[TextDataset]] = {}
    if single:
        s, st = sources[0], stores[0]
        for role in ("train", "val", "test"):
            store = st[role]
            if store is None:
                splits[role] = None
                continue
            index = torch.arange(len(store))
            limit = cfg.limit_train if role == "train" else cfg.limit_eval
            if s.packed and limit:  # packed: the limits count blocks
                if role == "train":
                    index = torch.sort(seeded_permutation(len(store), seed, "train-blocks")[:limit]).values
                else:
                    index = index[:limit]
            splits[role] = dataset(role, torch.zeros(len(index)), index, [0])
    else:
        weights = [s.weight for s in sources]
        train_sizes = [len(st["train"]) for st in stores]
        for s, n in zip(sources, train_sizes):
            if n == 0:
                raise DataError(f"{s.label}: no training samples after tokenization")
        which, index = [], []
        for i, (n, q) in enumerate(zip(train_sizes, _quotas(cfg.limit_train or sum(train_sizes), weights))):
            reps, rem = divmod(q, n)
            part = torch.cat([torch.arange(n).repeat(reps),
                              torch.sort(seeded_permutation(n, seed, f"mixture/{i}")[:rem]).values])
            which.append(torch.full((q,), i, dtype=torch.int64))
            index.append(part)
        splits["train"] = dataset("train", torch.cat(which), torch.cat(index), range(len(stores)))
        for role in ("val", "test"):
            have = [i for i, st in enumerate(stores) if st[role] is not None]
            if not have:
                splits[role] = None
                continue
            sizes = [len(stores[i][role]) for i in have]
            caps = _quotas(cfg.limit_eval, [weights[i] for i in have]) if cfg.limit_eval else sizes
            counts = [min(n, c) for n, c in zip(sizes, caps)]
            which = torch.cat([torch.full((c,), k, dtype=torch.int64) for k, c in enumerate(counts)])
            splits[role] = dataset(role, which, torch.cat([torch.arange(c) for c in counts]), have)
    if len(splits["test"]) == 0:
        raise DataError(f"the test split of {sources[0].label} is empty")
    if len(splits["train"]) == 0:
        raise DataError(f"the training split of {sources[0].label} is empty")

    payload = {
        "version": FINGERPRINT_VERSION,
        "sources": [{"kind": s.src.identity.get("kind"), "format": s.src.format, "weight": s.weight,
                     "packed": s.packed} for s in sources],
        "max_length": text.max_length, "chat_template": encoder.template, "pad": pad, "eos": encoder.eos,
        "limit_train": cfg.limit_train, "limit_eval": cfg.limit_eval,
        "splits": {role: None if d is None else {"n": len(d), "sha256": d.digest()} for role, d in splits.items()},
    }
    fingerprint = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return TextData(train=splits["train"], val=splits["val"], test=splits["test"], fingerprint=fingerprint,
                    tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), format=fmt)
