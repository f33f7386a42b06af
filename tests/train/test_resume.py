"""A resumed run must be bit-identical to an uninterrupted one on CPU (shuffling, dropout, augmentation,
gradient accumulation), whether it stops mid-epoch or at an epoch boundary."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from kdkit.config import validate
from kdkit.experiment import train_run
from kdkit.train import checkpoint as ckpt

from conftest import tiny_config, write_yaml
from procs import PY, kill_9_after


def _cfg(out):
    # digits: 1797 samples - 20% test - 10% val = 1294 train -> 40 batches of 32 -> 20 optimizer steps per epoch
    return validate(tiny_config(
        out, train__grad_accum=2, train__max_steps=30, train__save_every=5, train__keep_last=10,
        train__eval_every=10, train__export="last", data__val_fraction=0.1,
        student__kwargs={"hidden": 8, "size": 8, "dropout": 0.3},
        data__augment={"random_crop_padding": 1, "hflip": True}))


def _history(run):
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    train_run(_cfg(out))
    return out


@pytest.mark.parametrize("stop_at", [10, 20])  # mid-epoch, and exactly at the end of epoch 0
def test_kill_9_then_resume_is_bit_identical(tmp_path, straight, stop_at):
    config = write_yaml(tmp_path / "victim.yaml", _cfg(tmp_path / "victim").model_dump(mode="json"))
    kill_9_after([*PY, "train", str(config), "--no-report"], tmp_path / "victim" / "checkpoints", stop_at)
    victim = tmp_path / "victim"
    assert not (victim / "student").exists()  # the kill landed before the run's end
    state = json.loads((victim / "checkpoints" / f"step-{stop_at:07d}" / "state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"]) == (0, stop_at)  # 20 is the last step of epoch 0
    # it landed at some moment after `stop_at`; resume from exactly there, as if it had landed right after it
    for d in ckpt.step_checkpoints(victim / "checkpoints"):
        if int(d.name.split("-")[1]) > stop_at:
            shutil.rmtree(d)
    (victim / "checkpoints" / ".tmp-step-0000999-1").mkdir()  # a half-written checkpoint is ignored
    train_run(_cfg(victim), resume=True)

    a = load_file(str(straight / "student" / "model.safetensors"))
    b = load_file(str(victim / "student" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    opt_a = torch.load(straight / "checkpoints" / "step-0000030" / "optimizer.pt", weights_only=True)["state"]
    opt_b = torch.load(victim / "checkpoints" / "step-0000030" / "optimizer.pt", weights_only=True)["state"]
    assert all(torch.equal(opt_a[k][n], opt_b[k][n]) for k in opt_a for n in ("exp_avg", "exp_avg_sq"))
    assert _history(straight) == _history(victim)


def test_resume_refuses_a_changed_run(tmp_path, straight):
    victim = tmp_path / "victim"
    shutil.copytree(straight, victim)
    shutil.rmtree(victim / "student")
    from kdkit.errors import UserError
    changed = _cfg(victim).model_copy(update={"seed": 1})
    with pytest.raises(UserError, match="--force"):
        train_run(changed, resume=True)


def test_corrupt_newest_checkpoint_is_skipped(tmp_path, straight):
    root = tmp_path / "ck"
    shutil.copytree(straight / "checkpoints", root)
    newest = ckpt.step_checkpoints(root)[-1]
    (newest / "optimizer.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="corrupt"):
        found, manifest = ckpt.latest_complete(root)
    assert found != newest and manifest["step"] < 30
