"""Shared fixtures: tiny configs on offline data (scikit-learn digits), never a download."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
TINY = f"{TESTS / 'tiny_models.py'}"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Demo teachers trained by tests and downloads go to a per-session cache, never the user's.
    monkeypatch.setenv("KDKIT_CACHE", str(tmp_path_factory.getbasetemp() / "kdkit-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny_config(out: Path, **extra) -> dict:
    """A digits run with a tiny MLP student and teacher: seconds on a CPU."""
    cfg = {
        "output_dir": str(out),
        "seed": 0,
        "data": {"source": "digits", "val_fraction": 0.1, "limit_eval": 64},
        "student": {"factory": f"{TINY}:tiny_mlp", "kwargs": {"hidden": 8, "size": 8}},
        "teacher": {"factory": f"{TINY}:tiny_mlp", "kwargs": {"hidden": 32, "size": 8, "dropout": 0.0}},
        "distill": {"temperature": 2.0, "terms": [{"kind": "ce", "weight": 0.5}, {"kind": "kd", "weight": 0.5}]},
        "train": {"max_steps": 6, "batch_size": 32, "lr": 0.01, "eval_every": 3, "save_every": 3, "log_every": 1,
                  "progress": False, "tracker": "tensorboard"},
        "eval": {"batch_size": 64, "latency_repeats": 2, "warmup": 1},
    }
    for key, value in extra.items():
        node = cfg
        *head, last = key.split("__")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = value
    return cfg


def write_yaml(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path
