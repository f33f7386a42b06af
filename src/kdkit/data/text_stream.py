"""Streaming text data (data.text.streaming: true): training records read and tokenized as training goes, for sets
too large to tokenize up front.

Sources. jsonl is read line by line, text_files file by file (sorted by relative path, as in memory), hf through
`datasets.load_dataset(..., streaming=True)` (a save_to_disk directory is memory-mapped and iterated). Records are
checked by the in-memory path's code (kdkit.data.text_sources) and tokenized by the same TextEncoder (chat template,
response-only labels, truncation; see kdkit.data.text). A bad record (a line that is not JSON, a missing field, an
empty response) is a DataError naming the file and line, or split and row, but only when the stream reaches it:
possibly hours into a run (every process stops at the same step; resume after fixing the line is refused as changed
data unless --force).

Evaluation is fixed and small, built at start-up as ordinary in-memory TextDatasets: test is the hf source's own
data.test_split when it has one, val its data.val_split; otherwise test is the first data.limit_eval records of the
stream and val (when data.val_fraction > 0) the next data.limit_eval. data.limit_eval is required then, and the
training stream skips those records in every pass. limit_eval also keeps only the first N of a source's own val /
test split. data.limit_train keeps the first N training records of each pass (before shuffling).

Training. The stream's length is unknown, so train.max_steps is required and the whole run is one trainer epoch
(eval_every / save_every "epoch" mean the end of the run; history's `epoch` is the fraction of max_steps done).
Each pass over the source (stream epoch e) goes through a seeded shuffle buffer of data.text.shuffle_buffer records,
seeded by (seed, e), so every pass is shuffled differently; when a pass ends the next starts. The passes make one
endless sequence of samples, and optimizer step k takes samples [k G, (k+1) G) with G = batch_size x grad_accum x
processes: every process reads every record but takes (and tokenizes) only every world_size-th sample of each
micro-batch window of batch_size x world_size samples. Processes see disjoint samples, and a step's global batch does
not depend on how it is split over processes and micro-batches (as with in-memory data). Tokenization runs in the
training process (data.num_workers is not used).

Packing (plain text): the documents of a pass, shuffled, are tokenized by every process (block boundaries depend on
every document) and cut into max_length blocks as they come; a pass's last partial block is kept by the in-memory
rule (at least max_length / 4 tokens, or the pass's only block). The samples are then blocks. Held-out val/test
records are packed as in memory (data.limit_eval counts records there, not blocks).

Exact resume. After every step the trainer keeps `stream: {epoch, offset}` (the pass, and how many of its samples
the run has consumed) in its state, so every checkpoint has it; a resumed run re-reads that pass from its start,
shuffles it with the same seed and skips `offset` samples without tokenizing them (packed: their documents are
tokenized again), and continues bit-identically.

Fingerprint (what a resume compares): the source's identity (jsonl: resolved path, size, mtime; text_files: every
file's relative path, size and mtime; hf: each split's datasets fingerprint for a save_to_disk directory, every
file's size and mtime for a local data directory, builder, config, version and split sizes for a hub ID), the
settings, and the val/test tokens. A file rewritten with the same size and mtime, or a hub dataset updated without
a new version, is not noticed.
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from kdkit.config.schema import DataConfig
from kdkit.data.text import TextData, TextDataset
from kdkit.data.text_sources import (Record, TextFilesWarning, detect_format, hf_records, hf_splits_wanted,
                                     jsonl_format, jsonl_records, list_text_files, read_text_file)
from kdkit.data.text_tokens import TextEncoder, TokenStore, pack, tokenizer_fingerprint
from kdkit.errors import ConfigError, DataError, UserError

STREAM_FINGERPRINT_VERSION = 1  # bump when streamed tokenization, holding out or shuffling changes
PACK_CHUNK = 64  # documents tokenized per tokenizer call when packing
MAX_STEPS = ("data.text.streaming: the length of a stream is unknown, so the run's length is given in optimizer "
             "steps; set train.max_steps")


def streaming_problems(cfg: Any) -> list[tuple[str, str]]:
    """What data.text.streaming needs from the rest of a Config, as (dotted path, message) (checked on loading)."""
    d, t = cfg.data, cfg.train
    if cfg.task != "lm" or not d.text.streaming:
        return []
    problems = []
    if t.max_steps is None:
        problems.append(("train.max_steps", MAX_STEPS))
    if t.batch_size == "auto":
        problems.append(("train.batch_size", "auto tries batches of the in-memory training set; with "
                         "data.text.streaming give a number"))
    if d.text.mixture:
        problems.append(("data.text.mixture", "data.text.streaming reads one source (data.source / data.path); "
                         "a mixture is not streamed"))
    elif d.limit_eval is None and d.source != "hf":
        carved = ["test", "val"] if d.val_fraction > 0 else ["test"]
        problems.append(("data.limit_eval", _limit_eval_message(f"{d.source} {d.path}", carved)))
    return problems


def _limit_eval_message(label: str, roles: Sequence[str]) -> str:
    return (f"data.text.streaming: {label} has no {' or '.join(roles)} split of its own; data.limit_eval sets how "
            f"many of the stream's first records are held out for each (e.g. 256)"
            + (", or set data.val_fraction: 0 for no validation" if "val" in roles else ""))


# ---- sources ---------------------------------------------------------------------------------------------------


@dataclass
class StreamSource:
    """A re-readable source of checked records in its own order: each call of `records` starts a new pass."""

    label: str  # "jsonl data/train.jsonl", for messages
    format: str
    records: Callable[[], Iterator[Record]]
    identity: dict
    own: dict[str, Callable[[], Iterator[Record]]] = field(default_factory=dict)  # "val" / "test" -> its records


def _stat(p: Path) -> list:
    try:
        st = p.stat()
    except OSError as e:
        raise DataError(f"cannot read {p}: {e.strerror or e}") from None
    return [st.st_size, st.st_mtime_ns]


def _files_identity(root: Path, files: Iterable[Path]) -> list:
    return [[f.relative_to(root).as_posix(), *_stat(f)] for f in files]


def _text_file_records(path: str, files: Sequence[Path]) -> Iterator[Record]:
    skipped = 0
    for f in files:
        text = read_text_file(f)
        if text is None or not text.strip():
            skipped += 1
            continue
        yield str(f), {"text": text}
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} of {len(files)} file(s) (empty or not valid UTF-8)",
                      TextFilesWarning, stacklevel=2)


def _hf_source(cfg: DataConfig) -> StreamSource:
    from kdkit.data.hf import open_hf_dataset

    path = cfg.path
    splits = open_hf_dataset(path, "data.path", streaming=True)
    # as in memory: a missing default test split is carved; any other named split must exist
    strict = {"val_split"} | ({"test_split"} if cfg.test_split != DataConfig.model_fields["test_split"].default
                              else set())
    wanted = hf_splits_wanted(splits, path, cfg.train_split, cfg.test_split, cfg.val_split, key="data", strict=strict)
    fmt, train = cfg.text.format, splits[cfg.train_split]
    if fmt == "auto":  # from the columns, or the first row when a stream does not know them
        columns = train.column_names or list(next(iter(train), None) or ())
        if not columns:
            raise DataError(f"hf split {cfg.train_split!r} of {path!r} is empty")
        fmt = detect_format(dict.fromkeys(columns), f"hf split {cfg.train_split!r} of {path!r}")

    def reader(name: str) -> Callable[[], Iterator[Record]]:
        return lambda: hf_records(splits[name], name, fmt)

    identity: dict[str, Any] = {"kind": "hf", "path": path,
                                "splits": {n: getattr(splits[n], "_fingerprint", None) for n in wanted.values()}}
    local = Path(path).expanduser()
    if local.is_dir():
        identity["files"] = _files_identity(local, sorted(p for p in local.rglob("*") if p.is_file()))
    else:  # a hub ID: what the builder says of itself
        info = train.info
        identity["info"] = [info.builder_name, info.config_name, str(info.version),
                            {k: getattr(v, "num_examples", None) for k, v in (info.splits or {}).items()}]
    return StreamSource(f"hf {path}", fmt, reader(cfg.train_split), identity,
                        {role: reader(name) for role, name in wanted.items() if role != "train"})


def open_source(cfg: DataConfig) -> StreamSource:
    """data.source / data.path as a StreamSource (the format resolved from the first record for auto)."""
    kind, path, text = cfg.source, cfg.path, cfg.text
    if not path:
        raise ConfigError([("data.path", f"source {kind} needs a path")])
    if kind == "jsonl":
        fmt = jsonl_format(path, text.format)
        return StreamSource(f"jsonl {path}", fmt, lambda: jsonl_records(path, fmt),
                            {"kind": "jsonl", "path": str(Path(path).resolve()), "stat": _stat(Path(path))})
    if kind == "text_files":
        root, files = list_text_files(path, text.glob, text.format, "data", text.exclude)
        return StreamSource(f"text_files {path}", "text", lambda: _text_file_records(path, files),
                            {"kind": "text_files", "path": str(path), "glob": text.glob, "exclude": list(text.exclude),
                             "files": _files_identity(root, files)})
    if kind == "hf":
        return _hf_source(cfg)
    raise ConfigError([("data.source", f"source {kind!r} is not a text source (jsonl, hf or text_files)")])


# ---- the endless training sequence ----------------------------------------------------------------------------


def stream_seed(seed: int, epoch: int) -> int:
    """The shuffle buffer's seed for pass `epoch`."""
    return int.from_bytes(hashlib.sha256(f"kdkit/stream/{epoch}/{seed}".encode()).digest()[:8], "little")


