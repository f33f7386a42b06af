"""Feature projectors under DDP (2 processes, gloo on the CPU): their gradients are synchronised, so 2 processes
train student and projectors like 1 process with the same global batch."""

import pytest
import torch
from safetensors.torch import load_file

from kdkit.config import validate
from kdkit.experiment import train_run

from conftest import tiny_config, write_yaml
from procs import kdkit_train
from tiny_nets import hf_vit


def test_two_processes_train_projectors_like_one(tmp_path):
    # ViTs: LayerNorm only (BatchNorm statistics would differ between a batch of 32 and two of 16)
    common = dict(student=hf_vit(hidden=8, layers=2, heads=2), teacher=hf_vit(hidden=16, layers=2, heads=2),
                  distill__terms=[{"kind": "ce", "weight": 0.5}, {"kind": "kd", "weight": 0.5},
                                  {"kind": "features", "name": "feat", "num_pairs": 2},
                                  {"kind": "attention", "name": "att", "mode": "kl"}],
                  distill__projector_lr=0.05, train__max_steps=6, train__eval_every=6, train__save_every=None,
                  train__export="last", train__tracker="none", eval__efficiency=False)
    train_run(validate(tiny_config(tmp_path / "one", train__batch_size=32, **common)))
    two = write_yaml(tmp_path / "two.yaml", tiny_config(tmp_path / "two", train__batch_size=16, **common))
    done = kdkit_train(two, processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    last = "checkpoints/step-0000006/model.safetensors"
    a, b = load_file(str(tmp_path / "one" / last)), load_file(str(tmp_path / "two" / last))
    assert a.keys() == b.keys() and any(k.startswith("projectors.") for k in a)
    for k in a:
        # a key bias adds the same score to every key of a query: softmax ignores it, so its gradient is float
        # round-off only, which AdamW scales up to full-size steps in whatever direction the noise points
        if not k.endswith("k_proj.bias"):
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    exported = load_file(str(tmp_path / "two" / "student" / "model.safetensors"))
    assert not any(k.startswith("projectors") for k in exported)
    assert done.stdout.count("feat: 2 pairs") == 1  # the plan is printed by the main process only


@pytest.fixture(autouse=True)
def _threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
