"""`kdkit cache` for vision-language models: the stored top-k rows are the teacher's on the answer tokens (images
read), training from them never loads the teacher, and what a cache cannot serve is refused by name."""

import json
import shutil

import pytest
import torch

from kdkit.cli.main import main
from kdkit.config import validate

from conftest import write_yaml
from vlm.test_vlm_end_to_end import vlm_config, vlm_setup  # noqa: F401  (the module fixture)


def _config(setup, out):
    cfg = vlm_config(setup, out)
    cfg["compare_baseline"] = False
    cfg["cache"] = {"top_k": 16, "shard_samples": 30}
    cfg["eval"].update(generate_samples=2, efficiency=False)
    return cfg


@pytest.fixture(scope="module")
def cached(vlm_setup, tmp_path_factory):  # noqa: F811
    """A cache of the tiny Qwen2-VL teacher (400 head rows, the student 320), 3 shards, top-16 at T=2."""
    tmp = tmp_path_factory.mktemp("vlm_cache")
    cfg = _config(vlm_setup, tmp / "run")
    assert main(["cache", str(write_yaml(tmp / "c.yaml", cfg)), "--output", str(tmp / "cache")]) == 0
    return tmp, cfg


def test_the_cache_holds_the_teachers_top_k_for_every_answer_position(cached):
    from kdkit.distill.lm import next_token_targets
    from kdkit.distill.vlm import vision_inputs
    from kdkit.losses.sparse import topk_log_probs
    from kdkit.tasks import get_task
    from kdkit.teacher_cache import CacheReader
    from kdkit.teacher_cache.lm import CachedLMTeacher

    tmp, cfg = cached
    reader = CacheReader(tmp / "cache")
    m = reader.manifest
    assert m["kind"] == "vlm" and m["complete"] and m["unit"] == "token"
    assert m["num_samples"] == 65 and len(m["shards"]) == 3
    # the student's 320 rows of the teacher's 400 (a padded head), the forward-KL tail, vlm.max_length
    assert m["key"]["settings"] == {"top_k": 16, "tail_samples": 16, "temperature": 2.0, "vocab_rows": 320,
                                    "max_length": 1024}
    assert set(m["key"]) == {"data", "tokenizer", "settings", "teacher_spec", "teacher"}
    assert all(isinstance(m["key"][k], str) and m["key"][k] for k in ("data", "tokenizer", "teacher_spec", "teacher"))
    assert m["teacher_metrics"]["perplexity"] > 1 and m["teacher_metrics"]["answered"] == 2

    c = validate(cfg)
    task = get_task("vlm")
    data = task.build_data(c)
    assert m["key"]["tokenizer"] == data.tokenizer_fingerprint and m["key"]["data"] == data.fingerprint
    teacher = task.load_teacher(c, data, torch.device("cpu"))
    index = torch.tensor([0, 31, 64])  # three shards
    batch = data.train.get_batch(index)
    assert "pixel_values" in batch
    target = next_token_targets(batch["labels"])
    hidden, head = teacher(batch["input_ids"], batch["attention_mask"], **vision_inputs(batch))
    logits = hidden[target != -100] @ head[:320].T
    ids, logp, rest = topk_log_probs(logits, 16, 2.0)
    c_ids, c_logp, c_rest, c_tail, c_negent = CachedLMTeacher(reader, m["key"]["settings"]).rows(
        index, (target != -100).sum(1))
    assert len(c_ids) == int((target != -100).sum()) > 3  # every answer token of the three samples, no other
    assert torch.equal(c_ids, ids)
    torch.testing.assert_close(c_logp, logp.to(torch.float16).float())
    torch.testing.assert_close(c_rest, rest.float())
    assert c_tail.shape == (len(ids), 16) and not (c_tail[:, :, None] == ids[:, None, :]).any()
    assert (c_tail >= 0).all() and (c_tail < 320).all()
    # without the images the teacher's answer rows differ: the cache was made with them
    blind, _ = teacher(batch["input_ids"], batch["attention_mask"])
    assert not torch.allclose(blind[target != -100], hidden[target != -100])