def shuffle_buffer(items: Iterable, size: int, seed: int) -> Iterator:
    """`items` through a buffer of `size`: once it is full each new item takes the place of one drawn at random (by
    random.Random(seed)), which is yielded; the buffer's rest comes last, shuffled. size <= 1: items as they come."""
    if size <= 1:
        yield from items
        return
    rng, buf = random.Random(seed), []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


def _block_store(blocks: Sequence[torch.Tensor]) -> TokenStore:
    """Packed blocks (int32 token ids) as a TokenStore: loss on every token, no prompts (as kdkit.data.text_tokens.pack)."""
    offsets = torch.zeros(len(blocks) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor([len(b) for b in blocks], dtype=torch.int64), 0)
    ids = torch.cat(list(blocks)) if blocks else torch.zeros(0, dtype=torch.int32)
    return TokenStore(ids, torch.ones(len(ids), dtype=torch.bool), offsets, torch.zeros(0, dtype=torch.int32),
                      torch.zeros(len(blocks) + 1, dtype=torch.int64), None)


class StreamingTextDataset:
    """The training split of a stream: no length, endless batches (see the module docstring). The trainer asks it for
    `batches(batch_size, rank=, world_size=, position=)` and keeps their `position` with its state."""

    streaming = True

    def __init__(self, source: StreamSource, encoder: TextEncoder, teacher_encoder: Optional[TextEncoder], *,
                 seed: int, skip: int, limit: Optional[int], shuffle: int, packed: bool):
        self.source, self.encoder, self.teacher_encoder = source, encoder, teacher_encoder
        self.seed, self.skip, self.limit, self.shuffle, self.packed = seed, skip, limit, shuffle, packed
        self.format, self.pad_token_id, self.label = source.format, encoder.pad, source.label

    def __len__(self) -> int:
        raise UserError("a streamed training set (data.text.streaming) has no length; this needs in-memory data")

    def __bool__(self) -> bool:
        return True

    def pass_records(self, epoch: int) -> Iterator[Record]:
        """Pass `epoch` over the training records: after the held-out ones, up to data.limit_train, shuffled."""
        stop = None if self.limit is None else self.skip + self.limit
        return shuffle_buffer(islice(self.source.records(), self.skip, stop), self.shuffle,
                              stream_seed(self.seed, epoch))

    def _blocks(self, records: Iterator[Record]) -> Iterator[torch.Tensor]:
        size = self.encoder.max_length
        rest, full = np.zeros(0, dtype=np.int32), 0
        while chunk := list(islice(records, PACK_CHUNK)):
            rest = np.concatenate([rest, self.encoder.encode(self.format, chunk, truncate=False).ids.numpy()])
            while len(rest) >= size:
                yield torch.from_numpy(rest[:size].copy())
                rest, full = rest[size:], full + 1
        if len(rest) and (full == 0 or len(rest) >= max(size / 4, 2)):  # the rule of text_tokens.pack
            yield torch.from_numpy(rest.copy())

    def samples(self, epoch: int = 0, offset: int = 0) -> Iterator[tuple[int, int, Any]]:
        """The endless sample sequence from sample `offset` of pass `epoch`, as (pass, its samples up to and with
        this one, sample); a sample is a record, or with packing a block of int32 token ids."""
        while True:
            items = self.pass_records(epoch)
            n = 0
            for n, item in enumerate(self._blocks(items) if self.packed else items, 1):
                if n > offset:
                    yield epoch, n, item
            if n == 0:
                raise DataError(f"{self.label}: no training records in the stream (after the {self.skip} held out "
                                "for evaluation)")
            epoch, offset = epoch + 1, 0

    def encode(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
        """One micro-batch, as TextDataset.get_batch gives it."""
        index = torch.arange(len(samples))
        if self.packed:
            return TextDataset.of(_block_store(samples), self.pad_token_id, self.format).get_batch(index)
        return _dataset(self.encoder, self.teacher_encoder, self.format, list(samples)).get_batch(index)

    def batches(self, batch_size: int, *, rank: int = 0, world_size: int = 1,
                position: Optional[dict] = None) -> "StreamBatches":
        return StreamBatches(self, batch_size, rank, world_size, position)

    def describe(self) -> str:
        return f"streaming train from {self.label}"


class StreamBatches:
    """One rank's micro-batches, without end: micro-batch m of every rank comes from window m of batch_size x
    world_size samples (rank r takes samples r, r + world_size, ...). `position` ({epoch, offset}) is where the
    sequence stands after the last window, the same on every rank: `batches(..., position=)` continues from there."""

    def __init__(self, data: StreamingTextDataset, batch_size: int, rank: int, world_size: int,
                 position: Optional[dict]):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.data, self.batch_size, self.rank, self.world_size = data, batch_size, rank, world_size
        pos = position or {"epoch": 0, "offset": 0}
        self.position = {"epoch": int(pos["epoch"]), "offset": int(pos["offset"])}
        self._samples = data.samples(**self.position)

    def __iter__(self) -> "StreamBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        window = list(islice(self._samples, self.batch_size * self.world_size))
        epoch, offset, _ = window[-1]
        self.position = {"epoch": epoch, "offset": offset}
        return self.data.encode([sample for _, _, sample in window[self.rank::self.world_size]])


# ---- building ---------------------------------------------------------------------------------------------------


def _dataset(encoder: TextEncoder, teacher_encoder: Optional[TextEncoder], fmt: str, records: list[Record],
             packed: bool = False) -> TextDataset:
    """`records` tokenized in memory (packed, or with the teacher's own tokenization beside)."""
    if packed:
        return TextDataset.of(pack(encoder.encode(fmt, records, truncate=False), encoder.max_length), encoder.pad, fmt)
    store = encoder.encode(fmt, records)
    teacher = None
    if teacher_encoder is not None:
        teacher = TextDataset.of(teacher_encoder.encode(fmt, records), teacher_encoder.pad, fmt)
    return TextDataset([store], torch.zeros(len(store), dtype=torch.int64), torch.arange(len(store)), encoder.pad,
                       fmt, teacher)


def build_streaming_text_data(cfg: DataConfig, tokenizer: Any, seed: int, *,
                              teacher_tokenizer: Any = None) -> TextData:
    """data.text.streaming: val/test in memory, train a StreamingTextDataset (see the module docstring)."""
    text = cfg.text
    if text.mixture:
        raise ConfigError([("data.text.mixture", "data.text.streaming reads one source (data.source / data.path); a "
                            "mixture is not streamed")])
    source = open_source(cfg)
    fmt = source.format
    packed = text.packing and fmt == "text"
    if text.packing and not packed:
        raise ConfigError([("data.text.packing", f"packing is for plain text; {cfg.path} holds {fmt} records")])
    if text.packing and teacher_tokenizer is not None:
        raise ConfigError([("data.text.packing", "packing cannot be used when the teacher's tokenizer differs from "
                            "the student's; set packing: false")])
    encoder = TextEncoder(tokenizer, text.max_length, text.chat_template)
    t_encoder = None if teacher_tokenizer is None else TextEncoder(teacher_tokenizer, text.max_length,
                                                                   text.chat_template)
    carve = [role for role in ("test", "val") if role not in source.own and (role == "test" or cfg.val_fraction > 0)]
    if carve and cfg.limit_eval is None:
        raise ConfigError([("data.limit_eval", _limit_eval_message(source.label, carve))])
    n = cfg.limit_eval or 0
    head = list(islice(source.records(), n * len(carve) + 1))  # the held-out records, and one to train on
    if len(head) <= n * len(carve):
        raise DataError(f"{source.label}: {len(head)} record(s); data.limit_eval={n} holds out {n * len(carve)} for "
                        f"{' and '.join(carve)} and leaves none to train on")
    held = {role: head[i * n:(i + 1) * n] for i, role in enumerate(carve)}
    for role, records in source.own.items():
        held[role] = list(islice(records(), cfg.limit_eval))
    if not held["test"]:
        raise DataError(f"the test split of {source.label} is empty")
    splits = {role: _dataset(encoder, t_encoder, fmt, held[role], packed) if role in held else None
              for role in ("val", "test")}
    train = StreamingTextDataset(source, encoder, t_encoder, seed=seed, skip=n * len(carve), limit=cfg.limit_train,
                                 shuffle=text.shuffle_buffer, packed=packed)
    payload = {
        "version": STREAM_FINGERPRINT_VERSION, "streaming": True, "source": source.identity, "format": fmt,
        "packed": packed, "max_length": text.max_length, "chat_template": encoder.template, "pad": encoder.pad,
        "eos": encoder.eos, "shuffle_buffer": text.shuffle_buffer, "limit_train": cfg.limit_train,
        "limit_eval": cfg.limit_eval, "held_out": carve,
        "splits": {role: None if d is None else {"n": len(d), "sha256": d.digest()} for role, d in splits.items()},
    }
    fingerprint = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    return TextData(train=train, val=splits["val"], test=splits["test"], fingerprint=fingerprint,
                    tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), format=fmt)
