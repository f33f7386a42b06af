"""Reading a run's history.jsonl: tolerant of unknown keys and kinds, and of a last line cut short by a kill."""

from __future__ import annotations

import json
import math
import warnings
from numbers import Real
from pathlib import Path

from kdkit.errors import UserError

# Numeric keys of a train line that are bookkeeping, not loss parts.
NOT_LOSS = {"step", "epoch", "lr", "time_s", "grad_norm", "samples", "tokens", "throughput", "samples_per_s",
            "tokens_per_s", "mem_mb", "peak_mem_mb", "scale"}


class HistoryWarning(UserWarning):
    """A history line was skipped (the last one, cut short while being written)."""


def read_history(path: str | Path) -> list[dict]:
    """All JSON objects of a history.jsonl, in order.

    A corrupt *last* line is what a run killed mid-write leaves: it is skipped with a HistoryWarning. A corrupt
    line anywhere else means the file was damaged, which a report can't paper over: UserError naming file:line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: not found (the run wrote no history)") from None
    numbered = [(i + 1, s) for i, s in enumerate(lines) if s.strip()]
    records = []
    for j, (lineno, text) in enumerate(numbered):
        try:
            rec = json.loads(text)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if j == len(numbered) - 1:
                warnings.warn(f"{path}:{lineno}: ignoring an incomplete last line ({e})", HistoryWarning,
                              stacklevel=2)
                break
            raise UserError(f"{path}:{lineno}: not a JSON object ({e})") from None
        records.append(rec)
    return records


def is_number(v: object) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


def of_kind(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r.get("kind") == kind and is_number(r.get("step"))]


def loss_parts(train: list[dict], preferred: list[str] = ()) -> list[str]:
    """Names of the logged loss series: "loss" (the total) first, then `preferred` (config term names), then others."""
    found: list[str] = []
    for r in train:
        for k, v in r.items():
            if k not in NOT_LOSS and k != "kind" and is_number(v) and k not in found:
                found.append(k)
    order = ["loss", *preferred]
    return [k for k in order if k in found] + [k for k in found if k not in order]


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that carry a finite `key`."""
    pts = [(r["step"], r[key]) for r in records if is_number(r.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts]
