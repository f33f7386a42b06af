"""Causal language models: instruction, chat or plain-text data; students by hub ID, directory, config or LoRA;
losses on hidden states (kdkit.losses.fused_*); perplexity, teacher KL and generated-answer quality."""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from kdkit.data import make_loader
from kdkit.distill.classification import baseline_terms
from kdkit.distill.lm import LMDistiller, lm_quality
from kdkit.errors import UserError
from kdkit.evaluate.efficiency import count_params, safetensors_size
from kdkit.evaluate.text import answer_quality


class LMTask:
    model_kind = "A causal language model"  # the exported student's model card says what it is
    quality_keys = ("perplexity", "rouge_l", "exact_match", "f1")

    def __init__(self) -> None:
        self.tokenizer = None  # the student's: it tokenizes the data
        self.teacher_tokenizer = None
        self._announced = False
        self.fidelity: dict[str, float] = {}  # the teacher's against its float32 copy (models.fidelity), for metrics

    # -- data and models -----------------------------------------------------------------------------------------
    def build_data(self, cfg):
        from kdkit.data.text import build_text_data
        from kdkit.models.lm import load_tokenizer

        self.tokenizer = load_tokenizer(cfg.student, "student", teacher=cfg.teacher)
        other = None
        if cfg.teacher is not None and cfg.teacher.cache is None:  # another tokenizer: the teacher reads its own
            from kdkit.models.vocab import align_vocabularies

            self.teacher_tokenizer = load_tokenizer(cfg.teacher, "teacher")
            n_s, n_t = len(self.tokenizer), len(self.teacher_tokenizer)
            if align_vocabularies(self.tokenizer, self.teacher_tokenizer, n_s, n_t).kind == "different":
                other = self.teacher_tokenizer
        data = build_text_data(cfg.data, self.tokenizer, cfg.seed, teacher_tokenizer=other)
        # a resume with another tokenizer is refused even where the token ids happen to agree
        data.fingerprint = hashlib.sha256(f"{data.fingerprint}:{data.tokenizer_fingerprint}".encode()).hexdigest()
        return data

    def describe_data(self, data) -> str:
        if getattr(data.train, "streaming", False):
            return (f"data: {data.train.describe()}, {len(data.val) if data.val is not None else 0} val / "
                    f"{len(data.test)} test samples ({data.format}), tokenizer of {len(self.tokenizer)} tokens")
        return (f"data: {len(data.train)} train / {len(data.val) if data.val is not None else 0} val / "
                f"{len(data.test)} test samples ({data.format}), tokenizer of {len(self.tokenizer)} tokens")

    def load_teacher(self, cfg, data, device):
        if cfg.teacher is None:
            return None
        if cfg.teacher.cache is not None:
            return self._cached_teacher(cfg, data)
        from kdkit.models.causal import FrozenCausalTeacher
        from kdkit.models.fidelity import check_teacher_fidelity
        from kdkit.models.lm import build_causal_lm, load_tokenizer

        self.teacher_tokenizer = load_tokenizer(cfg.teacher, "teacher")
        set_seed(cfg.seed)
        teacher = FrozenCausalTeacher(build_causal_lm(cfg.teacher, "teacher", device=device), device)
        self._alignment(self._student_rows(cfg), teacher)  # decided and printed before training
        self.fidelity = check_teacher_fidelity(cfg.teacher, teacher, data, batch_size=cfg.eval.batch_size,
                                               seed=cfg.seed)
        return teacher

    def _cached_teacher(self, cfg, data):
        """The teacher's stored outputs (kdkit.teacher_cache.lm), checked against this run's data, tokenizer (vlm: the
        processor) and settings."""
        from kdkit.teacher_cache import CacheReader
        from kdkit.teacher_cache.build import teacher_spec_hash
        from kdkit.teacher_cache.lm import CachedLMTeacher, kd_temperature, max_length

        if getattr(data.train, "streaming", False):
            raise UserError("teacher.cache: training from a cache needs the training split in memory (no streaming)")
        reader = CacheReader(cfg.teacher.cache)
        expected = {"data": data.fingerprint, "tokenizer": data.tokenizer_fingerprint,
                    "settings": {"temperature": kd_temperature(cfg), "max_length": max_length(cfg)},
                    "num_samples": len(data.train)}
        if any(getattr(cfg.teacher, k) is not None for k in ("pretrained", "hf_config", "factory", "run")):
            expected["teacher_spec"] = teacher_spec_hash(cfg.teacher)
        reader.check(cfg.task, expected)  # lm, or vlm (kdkit.tasks.vlm): the same rows, one format
        settings = reader.key["settings"]
        tail = settings.get("tail_samples") or 0
        print(f"teacher: cache {reader.dir} (top-{settings['top_k']} log-probabilities at T={settings['temperature']} "
              + (f"and {tail} tail samples " if tail else "")
              + f"over {settings['vocab_rows']} rows, {reader.manifest.get('bytes_per_unit')} bytes per token); the "
              "teacher itself is not loaded", flush=True)
        return CachedLMTeacher(reader, settings)

    def teacher_fingerprint(self, teacher) -> str | None:
        """Config, source and a sample of the weights (hashing every weight of a 7B teacher would take minutes)."""
        if teacher is None:
            return None
        if getattr(teacher, "cached", False):
            return teacher.reader.key["teacher"]
        hf = teacher.model
        h = hashlib.sha256(hf.config.to_json_string(use_diff=False).encode())
        h.update(str(getattr(hf, "name_or_path", "")).encode())
        tensors = list(hf.state_dict().items())
        for name, t in tensors[:2] + tensors[-2:]:
            h.update(name.encode())
            h.update(t.detach().flatten()[:4096].to("cpu", torch.float32).numpy().tobytes())
        return h.hexdigest()[:16]

    def _alignment(self, student_rows: int, teacher):
        """Vocabulary alignment (a models.vocab.VocabAlignment), printed once."""
        from kdkit.models.vocab import align_vocabularies

        alignment = align_vocabularies(self.tokenizer, self.teacher_tokenizer, student_rows, teacher.vocab_rows)
        if not self._announced:
            print(f"vocabulary: {alignment.message}", flush=True)
            self._announced = True
        return alignment

    def _student_rows(self, cfg) -> int:
        """The student head's rows, from its config alone (the alignment is decided before any training)."""
        spec = cfg.student
        if spec.derive_from is not None:
            from kdkit.models.lm import derived_vocab_rows

            return derived_vocab_rows(spec, cfg.teacher, len(self.tokenizer))
        if spec.hf_config is not None:  # make_distiller builds it with the tokenizer's length unless set
            return int(spec.hf_config.get("vocab_size", len(self.tokenizer)))
        from transformers import AutoConfig

        from kdkit.models.lm import export_dir

        source = spec.pretrained or str(export_dir(spec.run, "student.run"))
        return int(AutoConfig.from_pretrained(source, revision=spec.revision,
                                              trust_remote_code=spec.trust_remote_code).vocab_size)

    def make_distiller(self, cfg, data, teacher, *, baseline: bool) -> LMDistiller:
        from kdkit.models.causal import CausalLMStudent
        from kdkit.models.lm import build_causal_lm
        from kdkit.models.lora import apply_lora

        set_seed(cfg.seed)  # baseline and distilled students start from the same weights
        lm = build_causal_lm(cfg.student, "student", vocab_size=len(self.tokenizer), teacher=cfg.teacher,
                             loaded_teacher=teacher)
        if cfg.student.lora is not None:
            lm = apply_lora(lm, cfg.student.lora)
        student = CausalLMStudent(lm)
        use_teacher = None if baseline else teacher
        terms = baseline_terms(cfg.distill) if baseline else cfg.distill.terms
        if getattr(use_teacher, "cached", False):
            use_teacher.check_student(student.vocab_rows)
            return LMDistiller(student, use_teacher, terms, cfg.distill.temperature, vocab_rows=use_teacher.vocab_rows)
        alignment = self._alignment(student.vocab_rows, use_teacher) if use_teacher is not None else None
        cross = alignment is not None and alignment.kind == "different"
        if cross:
            terms = uld_terms(terms)
        from kdkit.distill.lm_features import build_lm_features

        features = build_lm_features(student, use_teacher, terms, cross, cfg.distill.projector_lr, cfg.train.lr)
        return LMDistiller(student, use_teacher, terms, cfg.distill.temperature, alignment=alignment,
                           features=features, projector_lr=cfg.distill.projector_lr)

    def export(self, cfg, student, data, out_dir: Path) -> Path:
        from kdkit.models.lora import save_causal_lm

        export = cfg.student.lora.export if cfg.student.lora is not None else "merged"
        return Path(save_causal_lm(student.lm, self.tokenizer, out_dir, lora_export=export))

    # -- evaluation ----------------------------------------------------------------------------------------------
    def evaluate(self, cfg, run_dir: Path, data, teacher, device, students: dict[str, Path]) -> dict[str, dict]:
        from kdkit.models.causal import CausalLMStudent
        from kdkit.models.lora import load_causal_lm_export

        loader = make_loader(data.test, batch_size=cfg.eval.batch_size, shuffle=False, seed=cfg.seed)
        parts: dict[str, dict] = {}
        for name, run in students.items():
            model = CausalLMStudent(load_causal_lm_export(run / "student")).to(device).eval()
            reference, rows = None, None
            if teacher is not None and not getattr(teacher, "cached", False):  # KL: one vocabulary, a loaded teacher
                alignment = self._alignment(model.vocab_rows, teacher)
                if alignment.kind != "different":
                    reference, rows = teacher, alignment.size
            fn = lambda ids, mask, m=model: (m(ids, mask), m.head_weight)  # noqa: E731
            parts[name] = lm_quality(fn, loader, device, reference=reference, vocab_rows=rows)
            parts[name].update(self._efficiency_and_answers(cfg, model.lm, data.test, device, self.tokenizer))
        if getattr(teacher, "cached", False):  # measured by `kdkit cache`, which had it loaded
            parts["teacher"] = dict(teacher.reader.manifest.get("teacher_metrics") or {})
        elif teacher is not None:  # on its own tokenization of the test samples where it has one
            own, tok = ((data.test, self.tokenizer) if data.test.teacher is None
                        else (data.test.teacher, self.teacher_tokenizer))
            t_loader = make_loader(own, batch_size=cfg.eval.batch_size, shuffle=False, seed=cfg.seed)
            parts["teacher"] = lm_quality(teacher, t_loader, device)
            parts["teacher"].update(self._efficiency_and_answers(cfg, teacher.model, own, device, tok))
            parts["teacher"].update(self.fidelity)
        return parts

    def finish(self, run_dir: Path, metrics: dict) -> None:
        """The exported students get a model card with the metrics table."""
        for name, sub in (("student", run_dir / "student"), ("baseline", run_dir / "baseline" / "student")):
            if sub.is_dir() and name in metrics:
                write_model_card(sub, metrics, self.model_kind)

    def _efficiency_and_answers(self, cfg, lm, test, device, tok) -> dict[str, Any]:
        """Parameters, size, generation latency / tokens per second / memory, and answer quality, on up to
        eval.generate_samples prompts of `test` (tokenized by `tok`) answered greedily."""
        out: dict[str, Any] = {"params": count_params(lm), "size_mb": round(safetensors_size(lm) / 1e6, 4)}
        n = min(cfg.eval.generate_samples, len(test))
        if n == 0 or not cfg.eval.efficiency and not _has_references(test, n):
            return out
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        predictions, references, times, new_tokens = [], [], [], 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        lm.eval()
        for i in range(n):
            prompt, ref = test.prompt(i)
            ids = prompt.to(device=device, dtype=torch.long)[None]
            start = time.perf_counter()
            with torch.inference_mode():
                gen = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.eval.max_new_tokens,
                                  do_sample=False, pad_token_id=pad, eos_token_id=tok.eos_token_id)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            answer = gen[0, ids.shape[1]:]
            new_tokens += int(answer.numel())
            if ref is not None:
                predictions.append(tok.decode(answer, skip_special_tokens=True).strip())
                references.append(ref.strip())
        out.update({"latency_ms": round(1000 * statistics.median(times), 4),
                    "throughput": round(new_tokens / max(sum(times), 1e-9), 2),
                    "avg_new_tokens": round(new_tokens / n, 2)})
        if device.type == "cuda":
            out["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 2)
        if references:
            out.update(answer_quality(predictions, references))
            out["answered"] = len(references)
        return out


def _has_references(test, n: int) -> bool:
    return any(test.prompt(i)[1] is not None for i in range(n))


def uld_terms(terms: list) -> list:
    """Different tokenizers: every KD term compares sorted distributions (Universal Logit Distillation), said once."""
    out = []
    for t in terms:
        if t.kind == "kd" and t.divergence != "uld":
            print(f"distill: term {t.label!r}: {t.divergence} needs one vocabulary; with different tokenizers it is "
                  "computed as ULD (Universal Logit Distillation, Boizard et al. 2024)", flush=True)
            t = t.model_copy(update={"divergence": "uld"})
        out.append(t)
    return out


def write_model_card(out_dir: Path, metrics: dict, kind: str = "A causal language model") -> None:
    """README.md beside the exported student: what it is and the metrics table."""
    rows = [("perplexity", "Perplexity"), ("kl_from_teacher", "KL from teacher"), ("rouge_l", "ROUGE-L"),
            ("exact_match", "Exact match"), ("f1", "F1"), ("params", "Parameters"), ("latency_ms", "Latency (ms)"),
            ("throughput", "Generated tokens/s")]
    cols = [c for c in ("teacher", "baseline", "student") if c in metrics]
    lines = ["# kdkit student", "", f"{kind} distilled with [kdkit](https://github.com/kdkit/kdkit).", "",
             "| metric | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for key, title in rows:
        if any(key in metrics[c] for c in cols):
            lines.append(f"| {title} | " + " | ".join(str(metrics[c].get(key, "—")) for c in cols) + " |")
    note = json.loads((Path(out_dir) / "kdkit.json").read_text()).get("tokenizer_note") \
        if (Path(out_dir) / "kdkit.json").is_file() else None
    if note:
        lines += ["", f"**Tokenizer.** {note}."]
    (Path(out_dir) / "README.md").write_text("\n".join(lines) + "\n\n```json\n" + json.dumps(metrics, indent=1) + "\n```\n")
