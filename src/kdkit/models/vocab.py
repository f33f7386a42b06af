"""Student and teacher vocabularies: do the heads' rows mean the same tokens, and how many rows does the loss use?

Three outcomes:
  same       one tokenizer and heads of one size: the heads are used as they are
  slice      one tokenizer (the shared ids map to the same strings) but head sizes differ, as padded heads do
             (Qwen2.5-7B's 152064 rows against 0.5B's 151936): both heads are cut to the rows both have tokens for
  different  different tokenizers: logits cannot be compared id by id (the trainer uses Universal Logit
             Distillation), or, with strict=True, a UserError naming both sizes and the first ids that disagree
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch

from kdkit.errors import UserError

SHOW_MISMATCHES = 3
# Texts both tokenizers split to compare their segmentation: one vocabulary can still split text differently (a BPE
# with fewer merges is a prefix of one with more), and a teacher fed the student's split is then off its own.
PROBES = ("The quick brown fox jumps over the lazy dog; it isn't tired.", "def area(r):\n    return 3.14159 * r ** 2\n",
          "In 2024, 1,234 people paid $56.78 each.", "naïve café — Straße, 東京, 🙂")


@dataclass(frozen=True)
class VocabAlignment:
    """How the loss lines up the student's and teacher's head rows.

    size: rows of both heads the loss uses (same, slice); None for different tokenizers, where each side keeps
    its own `student_size` / `teacher_size` rows (its tokenizer's length, at most its head's rows)."""

    kind: Literal["same", "slice", "different"]
    size: Optional[int]
    message: str
    student_rows: int
    teacher_rows: int
    student_tokens: int
    teacher_tokens: int
    student_size: int
    teacher_size: int
    mismatches: tuple[int, ...] = field(default=())

    def heads(self, student_weight: torch.Tensor, teacher_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both head weights cut to the rows the loss uses (views: gradients reach the student's weight)."""
        return slice_head(student_weight, self.student_size), slice_head(teacher_weight, self.teacher_size)


def slice_head(weight: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    """The first `size` rows of a head weight (V, H) as a view; the weight itself when size is None or V."""
    if size is None or size == weight.shape[0]:
        return weight
    if not 0 < size <= weight.shape[0]:
        raise ValueError(f"cannot take {size} rows of a head with {weight.shape[0]}")
    return weight[:size]


def _id_to_token(tokenizer: Any) -> dict[int, str]:
    vocab = tokenizer.get_vocab()  # includes added (special) tokens
    return {int(i): str(t) for t, i in vocab.items()}


def _show(token: Optional[str]) -> str:
    if token is None:
        return "(none)"
    return repr(token if len(token) <= 24 else token[:21] + "...")


def _differing_ids(student_tokenizer: Any, teacher_tokenizer: Any, shared: int,
                   limit: int = SHOW_MISMATCHES) -> tuple[list[int], dict[int, str], dict[int, str]]:
    inv_s, inv_t = _id_to_token(student_tokenizer), _id_to_token(teacher_tokenizer)
    found = [i for i in range(shared) if inv_s.get(i) != inv_t.get(i)][:limit]
    if not found:  # the special tokens: one string, one id, wherever both tokenizers have it
        vocab_s, vocab_t = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        specials = set(getattr(student_tokenizer, "all_special_tokens", [])) | set(
            getattr(teacher_tokenizer, "all_special_tokens", []))
        for token in sorted(specials):
            i_s, i_t = vocab_s.get(token), vocab_t.get(token)
            if i_s is not None and i_t is not None and i_s != i_t:
                found.append(min(i_s, i_t))
        found = sorted(set(found))[:limit]
    return found, inv_s, inv_t


def _splits_differently(student_tokenizer: Any, teacher_tokenizer: Any) -> Optional[str]:
    """The first probe text the two tokenizers split into different ids, shown briefly; None when none."""
    for text in PROBES:
        a = list(student_tokenizer(text, add_special_tokens=False)["input_ids"])
        b = list(teacher_tokenizer(text, add_special_tokens=False)["input_ids"])
        if a != b:
            k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return (f"{_show(text)}: student {len(a)} tokens, teacher {len(b)}, from token {k}: student "
                    f"{_show(student_tokenizer.decode(a[k:k + 2]))}, teacher {_show(teacher_tokenizer.decode(b[k:k + 2]))}")
    return None


def align_vocabularies(student_tokenizer: Any, teacher_tokenizer: Any, student_rows: int, teacher_rows: int, *,
                       strict: bool = False, where: str = "teacher.tokenizer") -> VocabAlignment:
    """Decide how the student's head (student_rows) and the teacher's (teacher_rows) line up.

    The tokenizers are one when every id below the shorter one's length maps to the same token string in both
    (special tokens included) and they split the PROBES texts into the same ids. strict=True (or a caller that cannot distil across tokenizers) makes different
    tokenizers a UserError naming `where`, both sizes and the first ids that disagree."""
    n_s, n_t = len(student_tokenizer), len(teacher_tokenizer)
    shared = min(n_s, n_t)
    student_size, teacher_size = min(n_s, student_rows), min(n_t, teacher_rows)
    sizes = f"student {n_s} tokens (head {student_rows} rows), teacher {n_t} tokens (head {teacher_rows} rows)"
    if student_tokenizer is teacher_tokenizer:
        bad: list[int] = []
        inv_s = inv_t = {}
    else:
        bad, inv_s, inv_t = _differing_ids(student_tokenizer, teacher_tokenizer, shared)
    split = None if bad or student_tokenizer is teacher_tokenizer else _splits_differently(student_tokenizer,
                                                                                             teacher_tokenizer)
    if bad or split:
        shown = ", ".join(f"{i} (student {_show(inv_s.get(i))}, teacher {_show(inv_t.get(i))})" for i in bad)
        what = f"first differing ids: {shown}" if bad else f"their ids agree, but they split text differently ({split})"
        if strict:
            raise UserError(f"{where}: the student and teacher tokenizers differ: {sizes}; {what}. Distil from a "
                            "teacher with the student's tokenizer (or its family)")
        what = f"ids {', '.join(map(str, bad))} differ ({shown})" if bad else what
        message = (f"different tokenizers: {sizes}; {what}: the loss compares sorted distributions (Universal "
                   "Logit Distillation), not ids")
        return VocabAlignment("different", None, message, student_rows, teacher_rows, n_s, n_t,
                              student_size, teacher_size, tuple(bad))
    one = f"one tokenizer ({n_s} tokens)" if n_s == n_t else (
        f"tokenizers agree on their first {shared} ids (student {n_s} tokens, teacher {n_t})")
    if n_s == n_t and student_rows == teacher_rows:
        return VocabAlignment("same", student_rows, f"{one}; both heads have {student_rows} rows: losses use them "
                              "as they are", student_rows, teacher_rows, n_s, n_t, student_rows, teacher_rows)
    size = min(shared, student_rows, teacher_rows)
    message = (f"{one}; teacher head has {teacher_rows} rows, student {student_rows}: losses use the first {size} "
               "rows of both")
    if size < shared:
        message += f" (ids {size}..{shared - 1} lie beyond a head and get no distillation signal)"
    return VocabAlignment("slice", size, message, student_rows, teacher_rows, n_s, n_t, size, size)
