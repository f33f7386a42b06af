"""The run config: typed, validated once, unknown keys rejected.

Every field carries its default and meaning; `kdkit.config.reference` renders them into the README's config
reference, so the docs and the code cannot drift apart.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, PositiveInt, field_validator, model_validator

from kdkit.config.base import Section, positive_size as _positive_size
from kdkit.config.model_spec import LoraConfig, ModelConfig, TeacherMember
from kdkit.losses.divergence import DIVERGENCE_KINDS

# the sections, with the model specs of kdkit.config.model_spec re-exported
__all__ = ["AugmentConfig", "CacheConfig", "Config", "DataConfig", "DistillConfig", "EvalConfig", "LoraConfig",
           "LossTerm", "ModelConfig", "TeacherMember", "TextConfig", "TextSource", "TrainConfig", "VLMConfig"]


class AugmentConfig(Section):
    """Augmentation applied to the training batch; teacher and student see the same augmented view."""

    random_crop_padding: int = Field(0, ge=0, description="Zero-pad by this many pixels, then crop back at a random offset (0: off).")
    hflip: bool = Field(False, description="Flip each training image horizontally with probability 0.5.")
    random_resized_crop: Optional[tuple[float, float]] = Field(
        None, description="Scale range (min, max) of a random-resized crop, e.g. [0.6, 1.0] (null: off).")

    @field_validator("random_resized_crop")
    @classmethod
    def _scale_range(cls, v):
        if v is not None and not (0.0 < v[0] <= v[1] <= 1.0):
            raise ValueError("needs 0 < min <= max <= 1")
        return v


class TextSource(Section):
    """One source of a weighted text mixture."""

    source: Literal["jsonl", "hf", "text_files"] = Field(..., description="jsonl file, Hugging Face dataset, or a directory of text files.")
    path: str = Field(..., description="The .jsonl file, dataset ID / directory, or the directory of text files.")
    weight: float = Field(1.0, gt=0.0, description="Sampling weight: this source's share of the training samples is weight / sum of weights.")
    format: Literal["auto", "instruction", "chat", "text"] = Field("auto", description="As data.text.format, for this source.")
    glob: str = Field("**/*.txt", description="text_files: which files under path.")
    exclude: list[str] = Field(default_factory=list, description="text_files: patterns of files to leave out (as data.text.exclude).")
    train_split: str = Field("train", description="hf: the split read.")


class TextConfig(Section):
    """Text data for task: lm (data.source jsonl, hf or text_files)."""

    format: Literal["auto", "instruction", "chat", "text"] = Field(
        "auto", description="instruction: {instruction, context or input, response} objects (databricks-dolly-15k); chat: "
        "{messages: [{role, content}, ...]}, loss on assistant turns; text: {text} or plain files, loss on every token; "
        "auto: decided from the first record's fields.")
    max_length: int = Field(512, gt=1, description="Tokens per sample; longer samples are truncated (the response keeps its start).")
    packing: bool = Field(False, description="text: concatenate documents (separated by EOS) and cut them into max_length blocks.")
    glob: str = Field("**/*.txt", description="text_files: which files under data.path (e.g. '**/*.py').")
    exclude: list[str] = Field(default_factory=list, description="text_files: fnmatch patterns of paths relative to "
                               "data.path to leave out, '*' crossing '/' (e.g. ['site-packages/*', 'test/*']).")
    mixture: Optional[list[TextSource]] = Field(
        None, description="Several sources with sampling weights (instruction, code, multilingual, ...); replaces data.source/path.")
    chat_template: bool = Field(True, description="Format prompts with the student tokenizer's chat template when it has one "
                                "(else a plain '### Instruction / ### Response' layout).")
    streaming: bool = Field(False, description="Read and tokenize the training records lazily, for sets too large to hold: "
                            "needs train.max_steps, and data.limit_eval unless an hf source has its own test split (val "
                            "and test are then its first records); one source, no mixture (see kdkit.data.text_stream).")
    shuffle_buffer: int = Field(10_000, ge=0, description="streaming: records shuffled in a seeded buffer of this size, "
                                "reshuffled each pass (0 or 1: the source's order).")


class DataConfig(Section):
    """Where the images come from and how they are split."""

    source: Literal["fashion_mnist", "digits", "image_folder", "hf", "jsonl", "text_files"] = Field(
        "fashion_mnist", description="fashion_mnist (IDX files), digits (scikit-learn, offline), image_folder "
        "(one sub-directory per class), hf (a Hugging Face dataset by hub ID or local directory), jsonl (images: a "
        "manifest of {\"image\": path, \"label\": class} lines; lm: one text record per line), text_files (lm: a "
        "directory of text files, see data.text.glob).")
    path: Optional[str] = Field(
        None, description="fashion_mnist: directory with the IDX files (default: /usr/share/datasets/fashion-mnist, "
        "then the user cache, downloading with checksums when `download`); image_folder: root with train/ "
        "(and optional val/, test/) or class directories directly; hf: dataset ID or local directory; jsonl: the .jsonl "
        "file (image paths are relative to its directory).")
    download: bool = Field(True, description="fashion_mnist: download from the public mirror (sha256-checked) when no local copy exists.")
    image_column: str = Field("image", description="hf: column holding the image; jsonl: field holding the image path.")
    label_column: str = Field("label", description="hf: column holding the integer class label; jsonl: field holding the class name or id.")
    train_split: str = Field("train", description="hf: split used for training (and validation, see val_fraction).")
    val_split: Optional[str] = Field(None, description="hf: the dataset's own validation split (null: carve val_fraction from train).")
    test_split: Optional[str] = Field("test", description="hf: split used for the final test (null: carve it from train).")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of the training split held out for validation (early stopping, best checkpoint).")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Fraction carved out for test when a source has no test split (digits, jsonl, image folders without test/).")
    image_size: Optional[tuple[int, int]] = Field(
        None, description="Size (H, W) images are stored at; null: the source's native size (28x28 Fashion-MNIST, 8x8 digits; required for image folders, hf and jsonl).")
    channels: Optional[Literal[1, 3]] = Field(None, description="Convert images to 1 (grey) or 3 (RGB) channels; null: the source's own (image folders, jsonl: 3).")
    limit_train: Optional[int] = Field(None, gt=0, description="Use only the first N training samples (after shuffling with the seed): quick runs and data-limited studies.")
    limit_eval: Optional[int] = Field(None, gt=0, description="Use only the first N validation and test samples.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (0: load in the main process; in-memory sources need none).")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Training-time augmentation.")
    text: TextConfig = Field(default_factory=TextConfig, description="task: lm: how records become tokens.")

    _size = field_validator("image_size")(classmethod(lambda cls, v: _positive_size(v)))


class CacheConfig(Section):
    """`kdkit cache`: the teacher's outputs stored once (see kdkit.teacher_cache)."""

    top_k: int = Field(64, ge=1, description="lm: log-probabilities kept per position (the k most probable tokens, plus the rest's mass).")
    tail_samples: int = Field(16, ge=0, description="lm: token ids drawn per position from the teacher's distribution outside the top-k; they make forward KL unbiased (2 bytes each). 0: the k + 1 buckets alone.")
    views: int = Field(4, ge=1, description="classification: augmented views scored per training image (training cycles through them by epoch).")
    shard_samples: int = Field(1024, ge=1, description="Training samples per shard file.")



