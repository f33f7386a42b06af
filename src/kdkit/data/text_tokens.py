"""Tokenizing text records into compact token stores: the layout, truncation and packing rules are described in
kdkit.data.text's module docstring."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from kdkit.data.text_sources import Record
from kdkit.errors import ConfigError, DataError

_CHUNK = 512  # records tokenized per tokenizer call
_PROBE_Q, _PROBE_A = "kdkit probe question", "kdkit probe answer"


class TokenStore:
    """Samples as flat int32 token ids with a bool loss mask and int64 offsets (N + 1,); per sample also the
    prompt tokens and the reference response for generation (references None: plain text)."""

    def __init__(self, ids: torch.Tensor, loss: torch.Tensor, offsets: torch.Tensor, prompt_ids: torch.Tensor,
                 prompt_offsets: torch.Tensor, references: Optional[list[str]]):
        self.ids, self.loss, self.offsets = ids, loss, offsets
        self.prompt_ids, self.prompt_offsets, self.references = prompt_ids, prompt_offsets, references
        self._digest: Optional[str] = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def digest(self) -> str:
        if self._digest is None:
            h = hashlib.sha256()
            for t, dtype in ((self.ids, "<i4"), (self.loss, "u1"), (self.offsets, "<i8"), (self.prompt_ids, "<i4"),
                             (self.prompt_offsets, "<i8")):
                h.update(t.numpy().astype(dtype).tobytes())
                h.update(b"|")
            h.update(json.dumps(self.references).encode())
            self._digest = h.hexdigest()
        return self._digest


def _offsets(lengths: Sequence[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    if len(lengths):
        out[1:] = torch.cumsum(torch.as_tensor(lengths, dtype=torch.int64), 0)
    return out


def _store(ids: list[np.ndarray], loss: list[np.ndarray], prompts: list[np.ndarray],
           references: Optional[list[str]]) -> TokenStore:
    cat = (lambda parts, dtype: torch.from_numpy(np.concatenate(parts).astype(dtype)) if parts
           else torch.zeros(0, dtype=getattr(torch, dtype)))
    return TokenStore(cat(ids, "int32"), cat(loss, "bool"), _offsets([len(x) for x in ids]), cat(prompts, "int32"),
                      _offsets([len(x) for x in prompts]), references)


Piece = tuple[Any, bool]  # (text or a list of token ids, carries the loss)


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class TextEncoder:
    """Turns checked records into token ids, loss masks, prompts and references (see the module docstring)."""

    def __init__(self, tokenizer: Any, max_length: int, chat_template: bool = True):
        self.tokenizer, self.max_length = tokenizer, int(max_length)
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise ConfigError([("student.tokenizer", "the tokenizer has no EOS token (needed to end responses and "
                                "documents)")])
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.template = bool(chat_template and getattr(tokenizer, "chat_template", None))
        self.prefix = self._special_prefix()  # opens plain samples and text documents (templates write their own)
        self.turn_suffix = self._turn_suffix() if self.template else ""

    def _special_prefix(self) -> list[int]:
        """The tokens the tokenizer puts before a text by itself (a BOS, for Llama-style tokenizers)."""
        with_special = list(self.tokenizer("a", add_special_tokens=True)["input_ids"])
        plain = list(self.tokenizer("a", add_special_tokens=False)["input_ids"])
        for k in range(len(with_special) - len(plain) + 1):
            if with_special[k:k + len(plain)] == plain:
                return with_special[:k]
        return []

    def _render(self, messages: list[dict], generation_prompt: bool, where: str) -> str:
        try:
            out = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                     add_generation_prompt=generation_prompt)
        except Exception as e:
            raise DataError(f"{where}: the tokenizer's chat template fails on this conversation "
                            f"({type(e).__name__}: {e}); fix the record or set data.text.chat_template: false") from e
        return out if isinstance(out, str) else str(out)

    def _turn_suffix(self) -> str:
        """What the template writes after an assistant turn's content (its end-of-turn marker)."""
        try:
            full = self._render([{"role": "user", "content": _PROBE_Q}, {"role": "assistant", "content": _PROBE_A}],
                                False, "probe")
        except DataError:
            return ""
        i = full.rfind(_PROBE_A)
        return full[i + len(_PROBE_A):] if i >= 0 else ""

    def _template_pieces(self, messages: list[dict], where: str) -> tuple[list[Piece], int]:
        last = max(j for j, m in enumerate(messages) if m["role"] == "assistant")
        messages = messages[:last + 1]  # turns after the last answer carry no loss
        full = self._render(messages, False, where)
        pieces: list[Piece] = []
        cursor, prompt_pieces = 0, 0
        for j, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self._render(messages[:j], True, where) if j else ""
            content = m["content"].strip()
            pos = full.find(content, len(prefix)) if full.startswith(prefix) and len(prefix) >= cursor else -1
            if pos < 0:
                raise DataError(f"{where}: cannot find assistant turn {j} in the chat template's rendering (the "
                                "template does not render the conversation incrementally); set "
                                "data.text.chat_template: false to use the plain layout")
            end = pos + len(content)
            end += _common_prefix(self.turn_suffix, full[end:])
            if j == last:
                prompt_pieces = len(pieces) + 1
            pieces += [(full[cursor:len(prefix)], False), (full[len(prefix):end], True)]
            cursor = end
        return pieces, prompt_pieces

    def pieces(self, fmt: str, fields: dict, where: str) -> tuple[list[Piece], int, Optional[str]]:
        """(pieces, how many of them form the generation prompt, reference response or None)."""
        if fmt == "text":
            return [(self.prefix, True), (fields["text"], True), ([self.eos], True)], 0, None
        if fmt == "instruction":
            if self.template:
                user = fields["instruction"] + (f"\n\n{fields['context']}" if fields["context"].strip() else "")
                messages = [{"role": "user", "content": user}, {"role": "assistant", "content": fields["response"]}]
                return (*self._template_pieces(messages, where), fields["response"])
            prompt = f"### Instruction:\n{fields['instruction']}\n\n"
            if fields["context"].strip():
                prompt += f"### Input:\n{fields['context']}\n\n"
            prompt += "### Response:\n"
            return [(self.prefix, False), (prompt, False), (fields["response"], True), ([self.eos], True)], 2, \
                fields["response"]
        messages = fields["messages"]
        reference = [m["content"] for m in messages if m["role"] == "assistant"][-1]
        if self.template:
            return (*self._template_pieces(messages, where), reference)
        pieces: list[Piece] = [(self.prefix, False)]
        text, prompt_pieces = "", 1
        headers = {"system": "### System:\n", "user": "### Instruction:\n"}
        for m in messages:
            if m["role"] == "assistant":
                prompt_pieces = len(pieces) + 1
                pieces += [(text + "### Response:\n", False), (m["content"], True), ([self.eos], True)]
                text = ""
            else:
                text += headers.get(m["role"], f"### {m['role'].capitalize()}:\n") + m["content"] + "\n\n"
        return pieces, prompt_pieces, reference

    def encode(self, fmt: str, records: Sequence[Record], *, truncate: bool = True,
               advance: Callable[[int], None] = lambda n: None) -> TokenStore:
        """Tokenize `records` (batched through the tokenizer) into a TokenStore; truncate=False keeps whole
        documents (for packing)."""
        ids_out, loss_out, prompt_out = [], [], []
        references: Optional[list[str]] = None if fmt == "text" else []
        limit = self.max_length
        for start in range(0, len(records), _CHUNK):
            chunk = records[start:start + _CHUNK]
            built = [self.pieces(fmt, fields, where) for where, fields in chunk]
            texts = [p for pieces, _, _ in built for p, _ in pieces if isinstance(p, str)]
            encoded = iter(self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                                          return_token_type_ids=False)["input_ids"] if texts else [])
            for pieces, prompt_pieces, reference in built:
                ids, loss, prompt_len = [], [], 0
                for k, (p, carries) in enumerate(pieces):
                    tokens = list(next(encoded)) if isinstance(p, str) else list(p)
                    ids += tokens
                    loss += [carries] * len(tokens)
                    if k < prompt_pieces:
                        prompt_len += len(tokens)
                prompt = ids[:prompt_len][-(limit - 1):]
                if truncate and len(ids) > limit:
                    first = loss.index(True) if True in loss else 0
                    lo = max(0, first - (limit - 1))
                    ids, loss = ids[lo:lo + limit], loss[lo:lo + limit]
                ids_out.append(np.asarray(ids, dtype=np.int32))
                loss_out.append(np.asarray(loss, dtype=bool))
                prompt_out.append(np.asarray(prompt, dtype=np.int32))
                if references is not None:
                    references.append(reference)
            advance(len(chunk))
        return _store(ids_out, loss_out, prompt_out, references)


def pack(store: TokenStore, max_length: int) -> TokenStore:
    """The store's documents concatenated and cut into max_length blocks (loss everywhere; see the module doc)."""
    total = len(store.ids)
    full, rest = divmod(total, max_length)
    keep_rest = rest > 0 and (full == 0 or rest >= max(max_length / 4, 2))
    n = full + int(keep_rest)
    offsets = torch.clamp(torch.arange(n + 1, dtype=torch.int64) * max_length, max=total)
    used = int(offsets[-1])
    return TokenStore(store.ids[:used].clone(), torch.ones(used, dtype=torch.bool), offsets,
                      torch.zeros(0, dtype=torch.int32), torch.zeros(n + 1, dtype=torch.int64), None)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 hex of the vocabulary (sorted token -> id), the special tokens and the chat template."""
    special = {name: [getattr(tokenizer, name, None), getattr(tokenizer, f"{name}_id", None)]
               for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    payload = {"vocab": sorted(tokenizer.get_vocab().items()), "special": special,
               "all_special": sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", [])),
               "chat_template": getattr(tokenizer, "chat_template", None)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
