"""`kdkit cache` for image classifiers: the stored logits are the teacher's on the stored views, the student is shown
exactly those views (cycling by epoch), training from the cache never loads the teacher and resumes exactly, and a
cache that does not fit the run (or is damaged) is refused by name."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from kdkit.cli.main import main
from kdkit.config import validate

from conftest import tiny_config, write_yaml

AUGMENT = {"random_crop_padding": 1, "hflip": True, "random_resized_crop": [0.6, 1.0]}


def _cfg(out, **extra):
    # digits: 1797 - 20% test - 10% val = 1294 training images -> 3 shards of up to 500; 40 batches of 32 an epoch
    return tiny_config(out, data__augment=AUGMENT, cache={"views": 3, "shard_samples": 500},
                       student__kwargs={"hidden": 8, "size": 8, "dropout": 0.3}, **extra)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    cfg = _cfg(tmp / "run")
    assert main(["cache", str(write_yaml(tmp / "c.yaml", cfg)), "--output", str(tmp / "cache")]) == 0
    return tmp, cfg


def _teacher_and_data(cfg):
    from kdkit.tasks import get_task

    c = validate(cfg)
    task = get_task("classification")
    data = task.build_data(c)
    return task.load_teacher(c, data, torch.device("cpu")), data, c


def test_the_cache_holds_the_teachers_logits_on_each_stored_view(cached):
    from kdkit.data.augment import augment_views
    from kdkit.data.loader import _BatchFetch
    from kdkit.teacher_cache import CacheReader
    from kdkit.teacher_cache.classification import view_seeds

    tmp, cfg = cached
    m = CacheReader(tmp / "cache").manifest
    assert m["complete"] and m["num_samples"] == 1294 and [s["end"] for s in m["shards"]] == [500, 1000, 1294]
    assert m["key"]["settings"] == {"views": 3, "augment": dict(AUGMENT, random_resized_crop=[0.6, 1.0]),
                                    "view_rule": 1}
    assert 3 * (2 * 10 + 8) <= m["bytes_per_unit"] < 3 * (2 * 10 + 8) + 4  # fp16 logits + int64 seeds per view
    assert m["teacher_metrics"]["accuracy"] >= 0 and m["teacher_metrics"]["params"] > 0

    teacher, data, c = _teacher_and_data(cfg)
    shard = load_file(str(tmp / "cache" / "shard-00000.safetensors"))
    assert shard["logits"].dtype == torch.float16 and shard["logits"].shape == (500, 3, 10)
    index = list(range(64))  # the first batch `kdkit cache` ran (eval.batch_size 64): bit for bit
    assert torch.equal(shard["seeds"][:64], view_seeds(c.seed, torch.tensor(index), 3))
    pixels = _BatchFetch(data.train)[index]["pixels"]
    views = [augment_views(pixels, shard["seeds"][:64, v], c.data.augment) for v in range(3)]
    assert not torch.equal(views[0], views[1])  # three different views
    for v in range(3):
        assert torch.equal(shard["logits"][:64, v], teacher(views[v]).to(torch.float16))
    last = load_file(str(tmp / "cache" / "shard-00002.safetensors"))  # and the last sample, alone
    one = augment_views(_BatchFetch(data.train)[[1293]]["pixels"], last["seeds"][-1:, 2], c.data.augment)
    torch.testing.assert_close(last["logits"][-1:, 2].float(), teacher(one).to(torch.float16).float())


def test_a_view_does_not_depend_on_its_batch():
    from kdkit.config.schema import AugmentConfig
    from kdkit.data.augment import augment_views

    x = torch.rand(40, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    seeds = torch.randint(-2 ** 62, 2 ** 62, (40,), generator=torch.Generator().manual_seed(1))
    cfg = AugmentConfig(**AUGMENT)
    whole = augment_views(x, seeds, cfg)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(2))
    assert torch.equal(augment_views(x[perm], seeds[perm], cfg), whole[perm])
    assert all(torch.equal(augment_views(x[i:i + 1], seeds[i:i + 1], cfg), whole[i:i + 1]) for i in range(40))
    assert whole.min() >= 0 and whole.max() <= 1 and not torch.equal(whole, x)
    assert torch.equal(augment_views(x, seeds, AugmentConfig()), x)


def test_the_student_sees_the_view_the_teacher_scored(cached, tmp_path, monkeypatch):
    """Through the real training loop, over two epochs: each step's pixels are the stored view `epoch % 3` of its
    samples, and the teacher's logits on those very pixels are the cached ones."""
    from kdkit.distill import classification as distill
    from kdkit.experiment import train_run
    from kdkit.teacher_cache import CacheReader

    tmp, cfg = cached
    seen = []
    step = distill.ClassificationDistiller.step

    def spy(self, batch, student=None):
        seen.append((self.epoch, batch["index"].clone(), batch["pixels"].clone(), batch["teacher_logits"].clone()))
        return step(self, batch, student)

    monkeypatch.setattr(distill.ClassificationDistiller, "step", spy)
    run = dict(cfg, output_dir=str(tmp_path / "run"), teacher={"cache": str(tmp / "cache")},
               train=dict(cfg["train"], max_steps=44, eval_every=100, save_every=100))
    train_run(validate(run))
    assert [e for e, *_ in seen] == [0] * 40 + [1] * 4
    teacher, data, c = _teacher_and_data(cfg)
    from kdkit.data.augment import augment_views
    from kdkit.data.loader import _BatchFetch

    reader = CacheReader(tmp / "cache")
    stored = {k: torch.cat([reader.shard(i)[k] for i in range(3)]) for k in ("seeds", "logits")}
    for epoch, index, pixels, logits in seen[::7] + seen[40:]:
        seeds = stored["seeds"][index, epoch]
        view = augment_views(_BatchFetch(data.train)[index.tolist()]["pixels"], seeds, c.data.augment)
        assert torch.equal(pixels, view)
        assert torch.equal(logits, stored["logits"][index, epoch].float())
        torch.testing.assert_close(teacher(pixels).to(torch.float16).float(), logits, rtol=2e-3, atol=2e-3)


