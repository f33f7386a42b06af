"""Tiny language models and a tokenizer trained here, for tests: no hub, seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "### Instruction:\nName a colour.\n\n### Response:\nBlue.",
    "import os\nprint(os.getcwd())\n",
    "A tokenizer splits text into tokens; a model predicts the next one.",
] * 20


def tiny_tokenizer(directory: Path, vocab_size: int = 300, corpus: list[str] | None = None):
    """A byte-level BPE tokenizer trained on a few sentences, saved as a transformers tokenizer in `directory`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus or CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   bos_token="<|endoftext|>")
    Path(directory).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    return fast


def tiny_causal_lm(model_type: str = "qwen2", vocab_size: int = 300, hidden: int = 16, layers: int = 2, **extra):
    """A randomly initialised causal LM of the given family (qwen2, llama, mistral, ...): hidden 16, 2 layers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                               num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                               max_position_embeddings=256, tie_word_embeddings=False, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


def save_tiny_lm(directory: Path, tokenizer_dir: Path, model_type: str = "qwen2", **kwargs) -> Path:
    """save_pretrained a tiny LM with the tokenizer of `tokenizer_dir` beside it: a local 'hub ID'."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_causal_lm(model_type, vocab_size=kwargs.pop("vocab_size", len(tok)), **kwargs)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return Path(directory)
