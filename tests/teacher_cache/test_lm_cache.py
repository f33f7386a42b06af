"""`kdkit cache` for language models: the stored top-k rows are the teacher's, training from them works without the
teacher, resumes exactly, and a cache that does not fit the run (or is damaged) is refused by name."""

import json
import shutil

import pytest
import torch

from kdkit.cli.main import main
from kdkit.config import validate

from conftest import write_yaml
from lm.test_lm_end_to_end import _quick, _weights, lm_config, lm_setup  # noqa: F401  (the module fixture)


@pytest.fixture(scope="module")
def cached(lm_setup, tmp_path_factory):  # noqa: F811
    """A cache of the tiny teacher, 3 shards, top-16 at T=2 (the config's kd temperature)."""
    tmp = tmp_path_factory.mktemp("cache")
    cfg = lm_config(lm_setup, tmp / "run")
    cfg["cache"] = {"top_k": 16, "shard_samples": 40}
    config = write_yaml(tmp / "c.yaml", cfg)
    assert main(["cache", str(config), "--output", str(tmp / "cache")]) == 0
    return tmp, cfg


def test_the_cache_holds_the_teachers_top_k_for_every_labelled_position(lm_setup, cached):  # noqa: F811
    from kdkit.teacher_cache import CacheReader
    from kdkit.distill.lm import next_token_targets
    from kdkit.losses.sparse import topk_log_probs
    from kdkit.tasks import get_task

    tmp, cfg = cached
    reader = CacheReader(tmp / "cache")
    m = reader.manifest
    assert m["complete"] and len(m["shards"]) == 3 and m["num_samples"] == 97
    assert m["key"]["settings"] == {"top_k": 16, "tail_samples": 16, "temperature": 2.0, "vocab_rows": 300,
                                    "max_length": 48}
    # int16 ids + float16 log-probs + float32 rest + 16 int16 tail ids + float32 tail negentropy = 104 bytes per token,
    # plus offsets and headers (small shards here)
    assert 104 < m["bytes_per_unit"] < 116
    assert m["teacher_metrics"]["perplexity"] > 1

    c = validate(cfg)
    task = get_task("lm")
    data = task.build_data(c)
    teacher = task.load_teacher(c, data, torch.device("cpu"))
    index = torch.tensor([0, 41, 96])  # three shards
    batch = data.train.get_batch(index)
    target = next_token_targets(batch["labels"])
    hidden, head = teacher(batch["input_ids"], batch["attention_mask"])
    logits = hidden[target != -100] @ head.T
    ids, logp, rest = topk_log_probs(logits, 16, 2.0)
    from kdkit.teacher_cache.lm import CachedLMTeacher

    c_ids, c_logp, c_rest, c_tail, c_negent = CachedLMTeacher(reader, m["key"]["settings"]).rows(
        index, (target != -100).sum(1))
    assert torch.equal(c_ids, ids)
    torch.testing.assert_close(c_logp, logp.to(torch.float16).float())
    torch.testing.assert_close(c_rest, rest.float())
    # the tail draws: 16 per position, never a top-k token, and the tail's negative entropy
    assert c_tail.shape == (len(ids), 16) and not (c_tail[:, :, None] == ids[:, None, :]).any()
    assert (c_tail >= 0).all() and (c_tail < 300).all()
    log_tail = torch.log_softmax(logits / 2.0, -1).scatter(-1, ids, float("-inf")) - rest[:, None]
    torch.testing.assert_close(c_negent, (log_tail.exp() * log_tail.nan_to_num(neginf=0.0)).sum(-1).float())


def test_training_from_the_cache_never_loads_the_teacher(cached, tmp_path, capsys, monkeypatch):
    tmp, cfg = cached
    run = dict(cfg, output_dir=str(tmp_path / "run"), teacher={"cache": str(tmp / "cache")})
    import kdkit.models.causal as causal

    monkeypatch.setattr(causal, "FrozenCausalTeacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", run)), "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "the teacher itself is not loaded" in out
    history = [json.loads(x) for x in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in history if r["kind"] == "train"]
    # an unbiased estimate (the sampled tail): near zero for these tiny models it may dip below zero in a batch
    assert all(abs(x) > 0 and abs(x) < 1 for x in kd)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["teacher"]["perplexity"] > 1 and metrics["student"]["perplexity"] > 1


