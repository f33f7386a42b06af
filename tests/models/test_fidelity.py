"""Teacher fidelity: the KL from a float32 copy to a teacher loaded in reduced form, chunked and checked against full
logits, printed by `kdkit train` and kept in metrics.json; off with fidelity_batches: 0."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from kdkit.cli.main import main
from kdkit.config import validate
from kdkit.config.schema import ModelConfig
from kdkit.models.causal import FrozenCausalTeacher
from kdkit.models.fidelity import reduced_form, reference_spec, teacher_fidelity
from kdkit.tasks.lm import LMTask

from conftest import tiny_config, write_yaml
from lm.test_lm_end_to_end import lm_config, lm_setup  # noqa: F401  (the module fixture)
from tiny_lm import tiny_causal_lm


def _batches(n=3, batch=4, length=12, vocab=300):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0  # padding
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :4] = -100  # a prompt
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _full_logits_kl(teacher, reference, batches):
    """Mean and max per-token KL(reference || teacher) and top-1 agreement from the models' own full logits."""
    kls, agree = [], []
    for b in batches:
        with torch.no_grad():
            t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            r = reference(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        keep = torch.cat([b["labels"][:, 1:], torch.full((b["labels"].shape[0], 1), -100)], 1) != -100
        log_t, log_r = F.log_softmax(t[keep], -1), F.log_softmax(r[keep], -1)
        kls.append(F.kl_div(log_t, log_r, log_target=True, reduction="none").sum(-1))
        agree.append(t[keep].argmax(-1) == r[keep].argmax(-1))
    kl, agree = torch.cat(kls).double(), torch.cat(agree)
    return kl.mean().item(), kl.max().item(), agree.double().mean().item(), kl.numel()


def test_a_teacher_against_itself_is_exactly_faithful():
    teacher = FrozenCausalTeacher(tiny_causal_lm(hidden=32, initializer_range=0.5))
    out = teacher_fidelity(teacher, teacher, _batches(), "cpu", 5, chunk_size=7)
    assert out["kl"] == 0.0 and out["kl_max"] == 0.0 and out["top1"] == 1.0
    assert out["batches"] == 3 and out["tokens"] == 3 * (4 * 8 - 3)  # 8 next-token targets a row, 3 padded away


def test_bfloat16_against_float32_matches_the_full_logits():
    model = tiny_causal_lm(hidden=32, initializer_range=0.5).eval()  # sharp enough for bfloat16 to matter
    half = copy.deepcopy(model).to(torch.bfloat16)
    batches = _batches()
    out = teacher_fidelity(FrozenCausalTeacher(half), FrozenCausalTeacher(model), batches, "cpu", 2, chunk_size=5)
    kl, kl_max, top1, tokens = _full_logits_kl(half, model, batches[:2])
    assert out["batches"] == 2 and out["tokens"] == tokens
    assert 1e-4 < out["kl"] < 0.05 and out["kl_max"] > out["kl"] and 0.9 < out["top1"] < 1
    assert out["kl"] == pytest.approx(kl, rel=1e-5)
    assert out["kl_max"] == pytest.approx(kl_max, rel=1e-5)
    assert out["top1"] == pytest.approx(top1)


def test_reduced_form_and_reference_spec(tmp_path):
    spec = ModelConfig(pretrained=str(tmp_path), dtype="bfloat16", quantization="4bit", gradient_checkpointing=True)
    assert reduced_form(spec) == "4bit"
    ref = reference_spec(spec)
    assert (ref.quantization, ref.dtype, ref.gradient_checkpointing, ref.pretrained) == (None, "float32", False,
                                                                                          str(tmp_path))
    assert reduced_form(ref) is None and reduced_form(spec.model_copy(update={"quantization": None})) == "bfloat16"
    assert reduced_form(ModelConfig(pretrained="x")) is None  # auto: the checkpoint's own, not asked to reduce


def test_train_prints_the_fidelity_of_a_bfloat16_teacher_and_keeps_it_in_metrics(lm_setup, tmp_path,  # noqa: F811
                                                                                  capsys):
    cfg = lm_config(lm_setup, tmp_path / "run", max_steps=1, eval_every=1, save_every=None)
    cfg["compare_baseline"] = False
    cfg["eval"].update(generate_samples=0, efficiency=False)
    cfg["teacher"]["dtype"] = "bfloat16"
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", cfg)), "--no-report"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("teacher fidelity:")]
    print(*lines, sep="\n")
    assert len(lines) == 1  # once: train_run hands its teacher on to the evaluation
    assert lines[0].startswith("teacher fidelity: KL(float32 || bfloat16 teacher) = ")
    assert " nats/token (max " in lines[0] and "over 2 batches" in lines[0] and "top-1 agreement" in lines[0]
    teacher = json.loads((tmp_path / "run" / "metrics.json").read_text())["teacher"]
    assert teacher["fidelity_kl"] > 0 and teacher["fidelity_kl_max"] >= teacher["fidelity_kl"]
    assert 0 < teacher["fidelity_top1"] <= 1


def _load_teacher(lm_setup, tmp_path, **teacher):  # noqa: F811
    cfg = lm_config(lm_setup, tmp_path / "run")
    cfg["teacher"].update(teacher)
    cfg = validate(cfg)
    task = LMTask()
    task.load_teacher(cfg, task.build_data(cfg), torch.device("cpu"))
    return task


@pytest.mark.parametrize("teacher", [{"dtype": "bfloat16", "fidelity_batches": 0}, {"dtype": "auto"},
                                     {"dtype": "float32"}])
def test_no_check_when_off_or_in_full_form(lm_setup, tmp_path, capsys, teacher):  # noqa: F811
    task = _load_teacher(lm_setup, tmp_path, **teacher)
    assert task.fidelity == {} and "teacher fidelity" not in capsys.readouterr().out


def test_a_copy_that_fits_nowhere_is_skipped_in_one_line(lm_setup, tmp_path, capsys, monkeypatch):  # noqa: F811
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Mem", (), {"available": 1000})())
    task = _load_teacher(lm_setup, tmp_path, dtype="float16")
    lines = [line for line in capsys.readouterr().out.splitlines() if "teacher fidelity" in line]
    assert task.fidelity == {} and len(lines) == 1
    assert lines[0].startswith("teacher fidelity: skipped: a float32 copy of the teacher (") and "RAM" in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_quantization_on_cpu_exits_2_with_the_alternatives(lm_setup, tmp_path, capsys):  # noqa: F811
    cfg = lm_config(lm_setup, tmp_path / "run")
    cfg["teacher"]["quantization"] = "8bit"
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", cfg)), "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "teacher.quantization: 8bit" in err and "no CUDA" in err and "teacher.dtype: bfloat16" in err
    assert not (tmp_path / "run").exists()


def test_fidelity_batches_is_for_lm_teachers(tmp_path):
    validate(tiny_config(tmp_path / "run"))  # the default is accepted everywhere
    with pytest.raises(Exception, match="fidelity_batches is for task: lm"):
        validate(tiny_config(tmp_path / "run", teacher__fidelity_batches=4))
