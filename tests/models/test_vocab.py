"""Vocabulary alignment of student and teacher heads: one tokenizer (maybe padded heads) or two."""

import pytest
import torch
from transformers import AutoTokenizer

from kdkit.errors import UserError
from kdkit.models import align_vocabularies, slice_head

from tiny_lm import tiny_tokenizer

OTHER = ["Zebras graze quietly near the river bank at dawn.", "SELECT name FROM users WHERE id = 7;",
         "Les chats dorment beaucoup pendant la journée."] * 30


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    base = tmp_path_factory.mktemp("toks")
    return {"a": tiny_tokenizer(base / "a", 300), "a_copy": AutoTokenizer.from_pretrained(base / "a"),
            "a_small": tiny_tokenizer(base / "a_small", 280),
            "other": tiny_tokenizer(base / "other", 290, corpus=OTHER)}


def test_one_tokenizer_padded_heads_are_sliced(toks):
    a, b = toks["a"], toks["a_copy"]
    n = len(a)
    align = align_vocabularies(a, b, student_rows=n + 4, teacher_rows=n + 20)
    assert align.kind == "slice" and align.size == n == align.student_size == align.teacher_size
    assert align.message == (f"one tokenizer ({n} tokens); teacher head has {n + 20} rows, student {n + 4}: "
                             f"losses use the first {n} rows of both")
    s_w, t_w = torch.randn(n + 4, 8, requires_grad=True), torch.randn(n + 20, 12)
    s, t = align.heads(s_w, t_w)
    assert s.shape == (n, 8) and t.shape == (n, 12)
    s.sum().backward()
    assert s_w.grad[:n].eq(1).all() and s_w.grad[n:].eq(0).all()  # a view: the gradient reaches the full weight
    # a head smaller than the tokenizer: the smaller head decides, and the message says what is lost
    short = align_vocabularies(a, b, student_rows=n - 2, teacher_rows=n + 20)
    assert short.kind == "slice" and short.size == n - 2 and "no distillation signal" in short.message


def test_one_tokenizer_same_heads(toks):
    n = len(toks["a"])
    align = align_vocabularies(toks["a"], toks["a_copy"], n, n)
    assert align.kind == "same" and align.size == n and "as they are" in align.message
    w = torch.randn(n, 4)
    assert slice_head(w, align.size) is w


def test_a_smaller_bpe_of_the_same_corpus_splits_text_differently(toks):
    """Fewer merges: its ids are a prefix of the bigger one's, but the teacher would read a split it never saw."""
    big, small = toks["a"], toks["a_small"]
    vb, vs = big.get_vocab(), small.get_vocab()
    assert all(vb.get(t) == i for t, i in vs.items())  # the same strings at the same ids
    align = align_vocabularies(small, big, len(small), len(big))
    assert align.kind == "different" and "split text differently" in align.message
    with pytest.raises(UserError, match="split text differently"):
        align_vocabularies(small, big, len(small), len(big), strict=True)


def test_different_tokenizers(toks):
    s, t = toks["a"], toks["other"]
    align = align_vocabularies(s, t, student_rows=len(s) + 4, teacher_rows=len(t))
    assert align.kind == "different" and align.size is None
    assert (align.student_size, align.teacher_size) == (len(s), len(t))
    assert len(align.mismatches) == 3 and str(len(s)) in align.message and str(len(t)) in align.message
    assert all(f"{i}" in align.message for i in align.mismatches) and "Universal Logit Distillation" in align.message
    sv, tv = s.get_vocab(), t.get_vocab()
    inv_s, inv_t = {i: k for k, i in sv.items()}, {i: k for k, i in tv.items()}
    first = [i for i in range(min(len(s), len(t))) if inv_s.get(i) != inv_t.get(i)][:3]
    assert list(align.mismatches) == first
    with pytest.raises(UserError, match=rf"^teacher\.tokenizer: .*student {len(s)} tokens .*teacher {len(t)} tokens"
                                        rf".*first differing ids: {first[0]} \(student"):
        align_vocabularies(s, t, len(s) + 4, len(t), strict=True)


def test_special_tokens_at_other_ids_are_different(tmp_path):
    a = tiny_tokenizer(tmp_path / "a", 300)
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    # the same merges, but the two special tokens swapped: every shared id must map to the same string
    raw = Tokenizer.from_str(a.backend_tokenizer.to_str())
    vocab = a.get_vocab()
    ids = (vocab["<|endoftext|>"], vocab["<|pad|>"])
    swapped = raw.to_str().replace('"<|endoftext|>"', '"<|TMP|>"').replace('"<|pad|>"', '"<|endoftext|>"').replace(
        '"<|TMP|>"', '"<|pad|>"')
    b = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(swapped), eos_token="<|endoftext|>",
                                pad_token="<|pad|>")
    align = align_vocabularies(a, b, len(a), len(b))
    assert align.kind == "different" and set(align.mismatches) == set(ids)


def test_slice_head_bounds():
    w = torch.randn(10, 3)
    assert slice_head(w, 4).shape == (4, 3) and slice_head(w, None) is w
    with pytest.raises(ValueError):
        slice_head(w, 11)
