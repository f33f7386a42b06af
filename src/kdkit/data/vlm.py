"""`build_vlm_data`: image-question-answer records (kdkit.data.vlm_records), split by the seed, encoded per batch.

Each sample is rendered with a processor's chat template into pieces: prompt text (no loss) and each assistant
turn's text with the template's end-of-turn (loss). A batch encodes its samples with the student's processor, which
expands each image placeholder into the image's tokens, and, when the teacher's processor differs (another
tokenizer, template or image processing), with the teacher's too: those tensors join the batch as teacher_*.
Images are read and resized (vlm.min_pixels / max_pixels) per batch, never held in memory.

Labels are the token ids on answer tokens and -100 elsewhere (not shifted). A sample longer than vlm.max_length
loses the end of its answer; one whose prompt alone reaches max_length is a DataError naming the record.

Splits mirror the text data: hf data.test_split / val_split when the dataset has them, else seeded
data.test_fraction / val_fraction carves; data.limit_train / limit_eval keep the first N of each.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.utils.data import Dataset

from kdkit.data.build import _carve_count, seeded_permutation
from kdkit.data.vlm_records import VLMRecord, hf_records, image_count, jsonl_records, load_image
from kdkit.errors import DataError

FINGERPRINT_VERSION = 1
VISION_KEYS = ("pixel_values", "image_grid_thw")
SHAPES = "shapes:"  # data.path of the demo's procedural images


@dataclass
class Rendered:
    """One record through one processor's chat template: pieces (text, carries the loss), the generation prompt
    (text before the last answer) and the reference answer."""

    pieces: list[tuple[str, bool]]
    prompt: str
    reference: str


def render(proc: Any, messages: list[dict], where: str) -> Rendered:
    """Split a conversation into prompt and answer pieces with the processor's template (see module docstring)."""
    pieces, done = [], ""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in turns:
        prefix = proc.render(messages[:i], add_generation_prompt=True)
        full = proc.render(messages[:i + 1])
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise DataError(f"{where}: the chat template does not render the conversation as a prefix of itself; "
                            "kdkit cannot tell prompt from answer")
        pieces += [(prefix[len(done):], False), (full[len(prefix):], True)]
        done = full
    last = messages[turns[-1]]["content"]
    reference = last if isinstance(last, str) else "".join(p.get("text", "") for p in last if p["type"] == "text")
    prompt = proc.render(messages[:turns[-1]], add_generation_prompt=True)
    return Rendered([(t, loss) for t, loss in pieces if t], prompt, reference)