def test_training_from_the_cache_never_loads_the_teacher(cached, tmp_path, capsys, monkeypatch):
    """`kdkit train CONFIG teacher.cache=DIR`: the config still names its teacher (the cache must be its), the
    teacher's metrics come from the cache, and the baseline trains as usual."""
    import kdkit.tasks.classification as task

    tmp, cfg = cached
    monkeypatch.setattr(task, "FrozenTeacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    run = dict(cfg, output_dir=str(tmp_path / "run"), compare_baseline=True)
    config = write_yaml(tmp_path / "c.yaml", run)
    assert main(["train", str(config), f"teacher.cache={tmp / 'cache'}", "--no-report"]) == 0
    assert "the teacher itself is not loaded" in capsys.readouterr().out
    history = [json.loads(x) for x in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert all(r["kd"] > 0 for r in history if r["kind"] == "train")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    manifest = json.loads((tmp / "cache" / "manifest.json").read_text())
    assert metrics["teacher"]["accuracy"] == manifest["teacher_metrics"]["accuracy"]
    assert metrics["student"]["accuracy"] > 0 and "baseline" in metrics and metrics["compression"] > 1
    # agreement with the teacher comes from its test predictions, stored at cache time: the same as measured online
    from kdkit.data import make_loader
    from kdkit.evaluate import classification_quality
    from kdkit.models import load_exported

    monkeypatch.undo()
    teacher, data, c = _teacher_and_data(cfg)
    assert len(manifest["teacher_test_predictions"]) == len(data.test)
    loader = make_loader(data.test, batch_size=64, shuffle=False, seed=0)
    online = classification_quality(load_exported(tmp_path / "run", "student"), loader, None, reference=teacher)
    assert metrics["student"]["agreement"] == online["agreement"] and 0 < online["agreement"] <= 100


def test_a_cache_resume_mid_epoch_is_exact(cached, tmp_path):
    """Stopped at step 45 (the 5th of epoch 1: view 1), resumed from there."""
    from kdkit.experiment import train_run
    from kdkit.train import checkpoint as ckpt

    tmp, cfg = cached
    one = dict(cfg, output_dir=str(tmp_path / "one"), teacher={"cache": str(tmp / "cache")},
               train=dict(cfg["train"], max_steps=50, save_every=15, eval_every=25, keep_last=5))
    train_run(validate(one))
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "one", cut)
    shutil.rmtree(cut / "student")
    for d in ckpt.step_checkpoints(cut / "checkpoints"):
        if int(d.name.split("-")[1]) > 45:
            shutil.rmtree(d)
    train_run(validate(dict(one, output_dir=str(cut))), resume=True)
    a = load_file(str(tmp_path / "one" / "student" / "model.safetensors"))
    b = load_file(str(cut / "student" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_cache_for_other_data_settings_or_teacher_is_refused_by_name(cached, tmp_path, capsys):
    tmp, cfg = cached
    changes = ((lambda c: c["data"].update(limit_train=1000), "other data"),
               (lambda c: c["data"]["augment"].update(hflip=False), "augment = "),
               (lambda c: c["teacher"]["kwargs"].update(hidden=16), "another teacher"))
    for change, words in changes:
        run = json.loads(json.dumps(dict(cfg, output_dir=str(tmp_path / "r"))))
        run["teacher"]["cache"] = str(tmp / "cache")
        change(run)
        assert main(["train", str(write_yaml(tmp_path / "c.yaml", run))]) == 2
        err = capsys.readouterr().err
        assert "teacher.cache" in err and words in err and "Traceback" not in err, err
    # the number of views is the cache's to choose: a run asking for other views trains from it
    run = dict(cfg, output_dir=str(tmp_path / "ok"), teacher={"cache": str(tmp / "cache")},
               cache={"views": 5}, train=dict(cfg["train"], max_steps=1))
    assert main(["train", str(write_yaml(tmp_path / "ok.yaml", run)), "--no-report"]) == 0


def test_a_corrupt_shard_is_named(cached, tmp_path, capsys):
    tmp, cfg = cached
    broken = tmp_path / "broken"
    shutil.copytree(tmp / "cache", broken)
    shard = broken / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    run = dict(cfg, output_dir=str(tmp_path / "r"), teacher={"cache": str(broken)})
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", run))]) == 2
    err = capsys.readouterr().err
    assert "shard-00001.safetensors" in err and "corrupt or truncated" in err and "Traceback" not in err


def test_an_interrupted_cache_keeps_its_finished_shards(cached, tmp_path, capsys):
    tmp, cfg = cached
    part = tmp_path / "part"
    shutil.copytree(tmp / "cache", part)
    (part / "shard-00002.safetensors").unlink()  # killed while writing the last shard
    (part / "shard-00002.json").unlink()
    manifest = json.loads((part / "manifest.json").read_text())
    (part / "manifest.json").write_text(json.dumps(dict(manifest, complete=False, shards=[])))
    config = write_yaml(tmp_path / "c.yaml", cfg)
    assert main(["cache", str(config), "--output", str(part)]) == 0
    assert "2 finished shard(s) kept" in capsys.readouterr().out
    redone = json.loads((part / "manifest.json").read_text())
    assert [s["sha256"] for s in redone["shards"]] == [s["sha256"] for s in manifest["shards"]]
    other = write_yaml(tmp_path / "o.yaml", dict(cfg, cache={"views": 2, "shard_samples": 500}))
    assert main(["cache", str(other), "--output", str(part)]) == 2
    assert "views = 3" in capsys.readouterr().err


def test_two_processes_train_from_the_cache_like_one(cached, tmp_path):
    """Each rank reads the views of its own samples from the cache: 2 processes of 16 train like 1 of 32 (the views
    are per sample, not per rank, so unlike online augmentation the runs agree)."""
    from kdkit.experiment import train_run

    from procs import kdkit_train

    tmp, cfg = cached
    common = dict(cfg, teacher={"cache": str(tmp / "cache")}, eval=dict(cfg["eval"], efficiency=False),
                  student=dict(cfg["student"], kwargs={"hidden": 8, "size": 8, "dropout": 0.0}))
    train = dict(cfg["train"], max_steps=12, eval_every=100, save_every=None, export="last", tracker="none")
    train_run(validate(dict(common, output_dir=str(tmp_path / "one"), train=dict(train, batch_size=32))))
    two = write_yaml(tmp_path / "two.yaml",
                     dict(common, output_dir=str(tmp_path / "two"), train=dict(train, batch_size=16)))
    done = kdkit_train(two, processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "student" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "student" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
