"""`kdkit train` with features and attention terms on digits: the printed plan, the logged parts, projectors that
train at their own learning rate, sit in checkpoints (an exact resume) and stay out of the exported student."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdkit.cli.main import main
from kdkit.config import validate
from kdkit.experiment import make_accelerator, train_run
from kdkit.models import load_exported
from kdkit.tasks import get_task
from kdkit.train import Trainer

from conftest import TINY, tiny_config, write_yaml
from tiny_nets import zoo_cnn

NETS = f"{Path(__file__).parent / 'tiny_nets.py'}"

TERMS = [{"kind": "ce", "weight": 0.5}, {"kind": "kd", "weight": 0.5},
         {"kind": "features", "name": "feat", "num_pairs": 2, "weight": 1.0},
         {"kind": "attention", "name": "at", "weight": 2.0}]


def _cfg(out, **extra):
    extra.setdefault("distill__terms", TERMS)
    extra.setdefault("teacher", zoo_cnn(width=8, depth=2))
    return tiny_config(out, student=zoo_cnn(width=4, depth=1), distill__projector_lr=0.05, train__export="last",
                       **extra)


def _rows(run: Path, kind="train"):
    return [r for r in map(json.loads, (run / "history.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("features")
    path = write_yaml(tmp / "cfg.yaml", _cfg(tmp / "run", compare_baseline=True))
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", str(path)]) == 0
    return tmp / "run", out.getvalue()


def test_the_plan_is_printed_before_training(run):
    _, printed = run
    plan = printed[:printed.index("distilled: step")]
    assert "feat: 2 pairs (student -> teacher, projector), mse, weight 1 (layers: auto, 2 of 3 student and 6 teacher" in plan
    assert "  net.2 (8x4x4) -> net.3 (16x4x4), conv1x1 8->16" in plan
    assert "  net.4 (16x2x2) -> net.7 (32x2x2), conv1x1 16->32" in plan
    assert "at: 3 pairs (student -> teacher), attention transfer (Zagoruyko & Komodakis), weight 2" in plan
    assert "  net.0 (4x8x8) -> net.1 (8x8x8), map 8x8" in plan
    assert "projectors: 688 parameters, learning rate 0.05, saved in checkpoints, not in student/" in plan
    assert "dry forward of each model on a 2x1x8x8 batch" in plan


def test_every_term_is_a_logged_part(run):
    path, _ = run
    rows = _rows(path)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for r in rows:
        assert {"ce", "kd", "feat", "at"} <= r.keys() and all(r[k] > 0 for k in ("feat", "at"))
        parts = 0.5 * r["ce"] + 0.5 * r["kd"] + 1.0 * r["feat"] + 2.0 * r["at"]
        assert r["loss"] == pytest.approx(parts, rel=1e-4)
    assert rows[-1]["feat"] < rows[0]["feat"]  # the projectors (and student) learn to match
    assert all("feat" not in r and "at" not in r for r in _rows(path / "baseline"))


def test_the_exported_student_has_no_projectors_and_reloads(run):
    path, _ = run
    exported = load_file(str(path / "student" / "model.safetensors"))
    baseline = load_file(str(path / "baseline" / "student" / "model.safetensors"))
    assert exported.keys() == baseline.keys() and not any("proj" in k for k in exported)
    ckpt = load_file(str(path / "checkpoints" / "step-0000006" / "model.safetensors"))
    assert {k for k in ckpt if k.startswith("projectors.")} == {
        "projectors.feat__0.proj.weight", "projectors.feat__0.proj.bias",
        "projectors.feat__1.proj.weight", "projectors.feat__1.proj.bias"}
    assert {k.removeprefix("student.net.") for k in ckpt if k.startswith("student.")} == exported.keys()
    assert all(torch.equal(exported[k], ckpt[f"student.net.{k}"]) for k in exported)
    model = load_exported(path, "student")
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    metrics = json.loads((path / "metrics.json").read_text())
    assert metrics["student"]["params"] == metrics["baseline"]["params"]


def test_a_resumed_run_ends_exactly_as_the_straight_one(run, tmp_path, capsys):
    straight, _ = run
    victim = tmp_path / "victim"
    shutil.copytree(straight, victim)
    for name in ("student", "metrics.json", "report.md", "checkpoints/step-0000006", "checkpoints/best"):
        p = victim / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    train_run(validate(_cfg(victim, compare_baseline=True)), resume=True)
    assert f"resumed from {victim / 'checkpoints' / 'step-0000003'} at step 3" in capsys.readouterr().out
    for f in ("student/model.safetensors", "checkpoints/step-0000006/model.safetensors"):
        a, b = load_file(str(straight / f)), load_file(str(victim / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
    assert strip(_rows(straight)) == strip(_rows(victim))


def _trainer(tmp_path, cfg, baseline=False):
    cfg = validate(cfg)
    task = get_task("classification")
    acc = make_accelerator(cfg)
    data = task.build_data(cfg)
    teacher = task.load_teacher(cfg, data, acc.device)
    distiller = task.make_distiller(cfg, data, teacher, baseline=baseline)
    return Trainer(cfg, tmp_path, distiller, data, acc), distiller, data


def test_projectors_have_their_own_learning_rate(tmp_path, capsys):
    trainer, distiller, data = _trainer(tmp_path / "run", _cfg(tmp_path / "run"))
    groups = trainer.optimizer.param_groups
    projectors = list(distiller.inner.module.projectors.parameters())
    assert len(groups) == 2 and groups[1]["name"] == "projectors"
    assert groups[0]["initial_lr"] == 0.01 and groups[1]["initial_lr"] == 0.05
    assert [id(p) for p in groups[1]["params"]] == [id(p) for p in projectors]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in distiller.student.parameters()}
    before = [p.detach().clone() for p in projectors]
    from kdkit.data import make_loader

    batch = next(iter(make_loader(data.train, batch_size=32, shuffle=False, seed=0)))
    parts = trainer._step([batch])
    assert parts is not None and {"feat", "at"} <= parts.keys()
    assert all(not torch.equal(a, b) for a, b in zip(before, projectors))
    # no hook is left on either model after a step, and the trainer's student is the bare one
    assert all(not m._forward_hooks for m in distiller.student.modules())
    assert all(not m._forward_hooks for m in distiller.teacher.model.modules())
    assert trainer.student is distiller.student
    # the baseline (no teacher) trains the student alone, in one group, as before
    base, base_distiller, _ = _trainer(tmp_path / "base", _cfg(tmp_path / "base", teacher=None,
                                                                 distill__terms=[{"kind": "ce"}]), baseline=True)
    assert len(base.optimizer.param_groups) == 1 and base_distiller.inner is None
    assert base.student is base_distiller.student


@pytest.mark.parametrize("student, layers, message", [
    (None, [["net.0.11", "net.1"]], "distill.terms.feat.layers: the student has no module 'net.0.11'; did you mean net.0.1"),
    (None, [["net.0", "layer9"]], "distill.terms.feat.layers: the teacher has no module 'layer9'"),
    ({"factory": f"{NETS}:tiny_resnet"}, [["aux", "net.1"]],
     "distill.terms.feat.layers: the student's module net.aux does not run (or returns no tensor) in a forward pass"),
])
def test_a_bad_module_path_exits_2_naming_the_config_path(tmp_path, capsys, student, layers, message):
    cfg = _cfg(tmp_path / "run", distill__terms=[{"kind": "ce"}, {"kind": "features", "name": "feat", "layers": layers}])
    cfg["student"] = student or cfg["student"]
    assert main(["train", str(write_yaml(tmp_path / "cfg.yaml", cfg))]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training


def test_auto_without_blocks_exits_2(tmp_path, capsys):
    cfg = _cfg(tmp_path / "run", distill__terms=[{"kind": "ce"}, {"kind": "features", "name": "feat"}])
    cfg["student"] = {"factory": f"{TINY}:tiny_mlp", "kwargs": {"hidden": 8, "size": 8}}
    assert main(["train", str(write_yaml(tmp_path / "cfg.yaml", cfg))]) == 2
    err = capsys.readouterr().err
    assert "distill.terms.feat.layers: auto found no blocks in the student" in err and "Traceback" not in err