class LossTerm(Section):
    """One weighted term of the training loss. Its name (default: its kind) is logged as a loss part."""

    kind: Literal["ce", "kd", "dkd", "features", "attention"] = Field(
        ..., description="ce: cross-entropy on labels; kd: temperature^2 * divergence between teacher and student (Hinton "
        "KD with forward_kl); dkd: decoupled KD (Zhao et al. 2022); features: inner representations matched through "
        "learned projectors (lm: the last hidden states); attention: ViT attention probabilities (KL) or CNN attention maps (transfer).")
    weight: float = Field(1.0, ge=0.0, description="Multiplier of this term in the total loss.")
    name: Optional[str] = Field(None, description="Name logged for this part (default: the kind).")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="ce: label smoothing.")
    divergence: str = Field("forward_kl", description=f"kd: one of {', '.join(DIVERGENCE_KINDS)}.")
    temperature: Optional[float] = Field(None, gt=0.0, description="kd/dkd: softmax temperature (null: distill.temperature).")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="kd: the JSD / skew parameter of the divergence.")
    dkd_alpha: float = Field(1.0, ge=0.0, description="dkd: weight of target-class KD (TCKD).")
    dkd_beta: float = Field(8.0, ge=0.0, description="dkd: weight of non-target-class KD (NCKD).")
    teacher: Optional[str] = Field(None, description="With an ensemble teacher: the member (its name) this term learns "
                                   "from (null: kd/dkd the combined soft targets; features/attention the first member).")
    layers: Union[Literal["auto"], list[tuple[str, str]]] = Field(
        "auto", description="features/attention: [[student module path, teacher module path], ...] (paths in the "
        "model's `net`, as named_modules() names them; a leading `net.` is accepted), or auto: `num_pairs` evenly spaced "
        "blocks of each model (ViT encoder layers, CNN stages or residual blocks). The plan is printed before training.")
    num_pairs: int = Field(3, gt=0, description="features/attention with layers: auto: how many pairs (capped by the shallower model).")
    distance: Literal["mse", "cosine", "smooth_l1"] = Field("mse", description="features: distance between projected student and teacher features.")
    tokens: Literal["all", "cls"] = Field("all", description="features, token features (ViT): match every token or the CLS token only.")
    mode: Literal["auto", "kl", "transfer"] = Field(
        "auto", description="attention: kl (KL(teacher || student) of ViT attention probabilities; those layers switch "
        "to eager attention), transfer (Zagoruyko & Komodakis attention maps of CNN features or ViT patch grids), "
        "auto: kl where both layers are transformer blocks, else transfer.")
    per_head: bool = Field(False, description="attention kl: match head by head (head counts must agree) instead of the head average.")

    @field_validator("divergence")
    @classmethod
    def _known_divergence(cls, v: str) -> str:
        if v not in DIVERGENCE_KINDS:
            raise ValueError(f"unknown divergence {v!r}; choose one of {', '.join(DIVERGENCE_KINDS)}")
        return v

    @property
    def label(self) -> str:
        return self.name or self.kind


