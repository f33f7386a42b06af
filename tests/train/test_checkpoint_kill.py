"""Checkpoints survive a kill at any moment: the previous checkpoint always loads, `best` is always recoverable,
rotation never keeps more than keep_last + 1 step checkpoints and never deletes outside the run directory."""

import multiprocessing as mp
import os
import random
import shutil
import signal
import time
import warnings

import pytest
import torch

from kdkit.train import checkpoint as ckpt

KEEP = 1
TRIALS = 24
DEAD_PID = 99_999_999  # above any pid_max: no such process


def _tensors(step: int, n: int) -> dict[str, torch.Tensor]:
    """Model weights whose values encode `step` (n floats, 4n bytes in all)."""
    return {"a": torch.full((n * 3 // 5,), float(step)), "b": torch.arange(n - n * 3 // 5, dtype=torch.float32) + step}


def _save(run, step: int, n: int) -> None:
    """What the trainer does at a save: step checkpoint, rotation, then a re-save of `best`."""
    root = run / "checkpoints"
    meta = {"step": step, "config_hash": "c0ffee", "teacher_fingerprint": "t"}
    optimizer = {"state": {0: {"exp_avg": torch.full((256,), float(step))}},
                 "param_groups": [{"lr": 0.1, "step": step}]}
    ckpt.write_checkpoint(root / f"{ckpt.PREFIX}{step:07d}", model_state=_tensors(step, n),
                          objects={"optimizer": optimizer}, state={"global_step": step}, meta=meta, run_dir=run)
    ckpt.prune(root, KEEP, run)
    ckpt.write_checkpoint(root / "best", model_state=_tensors(step, n), objects={}, state={"global_step": step},
                          meta=meta, run_dir=run)


def _check_loads(d, step: int, n: int) -> None:
    model, objects, state = ckpt.load_checkpoint(d)
    want = _tensors(step, n)
    assert model.keys() == want.keys() and all(torch.equal(model[k], want[k]) for k in want), d
    assert state["global_step"] == step
    if d.name != "best":
        assert torch.equal(objects["optimizer"]["state"][0]["exp_avg"], torch.full((256,), float(step)))


def _check_after_crash(run, n: int) -> tuple[int, int]:
    """Every invariant a crash must leave intact; returns (latest step, best step)."""
    root = run / "checkpoints"
    steps = ckpt.step_checkpoints(root)
    assert 1 <= len(steps) <= KEEP + 1, [d.name for d in steps]
    assert all(ckpt.verify(d) is not None for d in steps), "a visible step-N is always whole"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        latest, manifest = ckpt.latest_complete(root)
    _check_loads(latest, manifest["step"], n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "a save was interrupted; restored the previous copy"
        best = ckpt.recover(root / "best")
    assert best is not None, "best is always recoverable"
    _check_loads(root / "best", best["step"], n)
    assert best["step"] in (manifest["step"] - 1, manifest["step"])  # a best re-save cut short rolls back one step
    # the next save (a resumed run) cleans up everything the crash left
    ckpt.prune(root, KEEP, run)
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []
    assert ckpt.step_checkpoints(root) == [latest]
    return manifest["step"], best["step"]


# -- kill -9 at random moments --------------------------------------------------------------------------------

N_KILL = 1_000_000  # 4 MB of weights per checkpoint


def _writer(run, ready) -> None:
    torch.set_num_threads(1)
    for step in range(1, 100_000):
        _save(run, step, N_KILL)
        ready.set()


@pytest.fixture(scope="module")
def save_seconds(tmp_path_factory):
    """How long one save (step checkpoint + prune + best) takes here."""
    run = tmp_path_factory.mktemp("calibrate") / "run"
    times = []
    for step in range(1, 4):
        t = time.perf_counter()
        _save(run, step, N_KILL)
        times.append(time.perf_counter() - t)
    return sorted(times)[1]


_DELAYS = [random.Random(20240603 + i).uniform(0.0, 3.0) for i in range(TRIALS)]  # in save durations


@pytest.mark.parametrize("trial", range(TRIALS))
def test_kill_9_while_saving_keeps_the_previous_checkpoint(tmp_path, save_seconds, trial):
    run = tmp_path / "run"
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_writer, args=(run, ready), daemon=True)
    child.start()
    try:
        assert ready.wait(30), "the writer never completed its first save"
        time.sleep(_DELAYS[trial] * save_seconds)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
    assert child.exitcode == -signal.SIGKILL, f"the writer died on its own (exit code {child.exitcode})"
    _check_after_crash(run, N_KILL)


# -- a crash at each dangerous instant, deterministically -------------------------------------------------------

N_SMALL = 64


class _Crash(BaseException):
    """Stands for a kill: nothing in the writer catches it."""


def _crash_at(monkeypatch, n: int | None) -> list[str]:
    """Count every filesystem mutation (and fsync); raise _Crash just before the n-th (0-based)."""
    calls = []
    for name in ("rename", "unlink", "rmdir", "mkdir", "fsync"):
        real = getattr(os, name)

        def fake(*a, _real=real, _name=name, **k):
            if len(calls) == n:
                raise _Crash(_name)
            calls.append(_name)
            return _real(*a, **k)
        monkeypatch.setattr(os, name, fake)
    return calls


def _two_saves(tmp_path):
    run = tmp_path / "base" / "run"
    for step in (1, 2):
        _save(run, step, N_SMALL)
    return run


def test_a_crash_at_every_instant_of_a_save_keeps_everything_loadable(tmp_path, monkeypatch):
    base = _two_saves(tmp_path)
    with monkeypatch.context() as m:  # dry run: how many instants are there?
        dry = tmp_path / "dry" / "run"
        shutil.copytree(base, dry, symlinks=True)
        calls = _crash_at(m, None)
        _save(dry, 3, N_SMALL)
        total = len(calls)
    assert {"rename", "unlink", "fsync"} <= set(calls) and total > 20
    outcomes = set()
    for n in range(total):
        run = tmp_path / f"crash-{n}" / "run"
        shutil.copytree(base, run, symlinks=True)
        with monkeypatch.context() as m:
            _crash_at(m, n)
            with pytest.raises(_Crash):
                _save(run, 3, N_SMALL)
        outcomes.add(_check_after_crash(run, N_SMALL))
        _save(run, 4, N_SMALL)  # and the run goes on from there
        assert _check_after_crash(run, N_SMALL) == (4, 4)
    assert outcomes == {(2, 2), (3, 2), (3, 3)}  # before the step, between it and best, after best


def test_recover_puts_back_best_left_aside_by_a_kill(tmp_path):
    run = _two_saves(tmp_path)
    root = run / "checkpoints"
    # the state between the two renames of a best re-save by a process now dead
    (root / "best").rename(root / f".old-best-{DEAD_PID}")
    shutil.copytree(root / "step-0000002", root / f".tmp-best-{DEAD_PID}")
    assert ckpt.verify(root / "best") is None
    with pytest.warns(UserWarning, match="interrupted"):
        assert ckpt.recover(root / "best")["step"] == 2
    _check_loads(root / "best", 2, N_SMALL)


def test_prune_keeps_the_only_complete_copy_of_best(tmp_path):
    run = _two_saves(tmp_path)
    root = run / "checkpoints"
    (root / "best").rename(root / f".old-best-{DEAD_PID}")
    with pytest.warns(UserWarning, match="interrupted"):
        ckpt.prune(root, KEEP, run)
    _check_loads(root / "best", 2, N_SMALL)
    assert not list(root.glob(".old-*"))
    # a half-deleted copy aside (kill while removing it after the swap) goes; the whole best stays
    shutil.copytree(root / "best", root / f".old-best-{DEAD_PID}")
    (root / f".old-best-{DEAD_PID}" / "model.safetensors").unlink()
    ckpt.prune(root, KEEP, run)
    assert not list(root.glob(".old-*")) and ckpt.verify(root / "best") is not None


def test_another_live_writer_is_left_alone(tmp_path):
    run = _two_saves(tmp_path)
    root = run / "checkpoints"
    for name in (".tmp-step-0000009-1", ".old-best-1"):  # pid 1 is alive
        (root / name).mkdir()
    ckpt.prune(root, KEEP, run)
    assert (root / ".tmp-step-0000009-1").is_dir() and (root / ".old-best-1").is_dir()


def test_prune_never_deletes_through_a_symlink(tmp_path):
    outside = tmp_path / "outside"
    _save(outside / "run", 1, N_SMALL)
    target = outside / "run" / "checkpoints" / "step-0000001"
    (outside / "keep.txt").write_text("mine")
    run = tmp_path / "run"
    root = run / "checkpoints"
    root.mkdir(parents=True)
    (root / "step-0000001").symlink_to(target, target_is_directory=True)
    (root / f".tmp-step-0000005-{DEAD_PID}").symlink_to(outside, target_is_directory=True)
    for step in (2, 3, 4):
        _save(run, step, N_SMALL)
        (root / f"step-{step:07d}" / "notes").symlink_to(outside / "keep.txt")  # a link inside a pruned checkpoint
    assert ckpt.verify(target) is not None and (outside / "keep.txt").read_text() == "mine"
    assert (root / "step-0000001").is_symlink() and (root / f".tmp-step-0000005-{DEAD_PID}").is_symlink()
    assert [d.name for d in ckpt.step_checkpoints(root) if not d.is_symlink()] == ["step-0000004"]
    # a checkpoint root that leads outside the run directory is refused outright
    elsewhere = tmp_path / "run2"
    elsewhere.mkdir()
    (elsewhere / "checkpoints").symlink_to(outside / "run" / "checkpoints", target_is_directory=True)
    with pytest.raises(ValueError, match="outside the run directory"):
        ckpt.prune(elsewhere / "checkpoints", KEEP, elsewhere)
    assert ckpt.verify(target) is not None
