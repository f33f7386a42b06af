"""Several processes on Accelerate (gloo on the CPU), launched by `kdkit train --num-processes 2`; kill -9 and
signals, then resume.

Each run here starts real processes (a few seconds of imports each), so the cases are chosen to be few."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdkit.config import validate
from kdkit.data import make_loader
from kdkit.experiment import train_run
from kdkit.train import checkpoint as ckpt

from conftest import tiny_config, write_yaml
from procs import PY, kdkit_train, kill_9_after, signal_after

def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "student" / "model.safetensors"))


def history(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def _yaml(tmp: Path, name: str, **extra) -> Path:
    return write_yaml(tmp / f"{name}.yaml", tiny_config(tmp / name, **extra))


# -- 2 processes = 1 process with the same global batch ------------------------------------------------------------

def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    common = dict(train__grad_accum=2, train__max_steps=20, train__eval_every=10, train__save_every=None,
                  train__export="last", train__tracker="none", eval__efficiency=False,
                  student__kwargs={"hidden": 8, "size": 8, "dropout": 0.0})
    one = validate(tiny_config(tmp_path / "one", train__batch_size=32, **common))
    train_run(one)
    two = _yaml(tmp_path, "two", train__batch_size=16, **common)
    done = kdkit_train(two, processes=2)
    assert done.returncode == 0, done.stderr[-3000:]

    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    h1, h2 = history(tmp_path / "one"), history(tmp_path / "two")
    assert [r["step"] for r in h1] == [r["step"] for r in h2]
    for r1, r2 in zip(h1, h2):
        assert r1["kind"] == r2["kind"]
        if r1["kind"] == "train":  # the logged loss is the mean over both processes
            assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
        else:  # validation: each process scored half of the 64 samples, and the totals were summed
            assert r2["samples"] == r1["samples"] == 64
            assert r2["accuracy"] == r1["accuracy"]
            assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)


def test_a_step_takes_the_same_samples_for_every_split_of_the_global_batch():
    """What lets a run resume on another number of processes: the samples of step s depend on the global batch only."""
    class Numbered(torch.utils.data.Dataset):
        def __len__(self):
            return 200

        def __getitem__(self, i):
            return torch.zeros(1, 1, 1, dtype=torch.uint8), 0

    def steps(batch, accum, world):
        per_rank = [list(make_loader(Numbered(), batch_size=batch, shuffle=True, seed=3, epoch=1, rank=r,
                                     world_size=world, drop_last=True)) for r in range(world)]
        n = len(per_rank[0]) // accum
        return [sorted(i for r in range(world) for b in per_rank[r][s * accum:(s + 1) * accum]
                       for i in b["index"].tolist()) for s in range(n)]

    reference = steps(32, 2, 1)
    assert steps(16, 2, 2) == reference
    assert steps(8, 4, 2) == reference
    assert steps(16, 4, 1) == reference
    seen = [i for step in reference for i in step]
    assert len(seen) == len(set(seen))  # no sample twice in an epoch


# -- kill -9, then resume: bit-identical, with 2 processes ---------------------------------------------------------

def _resume_config(tmp: Path, name: str) -> Path:
    # 1294 digits train samples; 2 processes x 16 x accumulation 2 -> 20 steps per epoch
    return _yaml(tmp, name, train__batch_size=16, train__grad_accum=2, train__max_steps=30, train__save_every=10,
                 train__keep_last=10, train__eval_every=10, train__export="last", train__tracker="none",
                 eval__efficiency=False, student__kwargs={"hidden": 8, "size": 8, "dropout": 0.3},
                 data__augment={"random_crop_padding": 1, "hflip": True})


@pytest.fixture(scope="module")
def straight_two(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight2")
    done = kdkit_train(_resume_config(tmp, "run"), processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "run"


@pytest.mark.parametrize("stop_at", [10, pytest.param(20, marks=pytest.mark.slow)])  # mid-epoch; epoch end
def test_kill_9_and_resume_with_two_processes_is_bit_identical(tmp_path, straight_two, stop_at):
    config = _resume_config(tmp_path, "victim")
    kill_9_after([*PY, "train", str(config), "--no-report", "--num-processes", "2"],
                 tmp_path / "victim" / "checkpoints", stop_at)
    assert not (tmp_path / "victim" / "student").exists()  # the kill landed before the run's end
    state = json.loads((tmp_path / "victim" / "checkpoints" / f"step-{stop_at:07d}" / "state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"]) == (0, stop_at)  # 20 is the last step of epoch 0
    # the kill landed at some later moment; resume from exactly `stop_at` (as if it had landed right there)
    for d in ckpt.step_checkpoints(tmp_path / "victim" / "checkpoints"):
        if int(d.name.split("-")[1]) > stop_at:
            shutil.rmtree(d)
    done = kdkit_train(config, "--resume", processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {tmp_path / 'victim' / 'checkpoints' / f'step-{stop_at:07d}'}" in done.stdout

    a, b = weights(straight_two), weights(tmp_path / "victim")
    assert all(torch.equal(a[k], b[k]) for k in a)
    last = f"{ckpt.PREFIX}{30:07d}"
    opt_a = torch.load(straight_two / "checkpoints" / last / "optimizer.pt", weights_only=True)["state"]
    opt_b = torch.load(tmp_path / "victim" / "checkpoints" / last / "optimizer.pt", weights_only=True)["state"]
    assert all(torch.equal(opt_a[k][n], opt_b[k][n]) for k in opt_a for n in ("exp_avg", "exp_avg_sq"))
    assert history(straight_two) == history(tmp_path / "victim")
    rng = torch.load(straight_two / "checkpoints" / last / "rng.pt", weights_only=True)["ranks"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])  # each rank its own dropout


# -- signals ---------------------------------------------------------------------------------------------------------

def _signal_config(tmp: Path, name: str) -> Path:
    return _yaml(tmp, name, train__max_steps=1500, train__save_every=250, train__keep_last=10, train__eval_every=500,
                 train__log_every=50, train__export="last", train__tracker="none", eval__efficiency=False,
                 student__kwargs={"hidden": 8, "size": 8, "dropout": 0.3})


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_checkpoints_the_current_step_and_the_resume_is_exact(tmp_path, signum, code):
    straight = _signal_config(tmp_path, "straight")
    assert kdkit_train(straight).returncode == 0
    config = _signal_config(tmp_path, "victim")
    ended = signal_after([*PY, "train", str(config), "--no-report"], tmp_path / "victim" / "checkpoints", 250, signum)
    assert ended.returncode == code, ended.stderr[-3000:]
    assert "Traceback" not in ended.stderr
    assert f"resume with: kdkit train {config} --no-report --resume" in ended.stderr
    stopped = int(ended.stderr.split(" at step ")[1].split(";")[0])
    assert 250 <= stopped < 1500
    assert ckpt.verify(tmp_path / "victim" / "checkpoints" / f"{ckpt.PREFIX}{stopped:07d}") is not None
    assert not (tmp_path / "victim" / "student").exists()

    done = kdkit_train(config, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "victim")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert history(tmp_path / "straight") == history(tmp_path / "victim")


def test_sigterm_stops_every_process_at_the_same_step(tmp_path):
    config = _signal_config(tmp_path, "run")
    ended = signal_after([*PY, "train", str(config), "--no-report", "--num-processes", "2"],
                         tmp_path / "run" / "checkpoints", 250, signal.SIGTERM)
    assert ended.returncode == 143, ended.stderr[-3000:]
    assert "Traceback" not in ended.stderr
    assert ended.stderr.count("resume with:") == 1 and "--num-processes 2" in ended.stderr
    stopped = int(ended.stderr.split(" at step ")[1].split(";")[0])
    state = json.loads((tmp_path / "run" / "checkpoints" / f"{ckpt.PREFIX}{stopped:07d}" / "state.json").read_text())
    assert state["global_step"] == stopped
    rng = torch.load(tmp_path / "run" / "checkpoints" / f"{ckpt.PREFIX}{stopped:07d}" / "rng.pt", weights_only=True)
    assert len(rng["ranks"]) == 2  # both ranks reached the same checkpoint (it gathers from every rank)
    done = kdkit_train(config, "--resume", processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [r["step"] for r in history(tmp_path / "run") if r["kind"] == "train"]
    assert steps == list(range(50, 1501, 50))
