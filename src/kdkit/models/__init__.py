"""Teachers and students: build from config, wrap, freeze, save and load."""

from kdkit.models.build import build_model, fingerprint_model, load_exported, resolve_factory, save_model
from kdkit.models.classifier import ImageClassifier
from kdkit.models.teacher import FrozenTeacher

__all__ = ["FrozenTeacher", "ImageClassifier", "build_model", "fingerprint_model",
           "load_exported", "resolve_factory", "save_model"]

# Causal language models (task: lm)
from kdkit.models.causal import CausalLMStudent, FrozenCausalTeacher, teacher_hidden  # noqa: E402
from kdkit.models.lm import build_causal_lm, load_tokenizer  # noqa: E402
from kdkit.models.lora import apply_lora, load_causal_lm_export, save_causal_lm  # noqa: E402
from kdkit.models.vocab import VocabAlignment, align_vocabularies, slice_head  # noqa: E402

__all__ += ["CausalLMStudent", "FrozenCausalTeacher", "VocabAlignment", "align_vocabularies", "apply_lora",
            "build_causal_lm", "load_causal_lm_export", "load_tokenizer", "save_causal_lm", "slice_head",
            "teacher_hidden"]