class VLMDataset(Dataset):
    """Samples `index` of `records`; `get_batch(index)` -> {"input_ids", "attention_mask", "labels",
    "mm_token_type_ids" (B, L) right-padded, "pixel_values", "image_grid_thw"} (+ teacher_* with a teacher view);
    `prompt(k, teacher=False)` -> (model inputs of batch 1 for generation, reference answer)."""

    def __init__(self, records: list[VLMRecord], index: torch.Tensor, views: list[tuple[str, Any, list[Rendered]]],
                 max_length: int, image_field: str = "image"):
        self.records, self.index, self.views = records, torch.as_tensor(index, dtype=torch.int64), views
        self.max_length, self.image_field = int(max_length), image_field
        self.teacher = views[1][1] if len(views) > 1 else None  # the teacher's processor, when it reads its own

    def __len__(self) -> int:
        return len(self.index)

    def _images(self, r: int) -> list:
        rec = self.records[r]
        return [load_image(ref, rec.where, self.image_field) for ref in rec.images]

    def _encode(self, proc: Any, rendered: Rendered, images: list, where: str) -> dict[str, Any]:
        ids, loss, mm, pixels, grids, used = [], [], [], [], [], 0
        for text, carries in rendered.pieces:
            n = text.count(proc.image_token)
            enc = proc.encode(text, images[used:used + n])
            used += n
            ids += enc["input_ids"]
            mm += enc["mm_token_type_ids"]
            loss += [carries] * len(enc["input_ids"])
            if n:
                pixels.append(enc["pixel_values"])
                grids.append(enc["image_grid_thw"])
        if len(ids) > self.max_length:
            first = loss.index(True) if True in loss else len(loss)
            if first >= self.max_length - 1:
                raise DataError(f"{where}: {first} tokens before the answer (images included) reach vlm.max_length "
                                f"{self.max_length}; raise vlm.max_length or lower vlm.max_pixels")
            ids, loss, mm = ids[:self.max_length], loss[:self.max_length], mm[:self.max_length]
        out = {"ids": ids, "loss": loss, "mm": mm}
        if pixels:
            out.update(pixel_values=torch.cat(pixels), image_grid_thw=torch.cat(grids))
        return out

    def get_batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = [int(self.index[k]) for k in torch.as_tensor(index).reshape(-1).tolist()]
        images = {r: self._images(r) for r in rows}
        batch: dict[str, torch.Tensor] = {}
        for prefix, proc, rendered in self.views:
            encoded = [self._encode(proc, rendered[r], images[r], self.records[r].where) for r in rows]
            batch.update({prefix + k: v for k, v in collate(encoded, proc.tokenizer.pad_token_id).items()})
        return batch

    def prompt(self, k: int, teacher: bool = False) -> tuple[dict[str, torch.Tensor], str]:
        r = int(self.index[k])
        _, proc, rendered = self.views[1 if teacher and len(self.views) > 1 else 0]
        enc = self._encode(proc, Rendered([(rendered[r].prompt, False)], "", ""), self._images(r), self.records[r].where)
        ids = torch.tensor([enc["ids"]], dtype=torch.int64)
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
               "mm_token_type_ids": torch.tensor([enc["mm"]], dtype=torch.int64)}
        out.update({k: enc[k] for k in VISION_KEYS if k in enc})
        return out, rendered[r].reference

    def digest(self) -> str:
        h = hashlib.sha256(self.index.numpy().astype("<i8").tobytes())
        for _, proc, rendered in self.views:
            h.update(json.dumps([(rendered[r].pieces, rendered[r].reference) for r in self.index.tolist()]).encode())
        return h.hexdigest()


