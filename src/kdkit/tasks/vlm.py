"""Vision-language models: image-question-answer data through each model's own processor; students by hub ID,
directory, config or LoRA; losses on the answer tokens' hidden states (kdkit.distill.vlm); exact match, F1 and
perplexity on answers; generation latency at batch 1, throughput, peak memory and average answer length."""

from __future__ import annotations

import hashlib
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from kdkit.data import make_loader
from kdkit.distill.classification import baseline_terms
from kdkit.distill.vlm import VLMDistiller, vision_inputs, vlm_quality
from kdkit.evaluate.efficiency import _RssPeak, count_params, safetensors_size
from kdkit.errors import UserError
from kdkit.evaluate.text import answer_quality
from kdkit.tasks.lm import LMTask, uld_terms


class VLMTask(LMTask):
    quality_keys = ("exact_match", "f1", "rouge_l", "perplexity")
    model_kind = "A vision-language model (image and question in, answer out)"

    def __init__(self) -> None:
        super().__init__()
        self.processor = None  # the student's
        self.teacher_processor = None
        self.teacher_view = False  # the teacher reads its own encoding of every sample (teacher_* batch tensors)

    # -- data and models -----------------------------------------------------------------------------------------
    def build_data(self, cfg):
        from kdkit.data.vlm import build_vlm_data
        from kdkit.models.vlm import load_processor

        self.processor = load_processor(cfg.student, "student", cfg.vlm)
        self.tokenizer = self.processor.tokenizer
        if cfg.teacher is not None and _has_source(cfg.teacher):  # a cache alone: its key names the processor
            self.teacher_processor = load_processor(cfg.teacher, "teacher", cfg.vlm)
            self.teacher_tokenizer = self.teacher_processor.tokenizer
            self.teacher_view = self.teacher_processor.identity() != self.processor.identity()
            if self.teacher_view and cfg.teacher.cache is not None:
                raise UserError("teacher.cache: the teacher's processor differs from the student's (tokenizer, chat "
                                "template or image processing); a cache holds rows for one encoding of the samples, "
                                "so this pair distils online only")
        data = build_vlm_data(cfg, self.processor, self.teacher_processor if self.teacher_view else None)
        data.fingerprint = hashlib.sha256(f"{data.fingerprint}:{self.processor.identity()}".encode()).hexdigest()
        # the processor's own fingerprint: a teacher cache's key names it (kdkit.teacher_cache.lm)
        data.tokenizer_fingerprint = hashlib.sha256(self.processor.identity().encode()).hexdigest()
        return data

    def describe_data(self, data) -> str:
        view = "; the teacher reads its own processor's encoding" if self.teacher_view else ""
        return (f"data: {len(data.train)} train / {len(data.val) if data.val is not None else 0} val / "
                f"{len(data.test)} test image-question-answer samples, tokenizer of {len(self.tokenizer)} tokens{view}")

    def load_teacher(self, cfg, data, device):
        if cfg.teacher is None:
            return None
        if cfg.teacher.cache is not None:
            return self._cached_teacher(cfg, data)  # LMTask's: the same rows on answer tokens, kind vlm
        from kdkit.models.vlm import FrozenVLMTeacher, build_vlm, load_processor

        if self.teacher_processor is None:
            self.teacher_processor = load_processor(cfg.teacher, "teacher", cfg.vlm)
            self.teacher_tokenizer = self.teacher_processor.tokenizer
        set_seed(cfg.seed)
        model = build_vlm(cfg.teacher, "teacher", processor=self.teacher_processor, device=device)
        teacher = FrozenVLMTeacher(model, device, capture_vision=cfg.vlm.vision_feature_weight > 0)
        self._alignment(self._student_rows(cfg), teacher)  # decided and printed before training
        return teacher

    def _student_rows(self, cfg) -> int:
        spec = cfg.student
        if spec.hf_config is not None and "base" not in spec.hf_config:
            return int((spec.hf_config.get("text_config") or {}).get("vocab_size", len(self.tokenizer)))
        from transformers import AutoConfig

        from kdkit.models.vlm import export_dir

        source = spec.pretrained or (spec.hf_config or {}).get("base") or str(export_dir(spec.run, "student.run"))
        config = AutoConfig.from_pretrained(source, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        return int(config.get_text_config().vocab_size)

    def make_distiller(self, cfg, data, teacher, *, baseline: bool) -> VLMDistiller:
        from kdkit.models.lora import apply_lora
        from kdkit.models.vlm import VLMStudent, build_vlm

        set_seed(cfg.seed)  # baseline and distilled students start from the same weights
        lm = build_vlm(cfg.student, "student", processor=self.processor)
        if cfg.student.lora is not None:
            lm = apply_lora(lm, cfg.student.lora)
        use_teacher = None if baseline else teacher
        if getattr(use_teacher, "cached", False):  # its stored rows (in the student's vocabulary) in the fused losses
            student = VLMStudent(lm, freeze_vision=cfg.vlm.freeze_vision)
            use_teacher.check_student(student.vocab_rows)
            return VLMDistiller(student, use_teacher, cfg.distill.terms, cfg.distill.temperature,
                                vocab_rows=use_teacher.vocab_rows)
        vision = cfg.vlm.vision_feature_weight if use_teacher is not None else 0.0
        student = VLMStudent(lm, freeze_vision=cfg.vlm.freeze_vision,
                             projector_to=use_teacher.hidden_size if vision else None)
        alignment = self._alignment(student.vocab_rows, use_teacher) if use_teacher is not None else None
        terms = baseline_terms(cfg.distill) if baseline else cfg.distill.terms
        if alignment is not None and alignment.kind == "different":
            terms = uld_terms(terms)
        return VLMDistiller(student, use_teacher, terms, cfg.distill.temperature, alignment=alignment,
                            teacher_view=self.teacher_view, vision_weight=vision)

    def export(self, cfg, student, data, out_dir: Path) -> Path:
        from kdkit.models.vlm import save_vlm

        export = cfg.student.lora.export if cfg.student.lora is not None else "merged"
        return Path(save_vlm(student.lm, self.processor, out_dir, lora_export=export))

    # -- evaluation ----------------------------------------------------------------------------------------------
    def evaluate(self, cfg, run_dir: Path, data, teacher, device, students: dict[str, Path]) -> dict[str, dict]:
        from kdkit.models.vlm import VLMStudent, load_vlm_export

        loader = make_loader(data.test, batch_size=cfg.eval.batch_size, shuffle=False, seed=cfg.seed)
        parts: dict[str, dict] = {}
        for name, run in students.items():
            model = VLMStudent(load_vlm_export(run / "student", dtype=torch.float32)).to(device).eval()
            fn = lambda b, m=model: (m(b["input_ids"], b["attention_mask"], **vision_inputs(b)), m.head_weight)  # noqa: E731
            parts[name] = vlm_quality(fn, loader, device)
            parts[name].update(self._generation(cfg, model.lm, data.test, device, self.processor, teacher=False))
        if getattr(teacher, "cached", False):  # measured by `kdkit cache`, which had it loaded
            parts["teacher"] = dict(teacher.reader.manifest.get("teacher_metrics") or {})
        elif teacher is not None:
            prefix = "teacher_" if self.teacher_view else ""
            fn = lambda b: teacher(b["input_ids"], b["attention_mask"], **vision_inputs(b))  # noqa: E731
            parts["teacher"] = vlm_quality(fn, loader, device, prefix=prefix)
            parts["teacher"].update(self._generation(cfg, teacher.model, data.test, device,
                                                     self.teacher_processor or self.processor, teacher=self.teacher_view))
        return parts

    def _generation(self, cfg, model, test, device, processor, *, teacher: bool) -> dict[str, Any]:
        """Parameters and size; greedy answers to up to eval.generate_samples test prompts one at a time (latency,
        answer quality, average new tokens), then batched at eval.batch_size (generated tokens/s, peak memory)."""
        out: dict[str, Any] = {"params": count_params(model), "size_mb": round(safetensors_size(model) / 1e6, 4)}
        n = min(cfg.eval.generate_samples, len(test))
        if n == 0:
            return out
        tok = processor.tokenizer
        gen_kw = {"max_new_tokens": cfg.eval.max_new_tokens, "do_sample": False, "pad_token_id": tok.pad_token_id,
                  "eos_token_id": tok.eos_token_id}
        model.eval()
        prompts = [test.prompt(i, teacher=teacher) for i in range(n)]
        predictions, times, new_tokens = [], [], 0
        for inputs, _ in prompts:
            inputs = {k: v.to(device) for k, v in inputs.items()}
            start = time.perf_counter()
            with torch.inference_mode():
                gen = model.generate(**inputs, **gen_kw)
            _sync(device)
            times.append(time.perf_counter() - start)
            answer = _until_eos(gen[0, inputs["input_ids"].shape[1]:].tolist(), tok.eos_token_id)
            new_tokens += len(answer)
            predictions.append(tok.decode(answer, skip_special_tokens=True).strip())
        out.update(answer_quality(predictions, [ref.strip() for _, ref in prompts]))
        out.update({"answered": n, "latency_ms": round(1000 * statistics.median(times), 4),
                    "avg_new_tokens": round(new_tokens / n, 2)})
        if cfg.eval.efficiency:
            out.update(_batched_throughput(model, [p for p, _ in prompts], cfg.eval.batch_size, device, gen_kw))
        return out


def _has_source(spec) -> bool:
    return any(getattr(spec, k) is not None for k in ("pretrained", "hf_config", "factory", "run"))


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _until_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids[:ids.index(eos) + 1] if eos is not None and eos in ids else ids


def left_pad(prompts: list[dict], pad: int) -> dict[str, torch.Tensor]:
    """Batch-1 prompts as one left-padded batch (generation continues every row at the same position)."""
    width = max(p["input_ids"].shape[1] for p in prompts)
    out = {k: torch.full((len(prompts), width), pad if k == "input_ids" else 0, dtype=torch.int64)
           for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for i, p in enumerate(prompts):
        n = p["input_ids"].shape[1]
        for k in out:
            out[k][i, width - n:] = p[k][0]
    for k in ("pixel_values", "image_grid_thw"):
        if any(k in p for p in prompts):
            out[k] = torch.cat([p[k] for p in prompts if k in p])
    return out


def _batched_throughput(model, prompts: list[dict], batch_size: int, device, gen_kw: dict) -> dict[str, float]:
    """Generated tokens per second over the prompts in batches of batch_size, and the peak memory meanwhile."""
    eos, pad = gen_kw["eos_token_id"], gen_kw["pad_token_id"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens, start = 0, time.perf_counter()
    with _RssPeak() as rss:
        for i in range(0, len(prompts), batch_size):
            batch = {k: v.to(device) for k, v in left_pad(prompts[i:i + batch_size], pad).items()}
            with torch.inference_mode():
                gen = model.generate(**batch, **gen_kw)
            _sync(device)
            tokens += sum(len(_until_eos(row, eos)) for row in gen[:, batch["input_ids"].shape[1]:].tolist())
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss.growth_bytes
    return {"throughput": round(tokens / max(elapsed, 1e-9), 2), "peak_mem_mb": round(peak / 2**20, 2)}
