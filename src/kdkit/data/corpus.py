"""The language-model demo's corpus and tokenizer: CPython's standard library, which every machine with Python has.

`data.path: python:stdlib` names the running interpreter's standard-library directory; the demo reads its .py
files without the test suites and site-packages (data.text.exclude). `train_bpe_tokenizer` builds a byte-level BPE
tokenizer with the `tokenizers` library, the way the shipped demo tokenizer was made:

    python -m kdkit.data.corpus OUT_DIR [--vocab-size 4096]
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path
from typing import Iterable

STDLIB = "python:stdlib"
STDLIB_EXCLUDE = ["site-packages/*", "test/*", "*/test/*", "*/tests/*", "idlelib/idle_test/*", "lib2to3/tests/*"]
SPECIAL = ["<|endoftext|>", "<|pad|>"]


def resolve_path(path: str | None) -> str | None:
    """`python:stdlib` -> the standard-library directory of this interpreter; anything else unchanged."""
    return sysconfig.get_paths()["stdlib"] if path == STDLIB else path


def stdlib_files() -> list[Path]:
    """The demo corpus: the standard library's .py files, tests and site-packages left out, sorted."""
    import fnmatch

    root = Path(resolve_path(STDLIB))
    out = []
    for p in sorted(root.glob("**/*.py")):
        rel = p.relative_to(root).as_posix()
        if not any(fnmatch.fnmatchcase(rel, x) for x in STDLIB_EXCLUDE):
            out.append(p)
    return out


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path):
    """A byte-level BPE tokenizer (GPT-2 style pre-tokenization, <|endoftext|> as EOS/BOS, <|pad|> for padding),
    saved as a transformers tokenizer in out_dir; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL[0], bos_token=SPECIAL[0],
                                   pad_token=SPECIAL[1])
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def main() -> None:
    ap = argparse.ArgumentParser(description="Train the language-model demo's tokenizer on the standard library.")
    ap.add_argument("out_dir")
    ap.add_argument("--vocab-size", type=int, default=4096)
    args = ap.parse_args()
    files = stdlib_files()
    texts = (f.read_text(encoding="utf-8", errors="replace") for f in files)
    tok = train_bpe_tokenizer(texts, args.vocab_size, args.out_dir)
    print(f"{len(tok)} tokens from {len(files)} files -> {args.out_dir}")


if __name__ == "__main__":
    main()