def _default_terms() -> list[LossTerm]:
    return [LossTerm(kind="ce", weight=0.1), LossTerm(kind="kd", weight=0.9)]


class DistillConfig(Section):
    """What the student learns from. Without a teacher only the `ce` terms apply (plain supervised training)."""

    temperature: float = Field(4.0, gt=0.0, description="Default softmax temperature of kd/dkd terms.")
    projector_lr: Optional[float] = Field(None, gt=0.0, description="Learning rate of the feature projectors (null: train.lr).")
    terms: list[LossTerm] = Field(default_factory=_default_terms, description="Weighted loss terms; default 0.1 ce + 0.9 kd at T=4.")

    @model_validator(mode="after")
    def _unique_names(self) -> "DistillConfig":
        labels = [t.label for t in self.terms]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"loss term names must be unique; give `name` to tell apart: {dupes}")
        if not self.terms:
            raise ValueError("at least one loss term is needed")
        return self


class TrainConfig(Section):
    """The optimisation loop (runs on Accelerate)."""

    epochs: float = Field(3, gt=0, description="Passes over the training data (fractions allowed); ignored when max_steps is set.")
    max_steps: Optional[int] = Field(None, gt=0, description="Optimizer steps to take; overrides epochs.")
    batch_size: Union[PositiveInt, Literal["auto"]] = Field(
        128, description="Micro-batch per process, or auto: the largest micro-batch whose teacher forward and student "
        "backward fit in accelerator memory, with accumulation keeping global_batch_size (found once, kept in "
        "<output_dir>/auto_batch.json for resumes).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step (global batch = batch_size x grad_accum x processes).")
    global_batch_size: Optional[PositiveInt] = Field(
        None, description="With batch_size: auto, the samples per optimizer step over all processes (required then; "
        "ignored otherwise).")
    lr: float = Field(1e-3, gt=0.0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    scheduler: str = Field("cosine", description="Any name transformers.get_scheduler knows: cosine, linear, constant_with_warmup, ...")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="Fraction of the steps spent warming up (used when warmup_steps is null).")
    warmup_steps: Optional[int] = Field(None, ge=0, description="Warm-up steps (overrides warmup_ratio).")
    max_grad_norm: Optional[float] = Field(1.0, gt=0.0, description="Clip the gradient norm to this (null: no clipping).")
    max_consecutive_skips: int = Field(10, ge=1, description="A step whose loss or gradient is not finite is skipped (nothing advances); "
                                       "after this many in a row the run stops with an error.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Mixed precision through Accelerate.")
    eval_every: Union[Literal["epoch"], PositiveInt] = Field("epoch", description="Evaluate on the validation split every N optimizer steps, or each epoch.")
    early_stopping_patience: Optional[int] = Field(None, ge=1, description="Stop after this many evaluations without improvement (null: never).")
    save_every: Union[Literal["epoch"], PositiveInt, None] = Field("epoch", description="Checkpoint every N optimizer steps or each epoch (null: only at the end).")
    keep_last: int = Field(2, ge=1, description="Step checkpoints kept (the best one is kept apart).")
    log_every: int = Field(10, ge=1, description="Write a history line every N optimizer steps.")
    tracker: Literal["tensorboard", "none"] = Field("tensorboard", description="Where scalars go besides history.jsonl.")
    export: Literal["last", "best"] = Field("best", description="Which weights become student/: the best on validation, or the last.")
    progress: bool = Field(True, description="Show rich progress bars.")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v):
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v):
        from transformers import SchedulerType

        known = [s.value for s in SchedulerType]
        if v not in known:
            raise ValueError(f"unknown scheduler {v!r}; transformers.get_scheduler knows: {', '.join(known)}")
        return v

    @model_validator(mode="after")
    def _auto_batch(self) -> "TrainConfig":
        if self.batch_size == "auto" and self.global_batch_size is None:
            raise ValueError("batch_size: auto needs global_batch_size (the samples per optimizer step to keep)")
        return self


