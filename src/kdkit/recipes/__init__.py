"""Shipped recipes (YAML configs) and assets (demo teachers), found the same way installed or in a checkout."""

from __future__ import annotations

import os
from pathlib import Path

from kdkit.errors import UserError

RECIPES = Path(__file__).resolve().parent
ASSETS = RECIPES.parent / "assets"


def recipe_path(name: str) -> Path:
    path = RECIPES / name
    if not path.is_file():
        known = sorted(p.name for p in RECIPES.glob("*.yaml"))
        raise UserError(f"no shipped recipe {name!r}; known: {', '.join(known)}")
    return path


def asset_path(name: str) -> Path:
    return ASSETS / name


def cache_dir() -> Path:
    """$KDKIT_CACHE, else $XDG_CACHE_HOME/kdkit, else ~/.cache/kdkit."""
    root = os.environ.get("KDKIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kdkit"
    return Path(root).expanduser()
