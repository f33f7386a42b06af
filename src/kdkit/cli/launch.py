"""`kdkit train --num-processes N [--accelerate-config NAME|FILE]`: the same command, relaunched through
Accelerate's own launcher (`accelerate launch -m kdkit train ...`), so kdkit never carries a launcher of its own.

Run under a launcher already (`accelerate launch`, `torchrun`: WORLD_SIZE is set), the options do nothing.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from importlib import resources
from pathlib import Path

import yaml

from kdkit.errors import UserError

SHIPPED = ("ddp", "fsdp")
DEEPSPEED_REFUSED = ("DeepSpeed is not supported yet: its engine steps the optimizer inside backward, which would "
                     "bypass kdkit's accumulation, numerics guard and exact resume; use ddp or fsdp")


def shipped_config(name: str) -> Path:
    return Path(str(resources.files("kdkit") / "accelerate_configs" / f"{name}.yaml"))


def resolve_accelerate_config(value: str) -> Path:
    """A shipped name (ddp, fsdp) or a path to an Accelerate config file."""
    if value in SHIPPED:
        return shipped_config(value)
    path = Path(value).expanduser()
    if not path.is_file():
        raise UserError(f"--accelerate-config: {value} is neither a shipped config ({', '.join(SHIPPED)}) nor a file")
    try:
        settings = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"--accelerate-config {value}: not a valid YAML file ({err.__class__.__name__})") from None
    if not isinstance(settings, dict):
        raise UserError(f"--accelerate-config {value}: expected a mapping of Accelerate settings")
    if str(settings.get("distributed_type", "")).upper() == "DEEPSPEED":
        raise UserError(DEEPSPEED_REFUSED)
    return path


def under_launcher() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(argv: list[str], num_processes: int, accelerate_config: Path | None) -> list[str]:
    """`accelerate launch` running `python -m kdkit <argv>` in `num_processes` processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
           "--num_machines", "1", "--main_process_port", str(_free_port())]
    if accelerate_config is not None:
        cmd += ["--config_file", str(accelerate_config)]
    else:
        # Accelerate's multi-process mode: NCCL on GPUs, gloo on a CPU-only machine
        cmd += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*cmd, "-m", "kdkit", *argv]


RELAUNCHED = "KDKIT_RELAUNCHED"  # set for the workers of `kdkit train --num-processes`


def relaunch(cmd: list[str]) -> int:
    """Run the launcher and return its exit code; a SIGTERM/SIGINT here goes to the workers.

    The launcher runs in its own session, so a Ctrl-C in the terminal reaches only this process, which passes
    it on to the workers (the launcher's direct children) and not to the launcher: torchrun would otherwise
    tear the workers down while they write their checkpoint. Workers started this way exit 0 after a signal
    has stopped them; this process then exits 128 + the signal number, as a single process would.
    """
    import psutil  # a dependency of Accelerate

    child = subprocess.Popen(cmd, start_new_session=True, env={**os.environ, RELAUNCHED: "1"})
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        try:
            targets = psutil.Process(child.pid).children() or [child]
        except psutil.Error:
            targets = [child]
        for proc in targets:
            try:
                proc.send_signal(signum)
            except (psutil.Error, ProcessLookupError):
                pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 + received[0] if received else code