def test_a_cache_resume_is_exact(cached, tmp_path):
    from kdkit.experiment import train_run
    from kdkit.train import checkpoint as ckpt

    tmp, cfg = cached
    one = _quick(dict(cfg, teacher={"cache": str(tmp / "cache")},
                      train=dict(cfg["train"], max_steps=4, save_every=2, keep_last=5)))
    one["output_dir"] = str(tmp_path / "one")
    train_run(validate(one))
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "one", cut)
    shutil.rmtree(cut / "student")
    for d in ckpt.step_checkpoints(cut / "checkpoints"):
        if int(d.name.split("-")[1]) > 2:
            shutil.rmtree(d)
    one["output_dir"] = str(cut)
    train_run(validate(one), resume=True)
    a, c = _weights(tmp_path / "one"), _weights(cut)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_a_cache_for_other_data_or_settings_is_refused_by_name(cached, tmp_path, capsys):
    tmp, cfg = cached
    for change, words in ((lambda c: c["data"]["text"].update(max_length=40), "other data"),
                          (lambda c: c["distill"].update(temperature=1.0), "temperature = 2.0")):
        run = json.loads(json.dumps(dict(cfg, output_dir=str(tmp_path / "r"), teacher={"cache": str(tmp / "cache")})))
        change(run)
        assert main(["train", str(write_yaml(tmp_path / "c.yaml", run))]) == 2
        err = capsys.readouterr().err
        assert "teacher.cache" in err and words in err and "Traceback" not in err
    run = dict(cfg, output_dir=str(tmp_path / "r"), teacher={"cache": str(tmp / "cache"), "pretrained": str(tmp)})
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", run))]) == 2
    assert "another teacher" in capsys.readouterr().err



def test_a_student_head_smaller_than_the_cached_vocabulary_is_refused(cached, tmp_path, capsys):
    from kdkit.errors import UserError
    from kdkit.teacher_cache import CacheReader
    from kdkit.teacher_cache.lm import CachedLMTeacher

    tmp, _ = cached
    reader = CacheReader(tmp / "cache")
    teacher = CachedLMTeacher(reader, reader.key["settings"])
    teacher.check_student(300)  # the rows it was made for, or more, are fine
    teacher.check_student(320)
    with pytest.raises(UserError, match="over 300 vocabulary rows but the student's head has 256"):
        teacher.check_student(256)


def test_a_corrupt_shard_is_named(cached, tmp_path, capsys):
    tmp, cfg = cached
    broken = tmp_path / "broken"
    shutil.copytree(tmp / "cache", broken)
    shard = broken / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    run = dict(cfg, output_dir=str(tmp_path / "r"), teacher={"cache": str(broken)}, compare_baseline=False)
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", run))]) == 2
    err = capsys.readouterr().err
    assert "shard-00001.safetensors" in err and "corrupt or truncated" in err


def test_an_interrupted_cache_keeps_its_finished_shards(cached, tmp_path, capsys):
    tmp, cfg = cached
    part = tmp_path / "part"
    shutil.copytree(tmp / "cache", part)
    (part / "shard-00002.safetensors").unlink()  # killed while writing the last shard
    (part / "shard-00002.json").unlink()
    manifest = json.loads((part / "manifest.json").read_text())
    (part / "manifest.json").write_text(json.dumps(dict(manifest, complete=False, shards=[])))
    config = write_yaml(tmp_path / "c.yaml", dict(cfg, cache={"top_k": 16, "shard_samples": 40}))
    assert main(["cache", str(config), "--output", str(part)]) == 0
    assert "2 finished shard(s) kept" in capsys.readouterr().out
    redone = json.loads((part / "manifest.json").read_text())
    assert [s["sha256"] for s in redone["shards"]] == [s["sha256"] for s in manifest["shards"]]
    other = write_yaml(tmp_path / "o.yaml", dict(cfg, cache={"top_k": 8, "shard_samples": 40}))
    assert main(["cache", str(other), "--output", str(part)]) == 2
    assert "top_k = 16" in capsys.readouterr().err


def test_two_processes_write_the_same_cache(cached, tmp_path):
    """Shards are dealt to processes round-robin; the cache is the one a single process writes."""
    import subprocess

    from procs import PY, _env

    tmp, cfg = cached
    config = write_yaml(tmp_path / "c.yaml", cfg)
    done = subprocess.run([*PY, "cache", str(config), "--output", str(tmp_path / "two"), "--num-processes", "2"],
                          env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((d / "manifest.json").read_text()) for d in (tmp / "cache", tmp_path / "two"))
    assert [s["sha256"] for s in two["shards"]] == [s["sha256"] for s in one["shards"]]


def test_the_teachers_spec_is_the_same_however_its_directory_is_written(cached, monkeypatch):
    """`kdkit train` saves absolute paths; the config `kdkit cache` read may have had relative ones."""
    from kdkit.config.schema import ModelConfig
    from kdkit.teacher_cache.build import teacher_spec_hash

    tmp, _ = cached
    monkeypatch.chdir(tmp)
    assert teacher_spec_hash(ModelConfig(run="cache")) == teacher_spec_hash(ModelConfig(run=str(tmp / "cache")))
    assert teacher_spec_hash(ModelConfig(run="cache", cache="x")) == teacher_spec_hash(ModelConfig(run="cache"))
    assert teacher_spec_hash(ModelConfig(run="cache", dtype="float16")) != teacher_spec_hash(ModelConfig(run="cache"))
    # a setting at its default is left out: a kdkit that adds settings still recognises older caches
    assert teacher_spec_hash(ModelConfig(run="cache", trust_remote_code=False)) == teacher_spec_hash(ModelConfig(run="cache"))