class EvalConfig(Section):
    """Final evaluation and efficiency measurement."""

    batch_size: int = Field(256, gt=0, description="Batch size for evaluation and the throughput measurement.")
    latency_repeats: int = Field(30, ge=1, description="Single-sample forward passes timed; latency_ms is their median.")
    warmup: int = Field(3, ge=0, description="Untimed passes before each timing.")
    efficiency: bool = Field(True, description="Measure latency, throughput and memory (off: quality only).")
    max_new_tokens: int = Field(64, gt=0, description="lm: tokens generated per prompt (greedy) for ROUGE-L, exact match and F1.")
    generate_samples: int = Field(32, ge=0, description="lm: test prompts answered by generation (0: perplexity and KL only).")


class VLMConfig(Section):
    """task: vlm: how image-question-answer records become model inputs, and vision-language model options."""

    image_field: str = Field("image", description="jsonl / hf: field holding the image (a path relative to the jsonl file, or an hf Image).")
    question_field: str = Field("question", description="jsonl / hf: field holding the question.")
    answer_field: str = Field("answer", description="jsonl / hf: field holding the reference answer (the loss falls on its tokens).")
    messages_field: str = Field("messages", description="jsonl / hf: field holding chat messages with image parts "
                                "({type: image, image: path} / {type: text, text: ...}); used when a record has it.")
    system_prompt: Optional[str] = Field(None, description="A system message put before every conversation (null: none).")
    min_pixels: Optional[int] = Field(None, gt=0, description="Smallest image area (pixels) the processors resize to (null: each processor's own).")
    max_pixels: Optional[int] = Field(None, gt=0, description="Largest image area (pixels) the processors resize to (null: each processor's own); bounds image tokens.")
    max_length: int = Field(1024, gt=1, description="Tokens per sample (image tokens included); longer samples lose the end of their answer.")
    freeze_vision: bool = Field(False, description="Freeze the student's vision tower (only the language model and the projector train).")
    vision_feature_weight: float = Field(0.0, ge=0.0, description="Weight of an extra loss part `vision`: MSE between the "
                                         "teacher's vision-tower features and the student's through a learned linear projector (0: off).")

    @model_validator(mode="after")
    def _pixels(self) -> "VLMConfig":
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError("min_pixels must not exceed max_pixels")
        return self


