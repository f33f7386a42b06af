"""Numerics guard, batch_size auto and the signal handler's second-signal rule."""

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from kdkit.config import validate
from kdkit.errors import UserError
from kdkit.experiment import train_run
from kdkit.train import autobatch
from kdkit.train.signals import GracefulStop

from conftest import TINY, tiny_config


def _rows(run, kind):
    return [r for r in map(json.loads, (run / "history.jsonl").read_text().splitlines()) if r["kind"] == kind]


# -- numerics guard --------------------------------------------------------------------------------------------------

def test_a_non_finite_gradient_skips_the_step_even_without_clipping(tmp_path):
    cfg = validate(tiny_config(tmp_path / "run", teacher=None, train__max_steps=4, train__max_grad_norm=None,
                               student={"factory": f"{TINY}:nan_grad_mlp", "kwargs": {"bad_calls": [2]}}))
    train_run(cfg)
    assert [(r["step"]) for r in _rows(tmp_path / "run", "skip")] == [1]
    assert [r["step"] for r in _rows(tmp_path / "run", "train")] == [1, 2, 3, 4]
    weights = load_file(str(tmp_path / "run" / "student" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_consecutive_skips_stop_the_run_with_a_clear_message(tmp_path):
    cfg = validate(tiny_config(tmp_path / "run", teacher=None, train__max_steps=20, train__max_consecutive_skips=3,
                               student={"factory": f"{TINY}:flaky_mlp", "kwargs": {"bad_calls": list(range(2, 50))}}))
    with pytest.raises(UserError, match=r"3 consecutive steps had a non-finite loss or gradient \(train.max_consecutive_skips\)"):
        train_run(cfg)
    assert len(_rows(tmp_path / "run", "skip")) == 3
    assert [r["step"] for r in _rows(tmp_path / "run", "train")] == [1]


# -- batch_size: auto ------------------------------------------------------------------------------------------------

def test_largest_fitting_tries_divisors_from_the_top():
    tried = []

    def fits(micro):
        tried.append(micro)
        return micro <= 20

    assert autobatch.largest_fitting(64, fits) == 16
    assert tried == [64, 32, 16]
    assert autobatch.largest_fitting(12, lambda m: False) is None


def test_out_of_memory_is_recognised():
    assert autobatch.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert autobatch.is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert not autobatch.is_out_of_memory(RuntimeError("shape mismatch"))


def _auto(out, **extra):
    student = {"factory": f"{TINY}:memory_limited_mlp", "kwargs": {"max_batch": 20, "dropout": 0.3}}
    return validate(tiny_config(out, student=student, train__max_steps=8, train__export="last", **extra))


def test_auto_batch_keeps_the_global_batch_and_leaves_no_trace(tmp_path):
    train_run(_auto(tmp_path / "auto", train__batch_size="auto", train__global_batch_size=64))
    record = json.loads((tmp_path / "auto" / "auto_batch.json").read_text())
    assert record == {"batch_size": 16, "grad_accum": 4, "global_batch_size": 64, "num_processes": 1}
    # the same run with that micro-batch written out: identical weights (the search touched no RNG, weight or buffer)
    train_run(_auto(tmp_path / "fixed", train__batch_size=16, train__grad_accum=4))
    a = load_file(str(tmp_path / "auto" / "student" / "model.safetensors"))
    b = load_file(str(tmp_path / "fixed" / "student" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_auto_batch_is_reused_on_resume(tmp_path, monkeypatch):
    cfg = _auto(tmp_path / "run", train__batch_size="auto", train__global_batch_size=64)
    train_run(cfg)
    calls = []
    monkeypatch.setattr(autobatch, "largest_fitting", lambda *a: calls.append(a) or 1)
    train_run(cfg, resume=True)
    assert calls == []  # the recorded answer was used, not a new search


def test_auto_batch_needs_a_global_batch(tmp_path):
    from kdkit.errors import ConfigError

    with pytest.raises(ConfigError, match="global_batch_size"):
        validate(tiny_config(tmp_path, train__batch_size="auto"))


# -- signals -----------------------------------------------------------------------------------------------------------

def test_a_repeated_signal_is_one_signal_within_the_debounce_and_exits_after_it(monkeypatch):
    exits, now = [], [100.0]
    monkeypatch.setattr("kdkit.train.signals.os._exit", exits.append)
    monkeypatch.setattr("kdkit.train.signals.time.monotonic", lambda: now[0])
    with GracefulStop() as stop:
        assert stop.requested() == 0
        stop._handle(signal.SIGTERM, None)
        assert stop.requested() == signal.SIGTERM and exits == []
        now[0] += 0.5
        stop._handle(signal.SIGINT, None)  # e.g. a launcher forwarding the same Ctrl-C
        assert exits == []
        now[0] += 5.0
        stop._handle(signal.SIGINT, None)
        assert exits == [128 + signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) is not stop._handle  # handlers restored


# -- the teacher is never trained ------------------------------------------------------------------------------------

def test_the_teacher_is_never_prepared_optimised_or_given_gradients(tmp_path):
    from kdkit.experiment import make_accelerator
    from kdkit.tasks import get_task
    from kdkit.train import Trainer

    cfg = validate(tiny_config(tmp_path / "run", train__max_steps=3))
    task = get_task(cfg.task)
    acc = make_accelerator(cfg)
    data = task.build_data(cfg)
    teacher = task.load_teacher(cfg, data, acc.device)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    trainer = Trainer(cfg, tmp_path / "run", task.make_distiller(cfg, data, teacher, baseline=False), data, acc)
    trainer.fit()
    teacher_params = list(teacher.model.parameters())
    assert all(not p.requires_grad and p.grad is None for p in teacher_params)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised and not optimised & {id(p) for p in teacher_params}
    assert not any(p is q for p in teacher_params for q in trainer.model.parameters())  # not inside the prepared model
    assert all(torch.equal(before[k], v) for k, v in teacher.model.state_dict().items())


# -- launch options --------------------------------------------------------------------------------------------------

def test_launch_options(tmp_path):
    from kdkit.cli import launch

    assert launch.resolve_accelerate_config("fsdp").is_file() and launch.resolve_accelerate_config("ddp").is_file()
    ds = tmp_path / "ds.yaml"
    ds.write_text("distributed_type: DEEPSPEED\ndeepspeed_config: {zero_stage: 2}\n")
    with pytest.raises(UserError, match="DeepSpeed is not supported yet"):
        launch.resolve_accelerate_config(str(ds))
    with pytest.raises(UserError, match="neither a shipped config"):
        launch.resolve_accelerate_config(str(tmp_path / "missing.yaml"))
    cmd = launch.launch_command(["train", "c.yaml", "train.lr=0.1"], 4, None)
    assert cmd[1:4] == ["-m", "accelerate.commands.launch", "--num_processes"] and cmd[4] == "4"
    assert "--multi_gpu" in cmd and cmd[-5:] == ["-m", "kdkit", "train", "c.yaml", "train.lr=0.1"]
    assert "--config_file" in launch.launch_command(["train", "c.yaml"], 2, launch.shipped_config("fsdp"))
