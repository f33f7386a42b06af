"""Checkpoints that are whole or absent.

A checkpoint is written into a hidden temporary directory `.tmp-<name>-<pid>`, every file fsynced, `manifest.json`
(files, sizes, sha256, step, config hash, teacher fingerprint) written *last*, then the directory renamed into place.
Re-saving an existing name (`best`) moves the old copy aside to `.old-<name>-<pid>` between two renames; a kill right
there leaves no `<name>`, so load such a name through `recover()`, which puts the old copy back (a save cut short is
rolled back). Resume takes the newest checkpoint whose manifest verifies and skips the others with a warning.
Rotation prunes old ones only after the new one is whole (Accelerate's rotation deletes first, which loses the last
good one on a kill), hides each one (`.del-`) before deleting it so no half-deleted `step-N` is ever visible, never
deletes the only complete copy of a name, and never follows a symlink or leaves the run directory. One writer per run
directory: hidden directories of another live process are left alone.
Everything is safetensors or JSON, or `torch.save` of plain state dicts loaded back with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import psutil  # an Accelerate dependency
import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
PREFIX = "step-"
_HIDDEN = re.compile(r"\.(tmp|old|del)-(.+)-(\d{1,9})")  # kind, name, pid of the writer


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """sha256 hex of a file, read in 1 MiB blocks."""
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
        files[f.name] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    manifest = {"files": files, "created": time.time(), **meta}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync(tmp / MANIFEST)
    _fsync(tmp)
    if directory.exists():  # re-saving the same name (e.g. "best"): move the old one aside only now
        old = directory.parent / f".old-{directory.name}-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)  # left by an earlier failed save of this process; `directory` is whole
        directory.rename(old)
        tmp.rename(directory)  # a kill between these two renames leaves only `old`: recover() puts it back
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(directory)
    _fsync(directory.parent)
    return directory


def verify(directory: Path, *, hashes: bool = True) -> dict[str, Any] | None:
    """The manifest when every file it lists is present with its size and (unless `hashes=False`) its sha256."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        for name, info in manifest["files"].items():
            f = directory / name
            if f.stat().st_size != info["size"] or (hashes and sha256_file(f) != info["sha256"]):
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _writing(pid: int) -> bool:
    """Whether another live process may still be writing there (this one is not: save, prune and recover take turns)."""
    return pid != os.getpid() and psutil.pid_exists(pid)  # not os.kill(pid, 0): on Windows that kills


def _left_over(root: Path, kind: str) -> list[tuple[str, Path]]:
    """(name, directory) of the hidden `kind` directories in `root` that no live process is writing."""
    found = []
    for d in sorted(root.iterdir()) if root.is_dir() else ():
        m = _HIDDEN.fullmatch(d.name)
        if m and m[1] == kind and not d.is_symlink() and not _writing(int(m[3])):
            found.append((m[2], d))
    return found


def recover(directory: Path) -> dict[str, Any] | None:
    """`verify(directory)`, after first putting back the newest complete `.old-<name>-<pid>` when `directory` is
    missing because a re-save was killed between its two renames. Load re-saved names (`best`) through this."""
    if not directory.exists() and not directory.is_symlink():
        found = [(m.get("created", 0.0), d) for name, d in _left_over(directory.parent, "old")
                 if name == directory.name and (m := verify(d)) is not None]
        if found:
            old = max(found)[1]
            old.rename(directory)
            _fsync(directory.parent)
            warnings.warn(f"{directory}: a save was interrupted; restored the previous copy", stacklevel=2)
    return verify(directory)


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


def _remove(d: Path, root: Path) -> None:
    """Delete directory `d` of `root`, hiding it under a `.del-` name first; a symlink is left alone."""
    if d.is_symlink() or not d.is_dir() or _inside(d, root).parent != root:
        return
    if not d.name.startswith("."):
        hidden = d.with_name(f".del-{d.name}-{os.getpid()}")
        shutil.rmtree(hidden, ignore_errors=True)
        d.rename(hidden)
        d = hidden
    shutil.rmtree(d, ignore_errors=True)


def prune(ckpt_root: Path, keep_last: int, run_dir: Path) -> None:
    """Delete all but the newest `keep_last` (at least 1) whole step checkpoints, and what interrupted saves left:
    `.tmp-` and `.del-` directories, and `.old-` copies once their name is whole again (after `recover`) or when
    they are not whole themselves.

    A `.tmp-` directory is never the only complete copy of a saved checkpoint: a name appears only by the rename of
    its `.tmp-` directory, and until that rename the previous copy is still in place or aside in `.old-`.
    """
    root = _inside(ckpt_root, run_dir)
    for name in sorted({name for name, _ in _left_over(root, "old")}):
        whole = recover(root / name) is not None  # an .old- copy goes once its name is whole, or if it is not whole
        for n, d in _left_over(root, "old"):
            if n == name and (whole or verify(d, hashes=False) is None):
                _remove(d, root)
    for kind in ("tmp", "del"):
        for _, d in _left_over(root, kind):
            _remove(d, root)
    steps = [d for d in step_checkpoints(root) if not d.is_symlink()]
    whole = [d for d in steps if verify(d, hashes=False) is not None]  # a step-N appears whole; sizes suffice here
    keep = max(keep_last, 1)
    if len(whole) > keep:
        for d in steps[:steps.index(whole[-keep])]:
            _remove(d, root)


def load_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model state, {name: torch object loaded with weights_only=True}, state.json)."""
    model_state = load_file(str(directory / "model.safetensors"))
    objects = {f.stem: torch.load(f, map_location="cpu", weights_only=True) for f in directory.glob("*.pt")}
    state = json.loads((directory / "state.json").read_text())
    return model_state, objects, state