def test_training_from_the_cache_never_loads_the_teacher(cached, tmp_path, capsys, monkeypatch):
    import kdkit.models.vlm as models_vlm

    tmp, cfg = cached
    run = dict(cfg, output_dir=str(tmp_path / "run"), teacher={"cache": str(tmp / "cache")})
    original = models_vlm.load_processor

    def student_processor_only(spec, role, *a, **k):
        assert role == "student", "the teacher's processor was loaded"
        return original(spec, role, *a, **k)

    monkeypatch.setattr(models_vlm, "load_processor", student_processor_only)
    monkeypatch.setattr(models_vlm, "FrozenVLMTeacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    real_build = models_vlm.build_vlm
    monkeypatch.setattr(models_vlm, "build_vlm", lambda spec, role="student", **k: (
        pytest.fail("the teacher was built") if role == "teacher" else real_build(spec, role, **k)))
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", run)), "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "the teacher itself is not loaded" in out and "over 320 rows" in out
    history = [json.loads(x) for x in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in history if r["kind"] == "train"]
    assert len(kd) == 4 and all(0 < abs(x) < 5 for x in kd)  # the sampled tail's estimate may dip below zero
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    stored = json.loads((tmp / "cache" / "manifest.json").read_text())["teacher_metrics"]
    assert metrics["teacher"]["perplexity"] == stored["perplexity"] and metrics["student"]["perplexity"] > 1


def test_the_vlm_distiller_puts_the_cached_rows_in_its_fused_losses(cached):
    """One batch: the kd part from the cache is the fused loss of the student (reading the images) against the loaded
    teacher's own top-k on that batch; on k + 1 buckets it stays below the dense divergence (data processing)."""
    from kdkit.distill.lm import next_token_targets
    from kdkit.distill.vlm import VLMDistiller, vision_inputs
    from kdkit.losses.fused import fused_terms
    from kdkit.losses.sparse import topk_log_probs
    from kdkit.tasks import get_task
    from kdkit.teacher_cache import CacheReader
    from kdkit.teacher_cache.lm import CachedLMTeacher

    tmp, cfg = cached
    c = validate(dict(cfg, distill={"temperature": 2.0, "terms": [{"kind": "kd", "divergence": "reverse_kl"}]}))
    task = get_task("vlm")
    data = task.build_data(c)
    teacher = task.load_teacher(c, data, torch.device("cpu"))
    online = task.make_distiller(c, data, teacher, baseline=False)
    reader = CacheReader(tmp / "cache")
    from_cache = VLMDistiller(online.student, CachedLMTeacher(reader, reader.key["settings"]), c.distill.terms, 2.0,
                              vocab_rows=320)
    assert from_cache.cached and from_cache.uses_teacher()
    index = torch.tensor([3, 40, 41, 60])
    batch = dict(data.train.get_batch(index), index=index)
    target = next_token_targets(batch["labels"])
    with torch.no_grad():
        sparse = float(from_cache.step(batch)["kd"])
        dense = float(online.step(batch)["kd"])
        hidden = online.student(batch["input_ids"], batch["attention_mask"], **vision_inputs(batch))
        t_hidden, t_head = teacher(batch["input_ids"], batch["attention_mask"], **vision_inputs(batch))
        ids, logp, rest = topk_log_probs(t_hidden[target != -100] @ t_head[:320].T, 16, 2.0)
        topk = (ids, logp.to(torch.float16).float(), rest)  # the cache keeps float16 log-probabilities
        _, parts = fused_terms(hidden, online.student.head_weight, target, [online._term(c.distill.terms[0])],
                               vocab_rows=320, teacher_topk=topk)
    assert sparse == pytest.approx(float(parts["kd"]), rel=1e-4, abs=1e-7)
    assert 0 < sparse <= dense + 1e-5


def test_a_cache_for_other_data_settings_or_processor_is_refused_by_name(cached, tmp_path, capsys):
    tmp, cfg = cached
    for change, words in ((lambda c: c["data"].update(test_fraction=0.2), "other data"),
                          (lambda c: c["distill"].update(temperature=1.0), "temperature = 2.0"),
                          (lambda c: c.update(vlm={"max_pixels": 16 * 16}), "another processor")):
        run = json.loads(json.dumps(dict(cfg, output_dir=str(tmp_path / "r"), teacher={"cache": str(tmp / "cache")})))
        change(run)
        assert main(["train", str(write_yaml(tmp_path / "c.yaml", run))]) == 2
        err = capsys.readouterr().err
        assert "teacher.cache" in err and words in err and "Traceback" not in err
    # an lm cache is not a vlm cache
    lm_like = tmp_path / "lm_cache"
    shutil.copytree(tmp / "cache", lm_like)
    manifest = json.loads((lm_like / "manifest.json").read_text())
    (lm_like / "manifest.json").write_text(json.dumps(dict(manifest, kind="lm")))
    run = dict(cfg, output_dir=str(tmp_path / "r"), teacher={"cache": str(lm_like)})
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", run))]) == 2
    assert "holds a lm cache; this run is vlm" in capsys.readouterr().err


def test_vision_feature_matching_cannot_train_from_a_cache(cached, tmp_path, capsys):
    tmp, cfg = cached
    vision = {"vision_feature_weight": 1.0}
    run = dict(cfg, output_dir=str(tmp_path / "r"), teacher={"cache": str(tmp / "cache")}, vlm=vision)
    assert main(["train", str(write_yaml(tmp_path / "t.yaml", run))]) == 2
    err = capsys.readouterr().err
    assert "vlm.vision_feature_weight" in err and "teacher.cache" in err and "Traceback" not in err
    config = write_yaml(tmp_path / "c.yaml", dict(cfg, vlm=vision))
    assert main(["cache", str(config), "--output", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "vlm.vision_feature_weight" in err and "vision features" in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists()


def test_a_teacher_with_its_own_processor_is_refused(vlm_setup, cached, tmp_path, capsys):  # noqa: F811
    """Another image processing for the teacher: every sample has two encodings, a cache holds one."""
    tmp, cfg = cached
    teacher = tmp_path / "teacher"
    shutil.copytree(vlm_setup / "teacher", teacher)
    pre_file = teacher / "preprocessor_config.json"
    pre = json.loads(pre_file.read_text())
    pre["size"]["shortest_edge"] = 48 * 48
    pre_file.write_text(json.dumps(pre))
    own = dict(cfg, teacher={"pretrained": str(teacher)})
    assert main(["cache", str(write_yaml(tmp_path / "c.yaml", own)), "--output", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "teacher:" in err and "processor differs from the student's" in err and "Traceback" not in err
    run = dict(cfg, output_dir=str(tmp_path / "r"), teacher={"pretrained": str(teacher), "cache": str(tmp / "cache")})
    assert main(["train", str(write_yaml(tmp_path / "t.yaml", run))]) == 2
    err = capsys.readouterr().err
    assert "teacher.cache" in err and "processor differs from the student's" in err and "Traceback" not in err
