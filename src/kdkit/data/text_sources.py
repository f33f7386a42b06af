"""Text records for task: lm, read strictly from a .jsonl file, a Hugging Face dataset or a directory of text files.

A record is (where, fields): `where` names it in errors ("data.jsonl:7", "hf split 'train' row 3", a file path) and
`fields` is one of the three shapes, checked here so tokenization never meets a malformed record:

- instruction: {"instruction": str, "context": str, "response": str} (context "" when absent; "input" is read
  as context too),
- chat: {"messages": [{"role": str, "content": str}, ...]} with at least one non-empty assistant turn,
- text: {"text": str}.
"""

from __future__ import annotations

import fnmatch

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

from kdkit.data.jsonl import read_jsonl
from kdkit.errors import ConfigError, DataError

FORMATS = ("instruction", "chat", "text")
Record = tuple[str, dict]

_TYPES = {list: "an array", dict: "an object", str: "a string", int: "a number", float: "a number",
          bool: "a boolean", type(None): "null"}


class TextFilesWarning(UserWarning):
    """Some files under a text_files directory were skipped (not UTF-8, or empty)."""


@dataclass
class SourceRecords:
    """One source's records by split: train always, test / val when the source has its own."""

    format: str
    train: list[Record]
    test: Optional[list[Record]] = None
    val: Optional[list[Record]] = None
    identity: dict = field(default_factory=dict)  # what names the source (path, kind, split names)


def detect_format(record: dict, where: str) -> str:
    """auto: messages -> chat, instruction + response -> instruction, text -> text."""
    if "messages" in record:
        return "chat"
    if "instruction" in record and "response" in record:
        return "instruction"
    if "text" in record:
        return "text"
    raise DataError(f"{where}: cannot tell the format from fields {sorted(record)}: expected 'messages' (chat), "
                    "'instruction' and 'response' (instruction) or 'text' (text); or set data.text.format")


def _string(record: dict, key: str, where: str, *, nonempty: bool = True, optional: bool = False) -> str:
    if key not in record or (optional and record[key] is None):
        if optional:
            return ""
        raise DataError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {_TYPES.get(type(value), 'a value')}")
    if nonempty and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def check_record(record: dict, fmt: str, where: str) -> dict:
    """The record's fields in the canonical shape of `fmt`, or a DataError naming `where`."""
    if fmt == "text":
        return {"text": _string(record, "text", where)}
    if fmt == "instruction":
        instruction = _string(record, "instruction", where)
        context = _string(record, "context", where, nonempty=False, optional=True)
        if not context and "input" in record:
            context = _string(record, "input", where, nonempty=False, optional=True)
        return {"instruction": instruction, "context": context, "response": _string(record, "response", where)}
    if "messages" not in record:
        raise DataError(f"{where}: missing field 'messages'")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty array of {{role, content}} objects")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {k} must be an object, got {_TYPES.get(type(m), 'a value')}")
        role = _string(m, "role", f"{where}: message {k}")
        content = _string(m, "content", f"{where}: message {k}", nonempty=role == "assistant")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant turn (nothing to learn)")
    return {"messages": out}


def _resolve(fmt: str, first: dict, where: str) -> str:
    return detect_format(first, where) if fmt == "auto" else fmt


def jsonl_format(path: str, fmt: str) -> str:
    """fmt, or for auto the format of the file's first record."""
    if fmt != "auto":
        return fmt
    number, record = next(read_jsonl(path))  # a file without records is a DataError
    return detect_format(record, f"{path}:{number}")


def jsonl_records(path: str, fmt: str) -> Iterator[Record]:
    """The file's checked records, read lazily line by line (a bad line fails when it is reached)."""
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        yield where, check_record(record, fmt, where)


def load_jsonl_records(path: str, fmt: str) -> SourceRecords:
    fmt = jsonl_format(path, fmt)
    records = list(jsonl_records(path, fmt))
    return SourceRecords(format=fmt, train=records, identity={"kind": "jsonl", "path": str(path)})


