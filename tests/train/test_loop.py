"""The loop's promises: non-finite steps are skipped without advancing anything, early stopping, precision."""

import json
import math

from kdkit.config import validate
from kdkit.experiment import train_run

from conftest import TINY, tiny_config


def _rows(run, kind):
    return [r for r in map(json.loads, (run / "history.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_non_finite_steps_are_skipped(tmp_path):
    cfg = validate(tiny_config(tmp_path / "run", teacher=None, train__max_steps=5,
                               student={"factory": f"{TINY}:flaky_mlp", "kwargs": {"bad_calls": [2, 3]}}))
    train_run(cfg)
    skips, train = _rows(tmp_path / "run", "skip"), _rows(tmp_path / "run", "train")
    assert len(skips) == 2 and all(s["step"] == 1 for s in skips)  # the step counter did not advance
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]  # every real step still happened
    assert all(math.isfinite(r["loss"]) for r in train)
    state = json.loads(next((tmp_path / "run" / "checkpoints").glob("step-0000005/state.json")).read_text())
    assert state["skipped_steps"] == 2 and state["global_step"] == 5


def test_early_stopping(tmp_path):
    # a learning rate too small to change a prediction: no evaluation improves on the first
    cfg = validate(tiny_config(tmp_path / "run", teacher=None, train__max_steps=20, train__eval_every=1,
                               train__lr=1e-12, train__early_stopping_patience=2))
    train_run(cfg)
    evals = _rows(tmp_path / "run", "eval")
    assert [e["step"] for e in evals] == [1, 2, 3]
    assert json.loads((tmp_path / "run" / "student" / "train.json").read_text())["steps"] == 3


def test_bf16_mixed_precision_on_cpu(tmp_path):
    cfg = validate(tiny_config(tmp_path / "run", train__precision="bf16", train__max_steps=3))
    metrics = train_run(cfg)
    assert all(math.isfinite(r["loss"]) for r in _rows(tmp_path / "run", "train"))
    assert metrics["student"]["accuracy"] >= 0
