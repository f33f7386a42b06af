"""JSON Lines files read strictly: every problem is a DataError naming `file:line`, never a traceback.

Shared by every source that reads records from a .jsonl file (image manifests now, text data later).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

from kdkit.errors import DataError

_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def read_jsonl(path: str | Path, required: Sequence[str] = (),
               nonempty: Sequence[str] = ()) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for each non-blank line of a .jsonl file.

    Each line must be UTF-8 JSON holding an object with every `required` and `nonempty` field; a `nonempty`
    field may not be an empty or whitespace-only string (other types are the caller's to check). Blank lines
    are skipped; a file without any record is an error too.
    """
    path = Path(path)
    try:
        f = path.open("rb")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    records = 0
    with f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM may open the file
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {_JSON_TYPES.get(type(record), 'a value')}")
            for key in (*required, *nonempty):
                if key not in record:
                    raise DataError(f"{where}: missing field {key!r}")
            for key in nonempty:
                if isinstance(record[key], str) and not record[key].strip():
                    raise DataError(f"{where}: field {key!r} is empty")
            records += 1
            yield number, record
    if records == 0:
        raise DataError(f"{path}: no records (the file is empty or blank)")
