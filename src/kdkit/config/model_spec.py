"""Model specs of the run config: where a teacher or student comes from and how it is loaded (`student`, `teacher`,
an ensemble's members, LoRA). Split from kdkit.config.schema, which re-exports every name."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from kdkit.config.base import Section, positive_size as _positive_size

class LoraConfig(Section):
    """A LoRA adapter on the student (through peft): only the adapter trains."""

    r: int = Field(16, gt=0, description="Rank of the update matrices.")
    alpha: float = Field(32.0, gt=0.0, description="Scaling numerator (the update is scaled by alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter's input.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field("all-linear", description="Module names to adapt, or all-linear.")
    export: Literal["merged", "adapter"] = Field("merged", description="student/: the base with the adapter merged in, or the adapter alone.")


class ModelConfig(Section):
    """A teacher or student. Exactly one of `pretrained`, `hf_config`, `factory`, `run` says where it comes from."""

    pretrained: Optional[str] = Field(
        None, description="Hugging Face image classifier: hub ID or local save_pretrained directory (AutoModelForImageClassification).")
    hf_config: Optional[dict[str, Any]] = Field(
        None, description="Build a Hugging Face model from a config: {model_type: vit, hidden_size: 384, ...}, or "
        "{base: <hub ID or dir>, num_hidden_layers: 6, ...} to start from that model's config with overrides; random weights.")
    factory: Optional[str] = Field(None, description="Any nn.Module: 'package.module:function' or 'path/to/file.py:function', called with `kwargs`.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for `factory`.")
    run: Optional[str] = Field(None, description="A previous kdkit run directory: its exported student is loaded as is (e.g. a teacher trained by kdkit).")
    image_size: Optional[tuple[int, int]] = Field(
        None, description="Input size (H, W) the model expects; the batch is resized for it. Null: the model's own (HF config) or the data's.")
    mean: Optional[list[float]] = Field(None, description="Per-channel normalisation mean; null: the model's image processor's, else 0.5.")
    std: Optional[list[float]] = Field(None, description="Per-channel normalisation std; null: the model's image processor's, else 0.5.")
    trust_remote_code: bool = Field(False, description="Allow a hub model's own code to run (off unless set here).")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit) for `pretrained`.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory where the model supports it (Hugging Face models).")
    tokenizer: Optional[str] = Field(None, description="lm: tokenizer hub ID or directory (null: the model's own, from pretrained, run or hf_config.base).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="lm: weight dtype (auto: float32 for the student, the checkpoint's own for the teacher).")
    quantization: Optional[Literal["8bit", "4bit"]] = Field(None, description="lm teacher: load in 8-bit or 4-bit with bitsandbytes (CUDA only).")
    fidelity_batches: int = Field(
        2, ge=0, description="lm teacher in reduced precision (quantization or float16/bfloat16): batches of validation "
        "data on which the KL from a float32 copy is printed; 0 turns the check off.")
    lora: Optional[LoraConfig] = Field(None, description="lm student: train a LoRA adapter instead of every weight (QLoRA with quantization).")
    cache: Optional[str] = Field(None, description="teacher: a directory written by `kdkit cache`: train from the teacher's stored outputs "
                                 "without loading it (its source, when also given, must be the one the cache was made from).")
    ensemble: Optional[list["TeacherMember"]] = Field(
        None, description="classification teacher: several teachers (each a model spec with `name` and `weight`), of any "
        "architectures and input sizes; kd/dkd terms learn their combined soft targets, or one teacher's (LossTerm.teacher).")
    weighting: Literal["fixed", "confidence"] = Field(
        "fixed", description="ensemble: how soft targets are averaged: by the members' fixed weights, or per sample by "
        "each member's confidence in the true label (weight x its probability of the label, normalised).")
    offload: bool = Field(False, description="ensemble: keep the members on the CPU and move each to the accelerator "
                          "in turn (slower; for teachers that do not fit together).")
    derive_from: Optional[Literal["teacher"]] = Field(
        None, description="student: a Hugging Face ViT, BERT-like or decoder model made from the teacher's config with "
        "`num_layers`, `hidden_size` and `overrides` changed, initialised per `init`; both parameter counts are printed.")
    num_layers: Optional[int] = Field(None, gt=0, description="derive_from: the student's number of layers (null: the teacher's).")
    hidden_size: Optional[int] = Field(None, gt=0, description="derive_from: the student's width (null: the teacher's).")
    overrides: dict[str, Any] = Field(default_factory=dict, description="derive_from: other config keys to change "
                                      "(num_attention_heads, intermediate_size, ...).")
    init: Literal["teacher_layers", "random"] = Field(
        "teacher_layers", description="derive_from: teacher_layers copies embeddings, head and every k-th layer from "
        "the teacher (DistilBERT style; a narrower width keeps evenly spaced rows and columns of each weight); random: fresh weights.")

    _size = field_validator("image_size")(classmethod(lambda cls, v: _positive_size(v)))

    @property
    def factory_file(self) -> Optional[str]:
        """The file of a 'path/file.py:function' factory (None for 'package.module:function' or no factory)."""
        if self.factory is None:
            return None
        file = self.factory.rpartition(":")[0]
        return file if file.endswith(".py") else None

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        given = [k for k in ("pretrained", "hf_config", "factory", "run", "ensemble", "derive_from")
                 if getattr(self, k) is not None]
        if len(given) != 1 and not (self.cache is not None and not given):
            raise ValueError(f"give exactly one of pretrained, hf_config, factory, run, ensemble, derive_from "
                             f"(got {given or 'none'})")
        derive = [k for k in ("num_layers", "hidden_size") if getattr(self, k) is not None] + \
            (["overrides"] if self.overrides else [])
        if derive and self.derive_from is None:
            raise ValueError(f"{', '.join(derive)}: only with derive_from")
        if self.ensemble is not None and len(self.ensemble) < 2:
            raise ValueError("ensemble: give at least two teachers")
        if self.ensemble is not None:
            names = [m.name for m in self.ensemble]
            if len(set(names)) != len(names):
                raise ValueError(f"ensemble: member names must be unique, got {names}")
        if self.kwargs and self.factory is None:
            raise ValueError("kwargs is only used with factory")
        return self


class TeacherMember(ModelConfig):
    """One teacher of an ensemble."""

    name: str = Field(..., min_length=1, description="How loss terms (LossTerm.teacher), logs and reports name this teacher.")
    weight: float = Field(1.0, gt=0.0, description="Its share of the combined soft targets (weights are normalised).")


ModelConfig.model_rebuild()
