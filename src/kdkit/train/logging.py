"""Where the loop's numbers go: history.jsonl, a tracker (TensorBoard or a null object), a rich progress bar.

Null objects stand in when a destination is off, so the loop never asks "is tracking on?" (nanochat's DummyWandb).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class History:
    """Appends one JSON object per line; on resume, drops the lines written after the checkpoint's step."""

    def __init__(self, path: Path, *, enabled: bool = True, truncate_after: int | None = None):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        if truncate_after is not None and self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if row.get("step", 0) <= truncate_after:
                    kept.append(line)
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


class NullTracker:
    def log(self, values: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    def __init__(self, log_dir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run hides the events written after its checkpoint, as history.jsonl drops them
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


def make_tracker(kind: str, log_dir: Path, purge_step: int | None = None):
    return TensorBoardTracker(log_dir, purge_step) if kind == "tensorboard" else NullTracker()


class Progress:
    """A rich progress bar over optimizer steps, showing the loss; silent when disabled."""

    def __init__(self, label: str, total: int, completed: int = 0, *, enabled: bool = True, quiet: bool = False):
        self.bar = None
        self.quiet = quiet  # other ranks say nothing
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TextColumn("eta"),
                                TimeRemainingColumn(), transient=False)
        self.bar.start()
        self.task = self.bar.add_task(label, total=total, completed=completed, loss="-")

    def update(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}")

    def log(self, text: str) -> None:
        """A line above the bar (or plain print when there is no bar)."""
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