class Config(Section):
    """A kdkit run: `kdkit train CONFIG.yaml key.path=value ...`."""

    task: Literal["classification", "lm", "vlm"] = Field("classification", description="The kind of model distilled: "
                                                  "classification (image classifiers), lm (causal language models) or vlm (vision-language models).")
    output_dir: str = Field("runs/kdkit", description="The run directory (created; an existing finished run is refused unless --overwrite).")
    seed: int = Field(0, description="Seeds weights, data order, augmentation and dropout.")
    compare_baseline: bool = Field(False, description="Also train the same student without the teacher (same data, budget and seed) into <output_dir>/baseline, and report the gain.")
    data: DataConfig = Field(default_factory=DataConfig)
    student: ModelConfig
    teacher: Optional[ModelConfig] = Field(None, description="The frozen teacher (null: plain supervised training, how teachers and baselines are made).")
    distill: DistillConfig = Field(default_factory=DistillConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig, description="`kdkit cache`: what is stored of the teacher's outputs.")
    vlm: VLMConfig = Field(default_factory=VLMConfig, description="task: vlm: images, prompts and vision-language options.")

    @model_validator(mode="after")
    def _task_fits(self) -> "Config":
        if self.task in ("lm", "vlm") and any(t.kind == "dkd" for t in self.distill.terms):
            raise ValueError("dkd terms are for classification; use kd with a divergence for task: lm")
        if self.task == "classification":
            for role in ("student", "teacher"):
                spec = getattr(self, role)
                if spec is not None and (spec.lora is not None or spec.quantization is not None):
                    raise ValueError(f"{role}: lora and quantization are for task: lm")
                if spec is not None and spec.fidelity_batches != ModelConfig.model_fields["fidelity_batches"].default:
                    raise ValueError(f"{role}: fidelity_batches is for task: lm teachers")
        if self.student.cache is not None:
            raise ValueError("student.cache: a cache holds a teacher's outputs; set teacher.cache")
        if self.task == "vlm" and self.teacher is not None and self.teacher.cache is not None and self.vlm.vision_feature_weight > 0:
            raise ValueError("vlm.vision_feature_weight: needs the teacher's vision features, which teacher.cache does not hold")
        return self

    @model_validator(mode="after")
    def _teacher_terms(self) -> "Config":
        if self.teacher is None and self.compare_baseline:
            raise ValueError("compare_baseline needs a teacher (a run without one already is the baseline)")
        inner = [t.label for t in self.distill.terms if t.kind in ("features", "attention")]
        attention = [t.label for t in self.distill.terms if t.kind == "attention"]
        if attention and self.task != "classification":
            raise ValueError(f"distill.terms {attention}: attention terms are for task: classification")
        if inner and self.task == "vlm":
            raise ValueError(f"distill.terms {inner}: features terms are for task: classification and lm "
                             "(vlm: vlm.vision_feature_weight)")
        if inner and self.teacher is not None and self.teacher.cache is not None:
            raise ValueError(f"distill.terms {inner}: need the teacher's inner features, which a cache does not hold")
        members = [m.name for m in (self.teacher.ensemble or [])] if self.teacher is not None else []
        for t in self.distill.terms:
            if t.teacher is not None and t.teacher not in members:
                raise ValueError(f"distill.terms.{t.label}.teacher: {t.teacher!r} is not a member of teacher.ensemble "
                                 f"({', '.join(members) or 'no ensemble'})")
        if members:
            if self.task != "classification":
                raise ValueError("teacher.ensemble: several teachers are for task: classification")
            for m in self.teacher.ensemble:
                if m.ensemble is not None or m.derive_from is not None or m.cache is not None:
                    raise ValueError(f"teacher.ensemble.{m.name}: a member is one model (no ensemble, derive_from or cache)")
            if self.teacher.cache is not None:
                raise ValueError("teacher.cache: not with an ensemble (cache each member's run instead)")
        if self.teacher is not None and self.teacher.derive_from is not None:
            raise ValueError("teacher.derive_from: only a student is derived (from the teacher)")
        if self.student.derive_from is not None and (self.teacher is None or self.teacher.ensemble is not None):
            raise ValueError("student.derive_from: teacher needs a single teacher (pretrained, hf_config or run)")
        if self.student.derive_from is not None:
            if self.task == "vlm":
                raise ValueError("student.derive_from: students are derived for task: classification and lm")
            if self.teacher.factory is not None:
                raise ValueError("student.derive_from: the teacher is a custom module (teacher.factory); a student is "
                                 "derived from a Hugging Face ViT, BERT-like or Llama-like decoder teacher")
            if not any(getattr(self.teacher, k) is not None for k in ("pretrained", "hf_config", "run")):
                raise ValueError("student.derive_from: teacher.cache holds the teacher's outputs, not its model; also "
                                 "give the source the cache was made from (teacher.pretrained, hf_config or run)")
        return self