def list_text_files(path: str, glob: str, fmt: str, key: str, exclude: Sequence[str] = ()) -> tuple[Path, list[Path]]:
    """(root, the files under it matching `glob` and no `exclude` pattern, sorted by relative path)."""
    if fmt not in ("auto", "text"):
        raise ConfigError([(f"{key}.format" if key != "data" else "data.text.format",
                            f"text_files are plain text: format must be text or auto, not {fmt}")])
    from kdkit.data.corpus import resolve_path

    root = Path(resolve_path(path)).expanduser()
    if not root.is_dir():
        raise DataError(f"{path}: not a directory (text_files needs a directory of text files)")
    files = sorted((p for p in root.glob(glob) if p.is_file()
                    and not any(fnmatch.fnmatchcase(p.relative_to(root).as_posix(), x) for x in exclude)),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise DataError(f"{path}: no file matches {glob!r}")
    return root, files


def read_text_file(f: Path) -> Optional[str]:
    """The file's text (a UTF-8 BOM dropped); None when it is not valid UTF-8."""
    try:
        return f.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    except OSError as e:
        raise DataError(f"cannot read {f}: {e.strerror or e}") from None


def load_text_files(path: str, glob: str, fmt: str, key: str, exclude: Sequence[str] = ()) -> SourceRecords:
    """Every file under `path` matching `glob` and no `exclude` pattern (fnmatch on the path relative to `path`,
    where * also crosses /), sorted by relative path, is one text document."""
    root, files = list_text_files(path, glob, fmt, key, exclude)
    records: list[Record] = []
    undecodable, empty = [], 0
    for f in files:
        text = read_text_file(f)
        if text is None:
            undecodable.append(f)
            continue
        if not text.strip():
            empty += 1
            continue
        records.append((str(f), {"text": text}))
    if undecodable or empty:
        parts = [f"{len(undecodable)} not valid UTF-8 (first: {undecodable[0]})"] if undecodable else []
        parts += [f"{empty} empty"] if empty else []
        warnings.warn(f"{path}: skipped {' and '.join(parts)} of {len(files)} file(s) matching {glob!r}",
                      TextFilesWarning, stacklevel=3)
    if not records:
        raise DataError(f"{path}: none of the {len(files)} file(s) matching {glob!r} holds readable UTF-8 text")
    return SourceRecords(format="text", train=records,
                         identity={"kind": "text_files", "path": str(path), "glob": glob, "exclude": list(exclude),
                                   "files": [p.relative_to(root).as_posix() for p in files]})


_COLUMNS = {"instruction": ("instruction", "context", "input", "response"), "chat": ("messages",), "text": ("text",)}


def hf_records(split: Any, name: str, fmt: str) -> Iterator[Record]:
    """The split's checked rows, lazily (a streamed split, or a map-style one)."""
    columns = [c for c in _COLUMNS[fmt] if c in (split.column_names or ())]
    rows = split.select_columns(columns) if columns else split
    for i, row in enumerate(rows):
        where = f"hf split {name!r} row {i}"
        yield where, check_record(row, fmt, where)


def _hf_rows(split: Any, name: str, fmt: str) -> list[Record]:
    return list(hf_records(split, name, fmt))


def hf_splits_wanted(splits: dict, path: str, train_split: str, test_split: Optional[str], val_split: Optional[str],
                     *, key: str, strict: set[str]) -> dict[str, str]:
    """role -> split name: train always; test / val when the dataset has them (a missing one is a ConfigError only
    when its config key is in `strict`)."""
    if train_split not in splits:
        raise ConfigError([(f"{key}.train_split", f"split {train_split!r} not in {path!r}; "
                            f"available splits: {sorted(splits)}")])
    wanted = {"train": train_split}
    for role, name in (("test", test_split), ("val", val_split)):
        if name is None:
            continue
        if name in splits:
            wanted[role] = name
        elif f"{role}_split" in strict:
            raise ConfigError([(f"data.{role}_split", f"split {name!r} not in {path!r}; available splits: "
                                f"{sorted(splits)} (null: carve it from {train_split!r})")])
    return wanted


def load_hf_records(path: str, fmt: str, train_split: str, test_split: Optional[str], val_split: Optional[str],
                    *, key: str, strict: set[str]) -> SourceRecords:
    """train_split is required; test_split / val_split are used when the dataset has them, and a missing one is a
    ConfigError only when its config key is in `strict` (else it is carved from train by the caller)."""
    from kdkit.data.hf import open_hf_dataset

    splits = open_hf_dataset(path, f"{key}.path" if key != "data" else "data.path")
    wanted = hf_splits_wanted(splits, path, train_split, test_split, val_split, key=key, strict=strict)
    train = splits[train_split]
    if len(train) == 0:
        raise DataError(f"hf split {train_split!r} of {path!r} is empty")
    if fmt == "auto":
        fmt = _resolve(fmt, {c: None for c in train.column_names}, f"hf split {train_split!r} of {path!r}")
    rows = {role: _hf_rows(splits[name], name, fmt) for role, name in wanted.items()}
    used = {name: [getattr(splits[name], "_fingerprint", None), len(splits[name])] for name in wanted.values()}
    return SourceRecords(format=fmt, train=rows["train"], test=rows.get("test"), val=rows.get("val"),
                         identity={"kind": "hf", "path": path, "splits": used})


def load_records(kind: str, path: Optional[str], fmt: str, *, glob: str, train_split: str,
                 test_split: Optional[str], val_split: Optional[str], key: str,
                 strict: Iterable[str] = (), exclude: Sequence[str] = ()) -> SourceRecords:
    """Read one source. `key` is the config path of the source's settings ("data" or "data.text.mixture[i]")."""
    if not path:
        raise ConfigError([(f"{key}.path", f"source {kind} needs a path")])
    if kind == "jsonl":
        return load_jsonl_records(path, fmt)
    if kind == "text_files":
        return load_text_files(path, glob, fmt, key, exclude)
    if kind == "hf":
        return load_hf_records(path, fmt, train_split, test_split, val_split, key=key, strict=set(strict))
    raise ConfigError([(f"{key}.source", f"source {kind!r} is not a text source (jsonl, hf or text_files)")])