def collate(encoded: list[dict], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(e["ids"]) for e in encoded)
    b = len(encoded)
    ids = torch.full((b, width), pad, dtype=torch.int64)
    mask = torch.zeros((b, width), dtype=torch.int64)
    labels = torch.full((b, width), -100, dtype=torch.int64)
    mm = torch.zeros((b, width), dtype=torch.int64)
    for i, e in enumerate(encoded):
        n = len(e["ids"])
        t = torch.tensor(e["ids"], dtype=torch.int64)
        ids[i, :n], mask[i, :n], mm[i, :n] = t, 1, torch.tensor(e["mm"], dtype=torch.int64)
        labels[i, :n] = torch.where(torch.tensor(e["loss"]), t, -100)
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels, "mm_token_type_ids": mm}
    with_images = [e for e in encoded if "pixel_values" in e]
    if with_images:
        out["pixel_values"] = torch.cat([e["pixel_values"] for e in with_images])
        out["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in with_images])
    return out


@dataclass
class VLMData:
    train: VLMDataset
    val: Optional[VLMDataset]
    test: VLMDataset
    fingerprint: str
    format: str = "vision-language"
    tokenizer_fingerprint: Optional[str] = None  # the student's processor (kdkit.tasks.vlm sets it; cache keys name it)


def _load(cfg) -> tuple[dict[str, list[VLMRecord]], dict]:
    d, v = cfg.data, cfg.vlm
    if d.source == "jsonl":
        return {"train": jsonl_records(shapes_path(d.path), v)}, {"kind": "jsonl"}
    from kdkit.data.hf import open_hf_dataset
    from kdkit.data.text_sources import hf_splits_wanted

    splits = open_hf_dataset(d.path)
    strict = {"val_split"} | ({"test_split"} if d.test_split != "test" else set())
    wanted = hf_splits_wanted(splits, d.path, d.train_split, d.test_split, d.val_split, key="data", strict=strict)
    return ({role: hf_records(splits[name], name, d.path, v) for role, name in wanted.items()},
            {"kind": "hf", "splits": {n: getattr(splits[n], "_fingerprint", None) for n in wanted.values()}})


def _split(sources: dict[str, list], cfg) -> dict[str, Optional[list]]:
    d, seed = cfg.data, cfg.seed
    train = sources["train"]
    rest = torch.arange(len(train))
    out: dict[str, Optional[list]] = {"val": None}
    if "test" in sources:
        out["test"] = sources["test"]
    else:
        perm = seeded_permutation(len(train), seed, "test")
        k = _carve_count(len(train), d.test_fraction, "test", "data.test_fraction")
        out["test"], rest = [train[i] for i in sorted(perm[:k].tolist())], perm[k:]
    if "val" in sources:
        out["val"] = sources["val"]
        rest = rest[seeded_permutation(len(rest), seed, "train")]
    elif d.val_fraction > 0:
        shuffled = rest[seeded_permutation(len(rest), seed, "val")]
        k = _carve_count(len(shuffled), d.val_fraction, "validation", "data.val_fraction")
        out["val"], rest = [train[i] for i in sorted(shuffled[:k].tolist())], shuffled[k:]
    else:
        rest = rest[seeded_permutation(len(rest), seed, "train")]
    if d.limit_train:
        rest = rest[:d.limit_train]
    out["train"] = [train[i] for i in sorted(rest.tolist())]
    if d.limit_eval:
        out = {k: (v[:d.limit_eval] if v is not None and k != "train" else v) for k, v in out.items()}
    return out


def build_vlm_data(cfg, processor: Any, teacher_processor: Any = None) -> VLMData:
    """Records of data.source (jsonl or hf), split, rendered by the student's processor and, when given (it differs
    from the student's), the teacher's."""
    sources, identity = _load(cfg)
    splits = _split(sources, cfg)
    procs = [("", processor)] + ([("teacher_", teacher_processor)] if teacher_processor is not None else [])
    out: dict[str, Optional[VLMDataset]] = {}
    h = hashlib.sha256(json.dumps({"version": FINGERPRINT_VERSION, "source": identity, "max_length": cfg.vlm.max_length,
                                   "processors": [p.identity() for _, p in procs]}, default=str).encode())
    for role in ("train", "val", "test"):
        records = splits.get(role)
        if records is None:
            out[role] = None
            continue
        if not records:
            raise DataError(f"the {role} split of {cfg.data.source} {cfg.data.path} is empty")
        for rec in records:
            if image_count(rec.messages) != len(rec.images):
                raise DataError(f"{rec.where}: {image_count(rec.messages)} image parts but {len(rec.images)} images")
        views = [(prefix, p, [render(p, rec.messages, rec.where) for rec in records]) for prefix, p in procs]
        out[role] = VLMDataset(records, torch.arange(len(records)), views, cfg.vlm.max_length, cfg.vlm.image_field)
        h.update(role.encode())
        h.update(json.dumps([rec.identity for rec in records], default=str).encode())
        h.update(out[role].digest().encode())
    return VLMData(train=out["train"], val=out["val"], test=out["test"], fingerprint=h.hexdigest())


def shapes_path(path: str) -> str:
    """data.path "shapes:N": the demo's N procedural images (kdkit.data.shapes, seed 0, 48x48), generated once
    into the kdkit cache; any other path as it is."""
    if not path.startswith(SHAPES):
        return path
    from kdkit.cache import cache_dir
    from kdkit.data.shapes import generate

    n = int(path[len(SHAPES):])
    return str(generate(cache_dir() / f"shapes-{n}", n=n, seed=0, size=48))


def vlm_problems(cfg) -> list[tuple[str, str]]:
    """Config problems of task: vlm found before loading anything: the source and the files it names."""
    from kdkit.config.load import _local, _missing_local_dir

    d = cfg.data
    if d.source not in ("jsonl", "hf"):
        return [("data.source", f"task vlm reads jsonl or hf records (got {d.source})")]
    if not d.path:
        return [("data.path", f"source {d.source} needs a path")]
    if d.source == "jsonl" and d.path.startswith(SHAPES):
        n = d.path[len(SHAPES):]
        return [] if n.isdigit() and int(n) > 1 else [("data.path", f"{SHAPES}N needs a number of images N > 1, got {n!r}")]
    if d.source == "jsonl" and not _local(d.path, "file"):
        return [("data.path", f"file not found: {d.path}")]
    if d.source == "hf" and _missing_local_dir(d.path):
        return [("data.path", f"directory not found: {d.path}")]
    return []
