"""Vision-language records from jsonl files or Hugging Face datasets, checked once, before any model is loaded.

A record is one conversation about one or more images:
  {"image": "imgs/0001.png", "question": "How many circles?", "answer": "three"}      (field names: vlm.*_field)
  {"messages": [{"role": "user", "content": [{"type": "image", "image": "imgs/0001.png"},
                                            {"type": "text", "text": "How many circles?"}]},
                {"role": "assistant", "content": "three"}]}
Image paths are relative to the jsonl file. In an hf dataset the image column holds images (or paths); a messages
record's image parts then take the images of that column in order. A line that is not JSON, a missing field, an
empty answer, or a missing or unreadable image stops the run with a DataError naming the file and line (hf: the
split and row).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdkit.config.schema import VLMConfig
from kdkit.errors import DataError


@dataclass
class VLMRecord:
    """messages: chat messages whose image parts are {"type": "image"}; images: one reference per image part, in
    order: an absolute path, or ("hf", split, row, j); where: "file:line" or "hf split 'train' row 7"."""

    messages: list[dict]
    images: list[Any]
    where: str
    identity: list = field(default_factory=list)  # what the fingerprint hashes for the images


def _text(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {name!r} must be a non-empty string")
    return value


def _check_image(path: Path, where: str) -> list:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"{where}: image not found: {path}")
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{where}: unreadable image {path}: {type(e).__name__}: {e}") from None
    st = path.stat()
    return [str(path), st.st_size, int(st.st_mtime)]


def _content(parts: Any, where: str, on_image) -> Any:
    """A message's content with image parts reduced to {"type": "image"} (on_image(part) is called for each)."""
    if isinstance(parts, str):
        return parts
    if not isinstance(parts, list):
        raise DataError(f"{where}: message content must be a string or a list of parts")
    out = []
    for part in parts:
        if not isinstance(part, dict):
            raise DataError(f"{where}: a content part must be an object")
        kind = part.get("type") or ("image" if "image" in part else "text")
        if kind == "image":
            on_image(part)
            out.append({"type": "image"})
        elif kind == "text":
            out.append({"type": "text", "text": str(part.get("text", ""))})
        else:
            raise DataError(f"{where}: unsupported content part type {kind!r} (image or text)")
    return out


def _answer_of(messages: list[dict], where: str) -> str:
    last = messages[-1] if messages else {}
    if last.get("role") != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's answer")
    content = last["content"]
    text = content if isinstance(content, str) else "".join(p.get("text", "") for p in content if p["type"] == "text")
    return _text(text, where, "answer")


def make_record(obj: Any, cfg: VLMConfig, where: str, image_ref) -> VLMRecord:
    """One record from a parsed object; image_ref(value, j) -> (reference, identity) for the j-th image."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object")
    images, identity = [], []

    def add(value: Any) -> None:
        ref, ident = image_ref(value, len(images))
        images.append(ref)
        identity.append(ident)

    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    if obj.get(cfg.messages_field) is not None:
        raw = obj[cfg.messages_field]
        if not isinstance(raw, list) or not raw:
            raise DataError(f"{where}: field {cfg.messages_field!r} must be a non-empty list of messages")
        messages = []
        for m in raw:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or "content" not in m:
                raise DataError(f"{where}: each message needs a role (system, user, assistant) and content")
            messages.append({"role": m["role"],
                             "content": _content(m["content"], where, lambda p: add(p.get("image", p.get("path"))))})
        if messages[0]["role"] != "system":
            messages = system + messages
        _answer_of(messages, where)
    else:
        for name in (cfg.image_field, cfg.question_field, cfg.answer_field):
            if name not in obj:
                raise DataError(f"{where}: missing field {name!r} (or {cfg.messages_field!r})")
        question = _text(obj[cfg.question_field], where, cfg.question_field)
        answer = _text(obj[cfg.answer_field], where, cfg.answer_field)
        add(obj[cfg.image_field])
        messages = system + [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                             {"role": "assistant", "content": answer}]
    return VLMRecord(messages, images, where, identity)


def jsonl_records(path: str, cfg: VLMConfig) -> list[VLMRecord]:
    file = Path(path).expanduser()
    base = file.parent

    records = []
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: cannot read: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{file}:{n}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise DataError(f"{where}: not valid JSON ({e})") from None

        def ref(value: Any, j: int, where=where):
            if not isinstance(value, str) or not value:
                raise DataError(f"{where}: image {j}: expected a file path")
            p = (base / value).resolve() if not Path(value).is_absolute() else Path(value)
            return str(p), _check_image(p, where)

        records.append(make_record(obj, cfg, where, ref))
    if not records:
        raise DataError(f"{file}: no records")
    return records


def hf_records(split: Any, name: str, path: str, cfg: VLMConfig) -> list[VLMRecord]:
    """Rows of one hf split; images stay in the dataset and are read when a batch is built."""
    columns = [c for c in split.column_names if c != cfg.image_field]
    texts = split.select_columns(columns) if columns else None
    if cfg.image_field not in split.column_names:
        raise DataError(f"hf {path!r} split {name!r}: no column {cfg.image_field!r} (vlm.image_field)")
    fp = getattr(split, "_fingerprint", None)
    records = []
    for i in range(len(split)):
        where = f"hf {path!r} split {name!r} row {i}"
        obj = dict(texts[i]) if texts is not None else {}
        obj.setdefault(cfg.image_field, None)
        records.append(make_record(obj, cfg, where, lambda value, j, i=i: (("hf", split, i, j), [fp, name, i, j])))
    return records


def load_image(ref: Any, where: str, image_field: str = "image"):
    """The RGB PIL image a record references; DataError naming the record when it cannot be read."""
    from PIL import Image

    try:
        if isinstance(ref, tuple) and ref and ref[0] == "hf":
            _, split, row, j = ref
            value = split[row][image_field]
            value = value[j] if isinstance(value, (list, tuple)) else value
            if isinstance(value, dict):  # an undecoded Image feature: {"bytes", "path"}
                import io

                value = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else value.get("path")
            if isinstance(value, str):
                value = Image.open(value)
            if not isinstance(value, Image.Image):
                raise DataError(f"{where}: image {j}: not an image ({type(value).__name__})")
            return value.convert("RGB")
        with Image.open(ref) as im:
            return im.convert("RGB")
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{where}: unreadable image {ref if isinstance(ref, str) else ''}: {type(e).__name__}: {e}") from None


def image_count(messages: list[dict]) -> int:
    return sum(1 for m in messages if not isinstance(m["content"], str) for p in m["content"] if p["type"] == "image")

