"""`kdkit train / eval / report / demo` end to end on tiny models: every file of the run-directory contract."""

import json
import subprocess
import sys

import pytest
import yaml

from kdkit.cli.main import main

from conftest import tiny_config, write_yaml


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = tiny_config(tmp / "run", compare_baseline=True,
                      distill__terms=[{"kind": "ce", "weight": 0.1}, {"kind": "kd", "weight": 0.9},
                                      {"kind": "dkd", "weight": 0.5, "name": "dkd"}])
    path = write_yaml(tmp / "cfg.yaml", cfg)
    assert main(["train", str(path), "train.max_steps=4", "train.eval_every=2"]) == 0
    return tmp / "run"


def test_train_writes_the_run_directory_contract(finished_run):
    run = finished_run
    for name in ("config.yaml", "history.jsonl", "metrics.json", "report.md", "student/kdkit.json",
                 "student/model.safetensors", "baseline/student/model.safetensors", "baseline/history.jsonl"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert {p.name for p in (run / "plots").glob("*.png")} >= {"loss.png", "val_accuracy.png", "accuracy_vs_params.png"}
    # checkpoints count only with their manifest
    steps = sorted((run / "checkpoints").glob("step-*"))
    assert steps and all((s / "manifest.json").is_file() for s in steps)
    # resolved config: defaults filled in, overrides applied
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["max_steps"] == 4 and resolved["train"]["scheduler"] == "cosine"
    # history: every named loss part on every train line
    rows = [json.loads(l) for l in (run / "history.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all({"step", "epoch", "lr", "loss", "ce", "kd", "dkd"} <= r.keys() for r in train)
    assert any(r["kind"] == "eval" and "accuracy" in r for r in rows)
    base_rows = [json.loads(l) for l in (run / "baseline" / "history.jsonl").read_text().splitlines()]
    assert all("kd" not in r for r in base_rows if r["kind"] == "train")  # the baseline never sees the teacher


def test_metrics_follow_the_contract(finished_run):
    m = json.loads((finished_run / "metrics.json").read_text())
    assert m["task"] == "classification"
    keys = {"accuracy", "top5", "params", "size_mb", "latency_ms", "throughput", "peak_mem_mb"}
    for who in ("student", "teacher", "baseline"):
        assert keys <= m[who].keys(), who
    assert m["gain"]["accuracy"] == pytest.approx(m["student"]["accuracy"] - m["baseline"]["accuracy"], abs=1e-3)
    assert m["compression"] == pytest.approx(m["teacher"]["params"] / m["student"]["params"], rel=1e-3)
    assert m["speedup"] == pytest.approx(m["teacher"]["latency_ms"] / m["student"]["latency_ms"], rel=1e-2)
    assert "agreement" in m["student"]
    report = (finished_run / "report.md").read_text()
    assert "Teacher" in report and "Baseline" in report and "Distilled" in report


def test_eval_and_report_rebuild(finished_run, capsys):
    (finished_run / "metrics.json").unlink()
    (finished_run / "report.md").unlink()
    assert main(["eval", str(finished_run)]) == 0
    assert json.loads((finished_run / "metrics.json").read_text())["student"]["accuracy"] >= 0
    assert main(["report", str(finished_run)]) == 0
    assert (finished_run / "report.md").is_file()


def test_finished_run_is_not_overwritten(finished_run, capsys):
    path = write_yaml(finished_run.parent / "again.yaml", tiny_config(finished_run))
    before = (finished_run / "student" / "model.safetensors").read_bytes()
    assert main(["train", str(path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (finished_run / "student" / "model.safetensors").read_bytes() == before


def test_plain_training_without_teacher(tmp_path):
    cfg = tiny_config(tmp_path / "run", teacher=None)
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", cfg))]) == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "teacher" not in m and "baseline" not in m and m["student"]["accuracy"] > 0


def test_bad_inputs_exit_2_without_traceback(tmp_path):
    cases = {
        "missing data dir": ["data.source=image_folder", f"data.path={tmp_path / 'nope'}", "data.image_size=[8,8]"],
        "bad factory": ["student.factory=nowhere_mod:f"],
        "fp16 on cpu": ["train.precision=fp16"],
    }
    path = write_yaml(tmp_path / "c.yaml", tiny_config(tmp_path / "run"))
    for name, overrides in cases.items():
        proc = subprocess.run([sys.executable, "-m", "kdkit", "train", str(path), *overrides],
                              capture_output=True, text=True)
        assert proc.returncode == 2, (name, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stderr.strip(), name


def test_demo_quick(tmp_path, capsys):
    """The image demo distils from a teacher cache made on its first run and reused by the next."""
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert {"teacher", "baseline", "student", "gain", "compression"} <= m.keys()
    assert m["compression"] >= 10 and m["teacher"]["accuracy"] > 0  # the teacher's figures, measured at cache time
    assert (out / "report.md").is_file() and (out / "baseline" / "student" / "kdkit.json").is_file()
    first = capsys.readouterr().out
    assert "teacher outputs: cached in" in first and "finished shard(s) kept" not in first
    assert main(["demo", "--quick", "--output", str(out)]) == 0
    assert "finished shard(s) kept" in capsys.readouterr().out
    again = json.loads((out / "metrics.json").read_text())["student"]
    assert again["accuracy"] == m["student"]["accuracy"] and again["loss"] == m["student"]["loss"]


def test_lm_demo_quick(tmp_path, capsys):
    """The language-model demo's code path on a tiny budget (the quick mode reads one package of the standard
    library; without a shipped teacher it first trains one, also on the quick budget, into the test cache)."""
    out = tmp_path / "lm_demo"
    assert main(["demo", "--task", "lm", "--quick", "--output", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "lm" and {"teacher", "baseline", "student", "gain", "compression"} <= m.keys()
    assert all(m[k]["perplexity"] > 1 for k in ("teacher", "baseline", "student"))
    assert "distilled / baseline test perplexity" in capsys.readouterr().out
    assert (out / "report.md").is_file() and (out / "student" / "README.md").is_file()
