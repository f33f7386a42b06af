"""Running kdkit in real processes from tests: launch, kill -9 a whole process tree, send a signal."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from kdkit.train import checkpoint as ckpt

PY = [sys.executable, "-m", "kdkit"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def kdkit_train(config: Path, *args: str, processes: int = 1, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [*PY, "train", str(config), "--no-report", *args]
    if processes > 1:
        cmd += ["--num-processes", str(processes)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def kill_9_after(cmd: list[str], checkpoints: Path, step: int, timeout: float = 240) -> None:
    """Start `cmd` and SIGKILL it and every process under it (launcher, workers) once checkpoint `step` is complete:
    what a preempted machine does."""
    import psutil

    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = checkpoints / f"{ckpt.PREFIX}{step:07d}" / ckpt.MANIFEST
    deadline = time.monotonic() + timeout
    tree = []
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        try:
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.Error:
            pass
        time.sleep(0.01)
    for p in tree:
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.wait()
    psutil.wait_procs(tree, timeout=30)
    assert target.exists(), "the run never wrote the checkpoint it was to be killed after"


def signal_after(cmd: list[str], checkpoints: Path, step: int, signum: int) -> subprocess.CompletedProcess:
    """Start `cmd`, send it `signum` once checkpoint `step` exists, and return how it ended."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    target = checkpoints / f"{ckpt.PREFIX}{step:07d}" / ckpt.MANIFEST
    while not target.exists() and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
