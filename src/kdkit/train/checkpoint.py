"""Checkpoints that are whole or absent.

A checkpoint is written into a hidden temporary directory, every file fsynced, `manifest.json` (files, sizes,
sha256, step, config hash, teacher fingerprint) written *last*, then the directory renamed into place. Resume takes
the newest checkpoint whose manifest verifies and skips the others with a warning; rotation prunes old ones only
after the new one is whole (Accelerate's rotation deletes first, which loses the last good one on a kill).
Everything is safetensors or JSON, or `torch.save` of plain state dicts loaded back with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
PREFIX = "step-"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _inside(path: Path, root: Path) -> Path:
    path, root = path.resolve(), root.resolve()
    if path != root and root not in path.parents:
        raise ValueError(f"refusing to touch {path}: outside the run directory {root}")
    return path


def write_checkpoint(directory: Path, *, model_state: dict[str, torch.Tensor], objects: dict[str, Any],
                     state: dict[str, Any], meta: dict[str, Any], run_dir: Path) -> Path:
    """Write a complete checkpoint at `directory` atomically. `objects` are torch-saved state dicts."""
    directory = _inside(directory, run_dir)
    tmp = directory.parent / f".tmp-{directory.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    for name, obj in objects.items():
        torch.save(obj, tmp / f"{name}.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    files = {}
    for f in sorted(tmp.iterdir()):
        _fsync(f)
        files[f.name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    manifest = {"files": files, "created": time.time(), **meta}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync(tmp / MANIFEST)
    if directory.exists():  # re-saving the same step (e.g. "best"): move the old one aside only now
        old = directory.parent / f".old-{directory.name}-{os.getpid()}"
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(directory)
    _fsync(directory.parent)
    return directory


def verify(directory: Path) -> dict[str, Any] | None:
    """The manifest when every file it lists is present with its size and sha256; None otherwise."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        for name, info in manifest["files"].items():
            f = directory / name
            if f.stat().st_size != info["size"] or _sha256(f) != info["sha256"]:
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def step_checkpoints(ckpt_root: Path) -> list[Path]:
    """step-N directories, oldest first (temporary and half-written ones are hidden with a leading dot)."""
    if not ckpt_root.is_dir():
        return []
    dirs = [d for d in ckpt_root.iterdir() if d.is_dir() and d.name.startswith(PREFIX) and d.name[len(PREFIX):].isdigit()]
    return sorted(dirs, key=lambda d: int(d.name[len(PREFIX):]))


def latest_complete(ckpt_root: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies; incomplete or corrupt ones are skipped with a warning."""
    for d in reversed(step_checkpoints(ckpt_root)):
        manifest = verify(d)
        if manifest is not None:
            return d, manifest
        warnings.warn(f"skipping incomplete or corrupt checkpoint {d}", stacklevel=2)
    return None


def prune(ckpt_root: Path, keep_last: int, run_dir: Path) -> None:
    """Delete all but the newest `keep_last` complete step checkpoints, and stale temporary directories."""
    complete = [d for d in step_checkpoints(ckpt_root) if (d / MANIFEST).is_file()]
    for d in complete[:-keep_last] if keep_last > 0 else complete:
        shutil.rmtree(_inside(d, run_dir), ignore_errors=True)
    for d in ckpt_root.glob(".tmp-*"):
        if not d.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(_inside(d, run_dir), ignore_errors=True)


def load_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model state, {name: torch object loaded with weights_only=True}, state.json)."""
    model_state = load_file(str(directory / "model.safetensors"))
    objects = {f.stem: torch.load(f, map_location="cpu", weights_only=True) for f in directory.glob("*.pt")}
    state = json.loads((directory / "state.json").read_text())
    return model_state, objects, state
