"""metrics.json: the final figures of a run, assembled per the contract in DESIGN.md."""

from __future__ import annotations

from numbers import Real
from typing import Sequence


def _num(d: dict | None, key: str) -> float | None:
    """A finite number stored under `key`, else None (bools are not figures)."""
    if not d:
        return None
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, Real):
        return None
    return float(v)


def build_metrics(task: str, student: dict, *, teacher: dict | None = None, baseline: dict | None = None,
                  quality_keys: Sequence[str] = ("accuracy", "top5")) -> dict:
    """Combine per-model figures into the metrics.json dict.

    "gain" (student - baseline, per quality key both have) appears only with a baseline; "compression"
    (teacher.params / student.params) only with a teacher; "speedup" (teacher.latency_ms / student.latency_ms)
    only when both latencies were measured. Derived numbers are rounded to 4 decimals.
    """
    out: dict = {"task": task, "student": dict(student)}
    if teacher is not None:
        out["teacher"] = dict(teacher)
    if baseline is not None:
        out["baseline"] = dict(baseline)
        gain = {}
        for k in quality_keys:
            s, b = _num(student, k), _num(baseline, k)
            if s is not None and b is not None:
                gain[k] = round(s - b, 4)
        out["gain"] = gain
    if teacher is not None:
        tp, sp = _num(teacher, "params"), _num(student, "params")
        if tp is not None and sp:
            out["compression"] = round(tp / sp, 4)
        tl, sl = _num(teacher, "latency_ms"), _num(student, "latency_ms")
        if tl is not None and sl:
            out["speedup"] = round(tl / sl, 4)
    return out
