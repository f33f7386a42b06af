"""SIGTERM and SIGINT during training: finish the step, checkpoint, say how to resume, exit 143 or 130.

The handler only records the signal; the loop asks `requested()` after every step, agrees on it across ranks
(one rank's signal stops them all at the same step) and then checkpoints and raises `Interrupted`. A second
signal exits at once. A repeat within `DEBOUNCE_S` of the first counts as the same one: Ctrl-C reaches both a
launcher and its workers, and the launcher forwards it again.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from kdkit.errors import UserError

DEBOUNCE_S = 2.0
_HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(UserError):
    """Training stopped by a signal after checkpointing; exit code 128 + the signal number."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {checkpoint}")


class GracefulStop:
    """Context manager that turns the first SIGINT/SIGTERM into a request and a later one into an exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            print(f"\nkdkit: {signal.Signals(signum).name} received: finishing this step and checkpointing "
                  "(signal again to exit at once)", file=sys.stderr, flush=True)
        elif now - self._first_at > DEBOUNCE_S:
            print(f"kdkit: second {signal.Signals(signum).name}: exiting now without a checkpoint",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)

    def requested(self) -> int:
        """The signal number received so far, 0 when none."""
        return self.signum or 0

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in _HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
