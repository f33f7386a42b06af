"""kdkit's cache directory: $KDKIT_CACHE, else $XDG_CACHE_HOME/kdkit, else ~/.cache/kdkit."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    if os.environ.get("KDKIT_CACHE"):
        return Path(os.environ["KDKIT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "kdkit"
    return Path.home() / ".cache" / "kdkit"
